"""Output: one Parquet part per block, plus a manifest that makes a job resumable.

The output directory is itself a Parquet data set (`pyarrow.dataset.dataset(DIR)`,
`pandas.read_parquet(DIR)`), so every other file we keep there starts with `_` or `.`, which
Parquet readers skip. Parts are written under a temporary name and renamed into place, so a
reader or a resumed job sees either a whole part or none; the manifest is replaced the same way.

DIR may also be a URL such as s3://bucket/out (see `_storage`): there each part and the
manifest are written in one PUT under their final name, which is atomic on object stores.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq

from distinfer.data._listing import LISTING
from distinfer.data._storage import Location, join_location, locate, normalize_location
from distinfer.data._storage import reason as _reason
from distinfer.data.blocks import Block
from distinfer.errors import OutputError

__all__ = [
    "ERRORS",
    "MANIFEST",
    "REPORT",
    "Manifest",
    "first_errors",
    "join_location",
    "normalize_location",
    "part_name",
    "prepare_output",
    "remove_temp_parts",
    "save_json",
    "write_errors",
    "write_part",
]

MANIFEST = "_manifest.json"
REPORT = "_report.json"
ERRORS = "_errors"  # the bad rows a job set aside (`--max-bad-rows`), one part per block
_PART = re.compile(r"part-(\d{6,})\.parquet")
_TEMP = re.compile(r"\.(part-\d{6,}\.parquet|_manifest\.json|_report\.json)\.\w+\.tmp")


def part_name(block_id: int) -> str:
    """File name of a block's part: "part-000012.parquet" (more digits past 999999)."""
    return f"part-{block_id:06d}.parquet"


def _out(out_dir: str) -> Location:
    return locate(out_dir, OutputError)


def _remove(path: Location) -> None:
    try:
        path.remove()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise OutputError(f"cannot remove '{path}' ({_reason(exc)}); "
                          "check the output directory's permissions") from None


def _arrow(name: str, values: npt.NDArray[Any]) -> Any:
    """Shape (n, *S) → a column of n values, each S-shaped as nested fixed-size lists."""
    shape = values.shape[1:]
    if 0 in shape:
        raise OutputError(f"model output '{name}' has an empty dimension (shape {values.shape}); "
                          "it cannot be stored")
    array = pa.array(np.ascontiguousarray(values).reshape(-1))
    for size in reversed(shape):
        array = pa.FixedSizeListArray.from_arrays(array, size)
    return array


def write_part(
    out_dir: str, block_id: int, rows: npt.NDArray[Any], outputs: Mapping[str, npt.NDArray[Any]]
) -> str:
    """Write a block's rows and outputs as one Parquet part, atomically; return its path."""
    if "row" in outputs:
        raise OutputError("model output 'row' clashes with the row-index column; "
                          "rename that output")
    columns = {"row": pa.array(np.asarray(rows, dtype=np.int64))}
    for name, values in outputs.items():
        if len(values) != len(rows):
            raise ValueError(f"output '{name}' has {len(values)} rows for {len(rows)} input rows")
        columns[name] = _arrow(name, values)
    table = pa.table(columns)
    final = _out(out_dir).child(part_name(block_id))
    # float outputs (embeddings, logits) rarely repeat, so dictionary pages only cost time;
    # snappy costs about nothing on floats and shrinks the row index and strings
    dictionary = [name for name, values in outputs.items() if values.dtype.kind not in "fc"]
    try:  # to a temporary file renamed into place, or one PUT of the whole part
        final.write(lambda sink: pq.write_table(
            table, sink, compression="snappy", use_dictionary=dictionary,
            row_group_size=max(1, len(rows))))
    except OSError as exc:
        raise OutputError(f"cannot write '{final}' ({_reason(exc)}); check free space "
                          "and permissions of the output directory") from None
    return str(final)


