"""Images in: decode, convert to RGB, resize, centre-crop, scale and normalise, in the workers.

A job whose rows are images (an image directory or glob, a Parquet column of image bytes, a
column of paths, or a model family that takes images) runs its model behind `ImageRunner`:
the runner's `prepare` turns each image row (a path or the file's bytes) into one float32
tensor in the layout the model wants, then hands the batch to the model's own runner. The
decoding is the worker's "preprocess" share in the job report.

Decoding uses Pillow. For a JPEG much larger than the model's input, `draft` asks libjpeg
to decode at 1/2, 1/4 or 1/8 scale (DCT scaling) before the resize, so most of the pixels
are never decoded (benchmarks/images.py measures what it saves); the result differs from a
full decode by resampling noise only. An image that cannot be decoded (not an image, a
truncated file, a file gone) is that row's error, named by its path.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ModelError, ModelInputError
from ..messages import IMAGENET_MEAN, IMAGENET_STD, ImageOptions, Layout
from .base import Batches, Column, Runner, TensorInfo, never

if TYPE_CHECKING:
    from .family import ModelSpec

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "ImageOptions", "ImageRunner", "Layout", "decode_image", "normalise",
    "with_image_defaults",
]  # fmt: skip

def _pil() -> Any:
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise ModelError("image inputs need Pillow; install it with: "
                         "pip install 'distinfer[images]'") from None
    return Image, ImageOps


def _target(size: tuple[int, int], options: ImageOptions) -> tuple[int, int]:
    """The (width, height) an image of `size` is scaled to before the crop: its shorter side
    to `resize`, but never below the crop ("center"); the tensor's size itself ("none")."""
    assert options.size is not None and options.resize is not None
    height, width = options.size
    if options.crop == "none":
        return width, height
    scale = max(options.resize / min(size), width / size[0], height / size[1])
    return max(width, round(size[0] * scale)), max(height, round(size[1] * scale))


def decode_image(value: str | bytes, options: ImageOptions) -> np.ndarray:
    """One image (a path or the file's bytes) as an RGB uint8 array of `options.size`, resized
    and cropped as `options` say (which must be `resolved`). ModelInputError when it cannot."""
    Image, ImageOps = _pil()
    assert options.size is not None
    height, width = options.size
    what = "the image bytes" if isinstance(value, bytes) else f"image '{value}'"
    try:
        with Image.open(io.BytesIO(value) if isinstance(value, bytes) else value) as image:
            if options.draft and image.format == "JPEG":
                image.draft("RGB", _target(image.size, options))  # decodes at >= that, up to 8x smaller
            rgb = ImageOps.exif_transpose(image).convert("RGB")
            wanted = _target(rgb.size, options)
            if rgb.size != wanted:
                rgb = rgb.resize(wanted, Image.BILINEAR)
            if options.crop == "center":
                left, top = (wanted[0] - width) // 2, (wanted[1] - height) // 2
                rgb = rgb.crop((left, top, left + width, top + height))
            return np.asarray(rgb, dtype=np.uint8)
    except FileNotFoundError:
        raise ModelInputError(f"{what} does not exist any more; "
                              "restore it or drop the row") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, Image.UnidentifiedImageError):
            reason = "not an image file Pillow can read"
        raise ModelInputError(f"{what} cannot be decoded ({reason}); fix or remove the file") from None


def normalise(pixels: np.ndarray, options: ImageOptions) -> np.ndarray:
    """A stack of RGB uint8 images (N, H, W, 3) as float32 model input in `options.layout`."""
    assert options.mean is not None and options.std is not None
    mean = np.asarray(options.mean, dtype=np.float32) * 255.0
    inv = 1.0 / (np.asarray(options.std, dtype=np.float32) * 255.0)
    out = (pixels.astype(np.float32) - mean) * inv
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2)) if options.layout == "NCHW" else out


class ImageRunner(Runner):
    """A model behind image decoding: every input whose column holds paths (strings) or
    bytes is decoded (see `ImageOptions`); numeric columns go to the model as they are.

    Decoded rows are kept for the block being prepared, so that quarantine, which prepares
    a block again without each bad row it finds, decodes every image once."""

    pads_batches = False

    def __init__(self, inner: Runner, options: ImageOptions) -> None:
        self.inner = inner
        self.input_names = inner.input_names
        info = inner.input_info()
        shapes = {t.name: t.shape for t in info or ()}
        self.options = {name: options.resolved(shapes.get(name)) for name in self.input_names}
        self._decoded: dict[tuple[str, Any], np.ndarray] = {}

    def bind(self, columns: Sequence[str], column: str | None) -> dict[str, str]:
        return self.inner.bind(columns, column)

    def prepare(self, inputs: Mapping[str, Column], batch_size: int) -> Batches:
        decoded: dict[str, Column] = {}
        kept: dict[tuple[str, Any], np.ndarray] = {}
        for name, column in inputs.items():
            if isinstance(column, np.ndarray) and column.dtype != object:
                decoded[name] = column
                continue
            options = self.options[name]
            pixels = []
            for i, value in enumerate(column):
                key = (name, value)
                image = self._decoded.get(key)
                if image is None:
                    try:
                        image = decode_image(self._path(value, options), options)
                    except ModelInputError as exc:
                        self._decoded = {**self._decoded, **kept}
                        raise ModelInputError(str(exc), row=i) from None
                kept[key] = image
                pixels.append(image)
            decoded[name] = normalise(np.stack(pixels), options) if pixels else np.zeros(
                (0, 3, *options.size) if options.layout == "NCHW" else (0, *options.size, 3), np.float32)  # type: ignore[misc]
        self._decoded = kept
        return self.inner.prepare(decoded, batch_size)

    @staticmethod
    def _path(value: Any, options: ImageOptions) -> str | bytes:
        if isinstance(value, (bytes, bytearray, memoryview)):
            return bytes(value)
        if not isinstance(value, str):
            raise ModelInputError("an image row must be a path or the file's bytes, "
                                  f"not {type(value).__name__}")
        return os.path.join(options.base, value) if options.base and not os.path.isabs(value) else value

    def forward(self, batch: Any) -> dict[str, np.ndarray]:
        return self.inner.forward(batch)

    def forward_many(
        self, batches: list[Any], cancelled: Callable[[], bool] = never
    ) -> list[dict[str, np.ndarray]]:
        return self.inner.forward_many(batches, cancelled)

    def input_info(self) -> tuple[TensorInfo, ...] | None:
        return None  # rows are files, which the KServe v2 tensors do not carry

    def group_stats(self) -> Any:
        return self.inner.group_stats()

    @property
    def hosts(self) -> tuple[str, ...]:
        return tuple(getattr(self.inner, "hosts", ()))


def with_image_defaults(runner: Runner, spec: ModelSpec, listing: bool) -> Runner:
    """`runner` behind image decoding with its family's own settings (else the defaults) when
    its rows are images (an image listing, or a family that takes images), else `runner`: for
    the processes that measure a model as a job's workers run it (`distinfer bench`, the
    profiler), which take no image options."""
    if not (listing or spec.family.takes_images):
        return runner
    return ImageRunner(runner, ImageOptions().over(spec.family.image_defaults(spec)))
