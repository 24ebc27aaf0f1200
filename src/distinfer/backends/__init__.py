"""Backends start replicas and carry messages; `local` (processes) is the default."""

from __future__ import annotations

from ..errors import ConfigError
from ..runtime.messages import WorkerSpec
from .base import Backend, WorkerGone

__all__ = ["BACKENDS", "Backend", "WorkerGone", "make_backend"]

BACKENDS = ("local",)


def make_backend(name: str, spec: WorkerSpec) -> Backend:
    if name == "local":
        from .local import LocalBackend

        return LocalBackend(spec)
    raise ConfigError(f"unknown backend '{name}'; use one of: {', '.join(BACKENDS)}")