def write_errors(out_dir: str, block_id: int, bad: Sequence[Any]) -> None:
    """A block's bad rows (`messages.BadRow`) as DIR/_errors/part-N.parquet, atomically
    (row, stage, error_type, message, input); no rows: the block's old errors part removed."""
    folder = _out(out_dir).child(ERRORS)
    final = folder.child(part_name(block_id))
    if not bad:
        _remove(final)
        return
    table = pa.table({
        "row": pa.array([b.row for b in bad], pa.int64()),
        "stage": pa.array([b.stage for b in bad], pa.string()),
        "error_type": pa.array([b.kind for b in bad], pa.string()),
        "message": pa.array([b.message for b in bad], pa.string()),
        "input": pa.array([b.value for b in bad], pa.string()),
    })  # fmt: skip
    try:
        folder.makedirs()
        final.write(lambda sink: pq.write_table(table, sink))
    except OSError as exc:
        raise OutputError(f"cannot write '{final}' ({_reason(exc)}); check free space "
                          "and permissions of the output directory") from None


def first_errors(out_dir: str, blocks: Sequence[int], most: int) -> list[str]:
    """The messages of the first `most` bad rows of `blocks` (in block order) in DIR/_errors/."""
    folder = _out(out_dir).child(ERRORS)
    messages: list[str] = []
    for block in sorted(blocks):
        if len(messages) >= most:
            break
        part = folder.child(part_name(block))
        try:
            with part.open(random_access=True) as f:
                messages += pq.read_table(f, columns=["message"]).column("message").to_pylist()
        except (OSError, pa.ArrowException):
            continue  # a resumed job's summary goes without it
    return messages[:most]


def save_json(out_dir: str, name: str, data: Any, indent: int = 1) -> str:
    """Write `data` as DIR/name atomically (synced to disk if local); return its location."""
    final = _out(out_dir).child(name)
    try:
        final.write(json.dumps(data, indent=indent).encode())
    except OSError as exc:
        raise OutputError(f"cannot write '{final}' ({_reason(exc)}); check free space and "
                          "permissions of the output directory") from None
    return str(final)


@dataclass
class Manifest:
    """A job's identity and the blocks already written; saved as DIR/_manifest.json.
    `bad`: the rows each committed block set aside (absolute rows), which a resumed job does
    not retry unless asked (`--retry-bad-rows`)."""

    job: dict[str, Any]
    blocks: int
    committed: dict[int, int] = field(default_factory=dict)
    complete: bool = False
    bad: dict[int, list[int]] = field(default_factory=dict)

    def save(self, out_dir: str) -> None:
        committed = {str(k): v for k, v in sorted(self.committed.items())}
        bad = {str(k): v for k, v in sorted(self.bad.items()) if k in self.committed}
        save_json(out_dir, MANIFEST, {"job": self.job, "blocks": self.blocks, "committed": committed,
                                      "complete": self.complete, "bad_rows": bad})

    @classmethod
    def load(cls, out_dir: str) -> Manifest | None:
        path = _out(out_dir).child(MANIFEST)
        try:
            data = json.loads(path.read())
            manifest = cls(data["job"], data["blocks"],
                           {int(k): int(v) for k, v in data["committed"].items()},
                           data["complete"],
                           {int(k): [int(r) for r in v] for k, v in data.get("bad_rows", {}).items()})
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise OutputError(f"'{path}' cannot be read ({type(exc).__name__}: {exc}); use "
                              "--overwrite to start over or choose another --output") from None
        if not (isinstance(manifest.job, dict) and isinstance(manifest.blocks, int)
                and isinstance(manifest.complete, bool)):
            raise OutputError(f"'{path}' is corrupt; use --overwrite to start over or "
                              "choose another --output")
        return manifest


def remove_temp_parts(out_dir: str) -> None:
    """Delete temporary files left by writers that died before their rename."""
    out = _out(out_dir)
    try:
        names = out.listdir()
    except OSError as exc:
        raise OutputError(f"cannot list output directory '{out}' ({_reason(exc)}); "
                          "check that it is still there") from None
    for name in names:
        if _TEMP.fullmatch(name):
            _remove(out.child(name))


def _ours(name: str) -> bool:
    return name in (MANIFEST, REPORT, ERRORS, LISTING) or bool(_PART.fullmatch(name) or _TEMP.fullmatch(name))


