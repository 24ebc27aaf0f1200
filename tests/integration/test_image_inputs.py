"""Image inputs end to end: a directory or glob of image files, a Parquet column of image
bytes, a JSONL column of paths; bad images set aside by path; resume over the listing.

The model is a small ONNX conv net with a fixed 64 x 64 input, so the image size and layout
come from the model itself; the expected outputs are computed in this process from the same
images with onnxruntime (`reference`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch

import distinfer
from distinfer.errors import ConfigError, DistinferError, InputError
from distinfer.models.images import ImageOptions, decode_image, normalise

PIL = pytest.importorskip("PIL.Image")

ROWS = 500
BAD = {"img-0137.jpg": "truncated", "notes-0321.png": "not an image"}


class TinyCnn(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 5, stride=2)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cnn") / "cnn.onnx"
    torch.onnx.export(TinyCnn(), (torch.zeros(2, 3, 64, 64),), str(path), input_names=["pixels"],
                      output_names=["scores"], dynamic_axes={"pixels": {0: "n"}, "scores": {0: "n"}},
                      dynamo=False)
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """500 JPEG, PNG and WebP images of several sizes and modes, one truncated JPEG and one
    file with an image's suffix that is not an image, plus a text file (not listed)."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(7)
    for i in range(ROWS):
        h, w = int(rng.integers(40, 160)), int(rng.integers(40, 160))
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        pixels[: h // 2] //= 2  # some structure, so resizing matters
        image = PIL.fromarray(pixels)
        suffix = ("jpg", "png", "webp")[i % 3]
        if i % 7 == 0:
            image = image.convert("L")  # greyscale: converted to RGB
        sub = folder / ("b" if i >= 400 else "a")  # subdirectories are listed depth first
        sub.mkdir(exist_ok=True)
        image.save(sub / f"img-{i:04d}.{suffix}")
    truncated = folder / "a" / "img-0137.jpg"
    PIL.fromarray(rng.integers(0, 256, (90, 90, 3), dtype=np.uint8)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:700])
    (folder / "a" / "notes-0321.png").write_text("these are not pixels\n")
    (folder / "README.txt").write_text("not listed: no image suffix\n")
    return folder


