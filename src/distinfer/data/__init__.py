"""The data layer: plan an input file into blocks, read one block, write its outputs.

The driver only opens and plans (`open_source`, `plan_blocks`, `prepare_output`); each worker
reads its own block (`read_block`) and writes its own part (`write_part`), so rows never pass
through the driver. Inputs and output directories may be local paths or fsspec URLs
(s3://..., gs://...); the driver turns `--output` into a location with `normalize_location`.
"""

from distinfer.data.blocks import Block, block_sizes
from distinfer.data.sink import (
    MANIFEST,
    REPORT,
    Manifest,
    join_location,
    normalize_location,
    part_name,
    prepare_output,
    remove_temp_parts,
    save_json,
    write_part,
)
from distinfer.data.sources import (
    FORMATS,
    SourceSpec,
    check_columns,
    describe_row,
    open_source,
    plan_blocks,
    read_block,
)

__all__ = [
    "FORMATS",
    "MANIFEST",
    "REPORT",
    "Block",
    "Manifest",
    "SourceSpec",
    "block_sizes",
    "check_columns",
    "describe_row",
    "join_location",
    "normalize_location",
    "open_source",
    "part_name",
    "plan_blocks",
    "prepare_output",
    "read_block",
    "remove_temp_parts",
    "save_json",
    "write_part",
]