def _error_parts(out: Location) -> list[str]:
    try:
        return [n for n in out.child(ERRORS).listdir() if _PART.fullmatch(n) or _TEMP.fullmatch(n)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        raise OutputError(f"cannot list '{out.child(ERRORS)}' ({_reason(exc)}); check the output "
                          "directory's permissions") from None


def _make_dir(out: Location) -> None:
    try:
        if out.is_file():
            raise OutputError(f"output '{out}' exists and is not a directory; "
                              "choose another --output")
        out.makedirs()  # a no-op on object stores, where directories are only key prefixes
    except OSError as exc:
        raise OutputError(f"cannot create output directory '{out}' ({_reason(exc)}); "
                          "choose another --output") from None
    if not out.writable():
        raise OutputError(f"output directory '{out}' is not writable; "
                          "fix its permissions or choose another --output")


def _footer_rows(part: Location) -> int | None:
    try:
        if part.local:
            return int(pq.read_metadata(str(part)).num_rows)
        with part.open(random_access=True) as f:
            return int(pq.read_metadata(f).num_rows)
    except (OSError, pa.ArrowException):
        return None


def _resume(
    out: Location, old: Manifest, blocks: Sequence[Block], names: list[str], retry_bad: bool
) -> Manifest:
    """Keep the parts that are on disk and whole; delete the rest so they are recomputed.
    A block that set rows aside is kept with them, or recomputed with `retry_bad`."""
    plan = {block.id: block for block in blocks}
    committed: dict[int, int] = {}
    if retry_bad:
        old = Manifest(old.job, old.blocks, {k: v for k, v in old.committed.items() if k not in old.bad})
    for name in names:
        match = _PART.fullmatch(name)
        if not match:
            continue
        block = plan.get(int(match[1]))
        path = out.child(name)
        # a part missing from the manifest was renamed just before the driver died
        if block is not None and name == part_name(block.id) and (
            old.committed.get(block.id) == block.rows or _footer_rows(path) == block.rows
        ):
            committed[block.id] = block.rows
        else:
            _remove(path)
    for name in _error_parts(out):  # a recomputed block writes its bad rows again
        match = _PART.fullmatch(name)
        if not match or int(match[1]) not in committed:
            _remove(out.child(ERRORS).child(name))
    bad = {k: v for k, v in old.bad.items() if k in committed}
    return Manifest(old.job, len(blocks), committed, old.complete and len(committed) == len(plan), bad)


def prepare_output(
    out_dir: str, job: dict[str, Any], blocks: Sequence[Block], overwrite: bool, retry_bad: bool = False
) -> Manifest:
    """Make DIR ready for `job`: fresh, resumed from its manifest, or refused; save the manifest.

    `--overwrite` always starts afresh, deleting only distinfer's own files in DIR (and the
    bad rows' parts in DIR/_errors/). `retry_bad`: a resumed job recomputes the blocks that
    set rows aside.
    """
    out = _out(out_dir)
    _make_dir(out)
    remove_temp_parts(out_dir)
    job = json.loads(json.dumps(job))  # compare the job as it reads back from the manifest
    try:
        old = Manifest.load(out_dir)
    except OutputError:
        if not overwrite:
            raise
        old = None
    names = sorted(out.listdir())
    if old is not None and old.job != job and not overwrite:
        raise OutputError(f"output directory '{out_dir}' holds another job's output (model "
                          f"{old.job.get('model', '?')}, input {old.job.get('input', '?')}); "
                          "use --overwrite to replace it or choose another --output")
    # dot files (.DS_Store, ...) are invisible to Parquet readers, so they do no harm
    visible = [name for name in names if not name.startswith(".")]
    if old is None and visible and not overwrite:
        if all(_ours(name) for name in visible):
            raise OutputError(f"output directory '{out_dir}' holds distinfer files but no "
                              f"{MANIFEST}, so they cannot be resumed; use --overwrite to "
                              "replace them or choose another --output")
        raise OutputError(f"output directory '{out_dir}' is not empty and holds no distinfer "
                          "job; choose an empty or new --output")
    if old is None or overwrite:
        for name in _error_parts(out):
            _remove(out.child(ERRORS).child(name))
        for name in names:
            if _ours(name) and name != ERRORS:
                _remove(out.child(name))
        manifest = Manifest(job, len(blocks), {})
    else:
        manifest = _resume(out, old, blocks, names, retry_bad)
    manifest.save(out_dir)
    return manifest