def listing(folder: Path) -> list[str]:
    """The order distinfer lists a folder in: depth first, names sorted."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        out += [os.path.join(root, f) for f in sorted(files) if f.rsplit(".", 1)[-1] in ("jpg", "png", "webp")]
    return out


def reference(cnn: Path, paths: list[str] | list[bytes]) -> np.ndarray:
    import onnxruntime as ort

    options = ImageOptions(size=(64, 64), layout="NCHW").resolved(None)
    batch = normalise(np.stack([decode_image(p, options) for p in paths]), options)
    session = ort.InferenceSession(str(cnn), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"pixels": batch})[0])


def read_output(out: Path) -> pa.Table:
    return ds.dataset(str(out)).to_table().sort_by("row")


def test_a_directory_of_images_gives_every_good_image_once_in_listing_order_and_names_the_bad_ones(
    cnn: Path, photos: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    report = distinfer.run(model=str(cnn), input=str(photos), output=str(out), workers=2, batch_size=16,
                           block_size=64, max_bad_rows=5, strategy="data")
    paths = listing(photos)
    assert len(paths) == ROWS + 2
    table = read_output(out)
    good = [p for p in paths if os.path.basename(p) not in BAD]
    assert table.column("path").to_pylist() == good  # every good image once, in listing order
    bad_rows = sorted(i for i, p in enumerate(paths) if os.path.basename(p) in BAD)
    assert table.column("row").to_pylist() == [i for i in range(len(paths)) if i not in bad_rows]
    assert report.bad_rows == 2
    errors = pq.read_table(out / "_errors").sort_by("row").to_pylist()
    assert [e["row"] for e in errors] == bad_rows
    for error in errors:
        assert error["stage"] == "preprocess"
        assert error["input"] in paths and os.path.basename(error["input"]) in BAD
        assert error["input"] in error["message"]
    assert "truncated" in errors[0]["message"] and "not an image" in errors[1]["message"]
    scores = np.stack(table.column("scores").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(scores, reference(cnn, good), rtol=1e-4, atol=1e-5)
    assert (out / "_listing.txt").read_text().splitlines() == paths


def test_without_an_allowance_the_first_bad_image_fails_the_job_naming_its_file(
    cnn: Path, photos: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    command = [sys.executable, "-m", "distinfer.cli", "run", "--model", str(cnn), "--input", str(photos),
               "--output", str(out), "--strategy", "data", "--block-size", "128"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("distinfer: error")]
    assert len(lines) == 1, done.stderr
    assert "img-0137.jpg' cannot be decoded (image file is truncated" in lines[0]
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["complete"] is False


def test_a_resumed_job_reads_the_same_listing_and_overwrite_lists_again(
    cnn: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(60):
        PIL.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    out = tmp_path / "out"
    options = dict(model=str(cnn), input=str(folder / "*.png"), output=str(out), workers=2, batch_size=8,
                   block_size=16, strategy="data")
    distinfer.run(**options)
    manifest = json.loads((out / "_manifest.json").read_text())
    parts = sorted(out.glob("part-*.parquet"))
    lost = parts[1]
    manifest["committed"].pop(str(int(lost.name[5:11])))
    manifest["complete"] = False
    (out / "_manifest.json").write_text(json.dumps(manifest))
    lost.unlink()
    (folder / "000.png").unlink()  # the folder changes: the resumed job must not see it
    for i in range(60, 70):
        PIL.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    before = (out / "_listing.txt").read_text()

    report = distinfer.run(**options)
    assert 0 < report.rows < 60 and report.rows_resumed + report.rows == 60
    assert (out / "_listing.txt").read_text() == before
    table = read_output(out)
    assert table.column("row").to_pylist() == list(range(60))
    assert table.column("path").to_pylist() == [str(folder / f"{i:03d}.png") for i in range(60)]

    distinfer.run(**options, overwrite=True)  # lists the folder again
    table = read_output(out)
    assert table.column("path").to_pylist() == [str(folder / f"{i:03d}.png") for i in range(1, 70)]


def test_a_parquet_column_of_image_bytes_and_a_jsonl_column_of_paths(
    cnn: Path, photos: Path, tmp_path: Path
) -> None:
    paths = [p for p in listing(photos) if os.path.basename(p) not in BAD][:40]
    blobs = [Path(p).read_bytes() for p in paths]
    table = pa.table({"id": list(range(40)), "image": pa.array(blobs, pa.binary())})
    pq.write_table(table, tmp_path / "images.parquet", row_group_size=16)
    distinfer.run(model=str(cnn), input=str(tmp_path / "images.parquet"), column="image",
                  output=str(tmp_path / "out1"), workers=2, batch_size=8, block_size=16, strategy="data")
    expected = reference(cnn, paths)
    got = np.stack(read_output(tmp_path / "out1").column("scores").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)

    # paths relative to the JSONL file's folder; a column of strings is images once an image option is given
    lines = [json.dumps({"file": os.path.relpath(p, tmp_path)}) for p in paths]
    (tmp_path / "images.jsonl").write_text("\n".join(lines) + "\n")
    distinfer.run(model=str(cnn), input=str(tmp_path / "images.jsonl"), column="file", image_size=64,
                  output=str(tmp_path / "out2"), workers=1, batch_size=8, strategy="data")
    got = np.stack(read_output(tmp_path / "out2").column("scores").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_image_options_are_checked_with_one_line_errors(cnn: Path, tmp_path: Path) -> None:
    base = dict(model=str(cnn), input=str(tmp_path), output=str(tmp_path / "out"))
    with pytest.raises(ConfigError, match=r"--image-size must be N or HxW in pixels"):
        distinfer.run(**base, image_size="big")
    with pytest.raises(ConfigError, match=r"--mean takes one number or three \(R,G,B\)"):
        distinfer.run(**base, mean="0.1,0.2")
    with pytest.raises(ConfigError, match=r"--crop none scales the whole image"):
        distinfer.run(**base, crop="none", resize=256)
    with pytest.raises(InputError, match=r"holds no image files .*; give an input file, or a directory"):
        distinfer.run(**base, strategy="data")
    with pytest.raises(InputError, match=r"pattern '.*\*\.jpg' matches no file"):
        distinfer.run(**{**base, "input": str(tmp_path / "*.jpg")}, strategy="data")
    assert issubclass(InputError, DistinferError)
