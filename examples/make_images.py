"""Write the photographs in examples/images/ (for `make demo-images` and the image tests).

Every photo comes from a package's bundled sample data, chosen for a redistributable licence
(public domain, CC0 or CC BY; see examples/images/LICENSES.md) and an ImageNet class that is
clear. Two are crops of the astronaut portrait, whose whole has no ImageNet class: the model
of the space shuttle behind her, and her helmet. Each is saved as a JPEG of quality 90, its
longest side at most 640 pixels, so the set stays small (under 0.5 MB).

Needs scikit-image and scikit-learn (for their sample photos) and Pillow:

    python examples/make_images.py [OUT_DIR]    # default: examples/images
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

MAX_SIDE = 640
QUALITY = 90


def _skimage(name: str) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        import skimage.data

        return Image.fromarray(getattr(skimage.data, name)())

    return load


def _sklearn(name: str) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        from sklearn.datasets import load_sample_image

        return Image.fromarray(load_sample_image(name))

    return load


def _crop(load: Callable[[], Image.Image], box: tuple[int, int, int, int]) -> Callable[[], Image.Image]:
    return lambda: load().crop(box)


#: file name -> how to make it (the box of a crop is (left, top, right, bottom) in pixels)
PHOTOS: dict[str, Callable[[], Image.Image]] = {
    "cat.jpg": _skimage("chelsea"),
    "coffee.jpg": _skimage("coffee"),
    "rocket.jpg": _skimage("rocket"),
    "camera_tripod.jpg": _skimage("camera"),  # grey-level: decoding must make it RGB
    "shuttle_model.jpg": _crop(_skimage("astronaut"), (300, 0, 512, 300)),
    "space_helmet.jpg": _crop(_skimage("astronaut"), (290, 270, 512, 512)),
    "summer_palace.jpg": _sklearn("china.jpg"),
    "dahlia.jpg": _sklearn("flower.jpg"),
}


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, load in PHOTOS.items():
        image = load()
        if max(image.size) > MAX_SIDE:
            scale = MAX_SIDE / max(image.size)
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
        assert image.mode in ("RGB", "L"), (name, image.mode)
        image.save(out / name, "JPEG", quality=QUALITY, optimize=True)
        pixels = np.asarray(image)
        print(f"{name:20s} {image.width}x{image.height} {image.mode:3s} "
              f"{(out / name).stat().st_size / 1024:6.1f} KiB  mean {pixels.mean():.0f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "images")
