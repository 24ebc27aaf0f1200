"""A job's input as the driver opens it: a file, or images listed into the output directory.

An image directory or glob (`data/_listing.py`) is listed afresh into a temporary file,
which becomes DIR/_listing.txt once the output directory is the job's (`JobInput.place`),
so that a directory holding another job's output is refused before anything in it changes.
A job resumed over the same images reads DIR/_listing.txt again instead: the same rows in
the same order, whatever was added to or removed from the folder since.

Whether the rows are images, and how they are decoded (`image_options`), is decided here
too: an image listing, a model family that takes images, a Parquet column of bytes, or an
image option given (which makes a column of paths one of images).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ..config import RunConfig
from ..data._listing import LISTING, is_image_input
from ..data._storage import is_url
from ..data.sink import Manifest
from ..data.sources import SourceSpec, open_images, open_source
from ..errors import ConfigError, OutputError
from ..logs import log

if TYPE_CHECKING:
    from ..messages import ImageOptions
    from ..models.family import ModelSpec

__all__ = ["JobInput", "image_options", "open_input"]

@dataclass(frozen=True, slots=True)
class JobInput:
    """The source the workers read (`source`), and for a fresh image listing the temporary
    file holding it until `place` moves it to `source.path`."""

    source: SourceSpec
    images: str | None = None  # the image directory or glob, absolute (None: a file)
    pending: str | None = None

    @property
    def planned(self) -> SourceSpec:
        """The source as it can be read now, to plan blocks (the temporary listing, if any)."""
        return replace(self.source, path=self.pending) if self.pending else self.source

    def place(self) -> None:
        """Move a fresh listing into the output directory (its size and mtime kept)."""
        if self.pending:
            shutil.move(self.pending, self.source.path)


def open_input(config: RunConfig, output_dir: str) -> JobInput:
    if config.input_format is not None or not is_image_input(config.input):
        return JobInput(open_source(config.input, config.input_format))
    if is_url(output_dir):
        raise ConfigError(f"an image directory or glob as --input keeps its listing in the output directory, "
                          f"which must be local; '{output_dir}' is not")
    images = os.path.abspath(os.path.expanduser(config.input))
    kept = os.path.join(output_dir, LISTING)
    if not config.overwrite and os.path.isfile(kept):
        with contextlib.suppress(OutputError):
            old = Manifest.load(output_dir)
            if old is not None and old.job.get("images") == images:
                return JobInput(open_source(kept, "images"), images)
    fresh, skipped = open_images(config.input)
    if skipped:
        log.info("%s: %d file%s without an image suffix left out", config.input, skipped,
                 "" if skipped == 1 else "s")
    return JobInput(replace(fresh, path=kept), images, fresh.path)


def _binary(source: SourceSpec, column: str | None) -> bool:
    """Whether the Parquet column fed to the model holds bytes (image files)."""
    if source.format != "parquet":
        return False
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.read_schema(source.path)
    names = [column] if column else list(schema.names)
    if len(names) != 1 or names[0] not in schema.names:
        return False
    kind = schema.field(names[0]).type
    return bool(pa.types.is_binary(kind) or pa.types.is_large_binary(kind))


def image_options(config: RunConfig, model: ModelSpec, source: SourceSpec) -> ImageOptions | None:
    """How the job's image rows are decoded, or None when its rows are not images."""
    given = config.image_options()
    images = (source.format == "images" or model.family.takes_images or config.images_given
              or (not is_url(source.path) and _binary(source, config.column)))
    if not images:
        return None
    base = "" if source.format == "images" else os.path.dirname(os.path.abspath(config.input))
    return replace(given, base=base).over(model.family.image_defaults(model))
