"""Backends start replicas and carry messages; `local` (processes) is the default."""

from __future__ import annotations

from ..config import RunConfig
from ..errors import ConfigError
from ..messages import WorkerSpec
from .base import Backend

__all__ = ["BACKENDS", "Backend", "make_backend"]

BACKENDS = ("local", "ray")


def make_backend(config: RunConfig, spec: WorkerSpec) -> Backend:
    if config.backend == "local":
        from .local import LocalBackend

        return LocalBackend(spec)
    if config.backend == "ray":
        from .ray import RayBackend, RayOptions

        return RayBackend(spec, RayOptions.from_config(config))
    raise ConfigError(f"unknown backend '{config.backend}'; use one of: {', '.join(BACKENDS)}")
