"""A model file checked in the driver, before any worker starts: a truncated or corrupt file,
or a pickle where a model program or weights were expected, is one line naming the file and
the problem, instead of each worker's loader failing its own way.

The checks read headers and indexes only (an ONNX file's graph without external data, a
zip archive's directory, a GGUF or safetensors index against the file's size), so they
cost little next to loading the model. Nothing here unpickles anything: distinfer never
unpickles a model file (unpickling runs code); TorchScript and torch.export archives are
programs that torch loads without pickle's code execution.
"""

from __future__ import annotations

import json
import mmap
import struct
import zipfile
from pathlib import Path

from ..errors import ModelError

__all__ = ["check_gguf", "check_keras_file", "check_onnx", "check_safetensors", "check_saved_model",
           "check_torch_file"]

_PICKLE = (b"\x80", b"(", b"]", b"}")  # how pickle streams start (protocol 2+, or 0/1)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def check_onnx(path: Path) -> None:
    try:
        import onnx
    except ModuleNotFoundError:  # the runner says what to install
        return
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ModelError(f"{path}: not a readable ONNX file ({_short(exc)}); it may be truncated or "
                         "not an ONNX model: export or copy it again") from None
    if not model.graph.node:
        raise ModelError(f"{path}: the ONNX file holds no graph; it may be truncated: export or copy "
                         "it again")


def check_torch_file(path: Path) -> None:
    """A TorchScript (.pt, .pth, .ts) or torch.export (.pt2) archive, not a pickle."""
    with path.open("rb") as f:
        head = f.read(2)
    if not zipfile.is_zipfile(path):
        if head[:1] in _PICKLE:
            raise ModelError(f"{path}: a pickle, not a TorchScript or torch.export archive; distinfer does "
                             "not unpickle model files (that runs code): save the model with "
                             "torch.jit.save(torch.jit.script(model)) or torch.export.save, or give "
                             "package.module:factory")
        why = "a zip archive cut short" if head == b"PK" else "not a zip archive"
        raise ModelError(f"{path}: not a TorchScript or torch.export archive ({why}); save or copy it again")
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    program = any(n.endswith(("/constants.pkl", "/models/model.json")) or "/code/" in n for n in names)
    if not program and any(n.endswith("/data.pkl") for n in names):
        raise ModelError(f"{path}: a torch.save() file (a state dict or a pickled module), not a model "
                         "program; distinfer does not unpickle model files (that runs code): save the model "
                         "with torch.jit.save(torch.jit.script(model)) or torch.export.save, or give "
                         "package.module:factory that builds it and loads the weights with "
                         "torch.load(..., weights_only=True)")


def check_gguf(path: Path) -> None:
    """The GGUF header, and every tensor's data inside the file."""
    size = path.stat().st_size
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        import gguf
    except ModuleNotFoundError:  # the loader says what to install
        return
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError, struct errors, IndexError...
        raise ModelError(f"{path}: not a readable GGUF file ({_short(exc)}); it may be truncated: "
                         "download or copy it again") from None
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            end = t.data_offset + t.n_bytes
            raise ModelError(f"{path}: truncated: tensor '{t.name}' ends at byte {end:,} of a {size:,}-byte "
                             "file; download or copy it again")


def check_safetensors(path: Path) -> None:
    """The safetensors header (8-byte length, JSON index), and its tensors inside the file."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ModelError(f"{path}: not a safetensors file (only {len(raw)} bytes)")
        (length,) = struct.unpack("<Q", raw)
        if length > size - 8:
            raise ModelError(f"{path}: not a safetensors file, or truncated (its header claims {length:,} "
                             f"bytes of a {size:,}-byte file); download or copy it again")
        try:
            index = json.loads(f.read(length))
        except ValueError:
            raise ModelError(f"{path}: not a safetensors file (its header is not JSON); download or copy "
                             "it again") from None
    if not isinstance(index, dict):
        raise ModelError(f"{path}: not a safetensors file (its header is not a table of tensors)")
    ends = [v["data_offsets"][1] for k, v in index.items() if isinstance(v, dict) and "data_offsets" in v]
    end = max((int(e) for e in ends), default=0)
    if 8 + length + end > size:
        raise ModelError(f"{path}: truncated: its tensors need {8 + length + end:,} bytes, the file has "
                         f"{size:,}; download or copy it again")


def check_keras_file(path: Path) -> None:
    """A Keras 3 `.keras` archive: a zip holding `config.json` (the weights load in the worker)."""
    with path.open("rb") as f:
        head = f.read(4)
    if not zipfile.is_zipfile(path):
        if head == b"\x89HDF":
            raise ModelError(f"{path}: an HDF5 file (Keras 2's .h5 format), not a Keras 3 archive; load it "
                             "with Keras and save it again as .keras (model.save('model.keras'))")
        why = "a zip archive cut short" if head[:2] == b"PK" else "not a zip archive"
        raise ModelError(f"{path}: not a Keras 3 model file ({why}); save it with model.save('model.keras') "
                         "or copy it again")
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    if "config.json" not in names:
        raise ModelError(f"{path}: a zip archive without config.json, not a Keras 3 model file; save it "
                         "with model.save('model.keras')")


def check_saved_model(path: Path) -> None:
    """A TensorFlow SavedModel directory whose graph may hold a `serving_default` signature.

    The signature's name is searched for in `saved_model.pb`'s bytes (without TensorFlow, which
    the driver does not import): absent, the model has no such signature; present, the worker
    still checks that it is one."""
    graph = path / "saved_model.pb"
    if not graph.is_file():
        graph = path / "saved_model.pbtxt"
    size = graph.stat().st_size
    if size == 0:
        raise ModelError(f"{graph}: an empty file; the SavedModel may be cut short: export or copy it again")
    with graph.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        found = data.find(b"serving_default") >= 0
    if not found:
        raise ModelError(f"{path}: a SavedModel without a 'serving_default' signature, which distinfer "
                         "calls; export it with model.export(dir) (Keras 3) or tf.saved_model.save(obj, dir, "
                         "signatures=...)")
