"""The `efficientnet-lite0` family: a pretrained ImageNet classifier (see models/efficientnet.py).

Its rows are images (paths or bytes), which the workers decode and preprocess the way the
network was trained (`image_defaults`, overridable per job); each row comes out as its top-5
ImageNet classes: `top5_ids`, `top5_labels`, `top5_probs`.

The preprocessing constants live here, not beside the network, so that the driver can read
them without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from ..family import ModelFamily, ModelSpec

if TYPE_CHECKING:
    from ...messages import Strategy
    from ..base import Runner
    from ..images import ImageOptions

__all__ = ["FAMILY", "IMAGE_MEAN", "IMAGE_SIZE", "IMAGE_STD", "RESIZE", "EfficientNetFamily"]

#: the network's input: 224 x 224 RGB
IMAGE_SIZE = 224
#: the shorter side before the centre crop: TensorFlow's evaluation crops 224 / (224 + 32)
#: of the shorter side, the same as scaling it to 256 and cutting out 224
RESIZE = 256
#: the Lite models' own scaling, (pixel - 127) / 128 ("inception-style, for better
#: post-quantization" in TensorFlow's efficientnet_lite_builder.py), not ImageNet's mean and
#: std; in `ImageOptions`' units (pixels in 0..1). Checked on the bundled photographs: with
#: ImageNet's, the stem's activations vary 5.6 times more than its batch-norm statistics
#: expect (1.1 times with these), and the right classes come out less likely.
IMAGE_MEAN = (127.0 / 255.0,) * 3
IMAGE_STD = (128.0 / 255.0,) * 3


class EfficientNetFamily(ModelFamily):
    name = "efficientnet-lite0"
    summary = "EfficientNet-Lite0 ImageNet classifier (top-5 classes per image), pretrained"
    accepts = "efficientnet-lite0"
    no_stages: ClassVar[str | None] = (
        "'{name}' is small (4.7M parameters, 18.8 MB; an image takes some 35 ms on one CPU "
        "thread), so the engine does not cut it into stages; run it with --strategy data"
    )
    no_shards: ClassVar[str | None] = (
        "'{name}' is a small convolutional network, which tensor parallelism does not shard "
        "(it shards the built-in transformers); run it with --strategy data"
    )
    takes_images = True

    def parse(self, name: str) -> ModelSpec | None:
        return ModelSpec(name, self) if name == "efficientnet-lite0" else None

    def identity(self, spec: ModelSpec) -> dict[str, Any]:
        return {"model": spec.name, "kind": self.name}

    def runner(self, spec: ModelSpec, threads: int, device: str) -> Runner:
        from ..efficientnet import EfficientNetRunner

        return EfficientNetRunner(threads, device)

    def image_defaults(self, spec: ModelSpec) -> ImageOptions:
        from ..images import ImageOptions

        return ImageOptions(size=(IMAGE_SIZE, IMAGE_SIZE), resize=RESIZE, crop="center",
                            mean=IMAGE_MEAN, std=IMAGE_STD, layout="NCHW")

    def serving_problem(self, spec: ModelSpec, strategy: Strategy) -> str | None:
        return (f"cannot serve '{spec.name}': its rows are image files, which the server's tensor "
                "requests do not carry; classify images with 'distinfer run'")


FAMILY = EfficientNetFamily()
