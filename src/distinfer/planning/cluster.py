"""The resources a plan or a simulation is for: node kinds and how many of each.

A cluster file is TOML (`.toml`) or JSON (`.json`) with one `[[node]]` table per node kind::

    # a 64-node cluster of two kinds
    [[node]]
    kind = "c8"           # a name for the kind, printed in plans
    count = 48            # how many nodes of this kind
    cores = 8             # CPU cores per node
    memory = "32GiB"      # memory per node (sizes as --worker-memory reads them)
    speed = 1.0           # per-core speed relative to the machine the profile was measured on
    network = "10Gbit/s"  # bandwidth between this kind and the others (default 10 Gbit/s)

    [[node]]
    kind = "c16"
    count = 16
    cores = 16
    memory = "64GiB"
    gpus = 0
    speed = 1.3

`this_machine()` describes the machine the planner runs on: one node, its cores and its
memory. Every field but `kind` and `count` has a default (`cores` and `memory` from this
machine), so a file can be as short as `[[node]]\\nkind = "x"\\ncount = 10`.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from distinfer.errors import ConfigError
from distinfer.planning.sizes import format_bytes, parse_memory

__all__ = ["Cluster", "NodeKind", "load_cluster", "parse_bandwidth", "this_machine"]

DEFAULT_NETWORK = 10e9 / 8  # bytes/s: 10 Gbit/s
_FIELDS = {"kind", "count", "cores", "memory", "gpus", "speed", "network"}
_RATE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([kKmMgGtT]?)(bit|bps|b|B|Byte|byte|Bytes|bytes)(?:/s)?\s*$")


@dataclass(frozen=True, slots=True)
class NodeKind:
    """One kind of node and how many of it there are."""

    kind: str
    count: int
    cores: int
    memory: int  # bytes
    gpus: int = 0
    speed: float = 1.0  # per-core speed relative to the profiled machine
    network: float = DEFAULT_NETWORK  # bytes/s to the other nodes

    def describe(self) -> str:
        gpus = f", {self.gpus} GPUs" if self.gpus else ""
        return (
            f"{self.count} x {self.kind} ({self.cores} cores, {format_bytes(self.memory)}{gpus}, "
            f"speed {self.speed:g}, {self.network * 8 / 1e9:g} Gbit/s)"
        )


@dataclass(frozen=True, slots=True)
class Cluster:
    """Node kinds, in the file's order; `local` when it is the machine the planner runs on."""

    nodes: tuple[NodeKind, ...]
    source: str = "this machine"
    local: bool = True

    @property
    def node_count(self) -> int:
        return sum(n.count for n in self.nodes)

    @property
    def total_cores(self) -> int:
        return sum(n.count * n.cores for n in self.nodes)

    def describe(self) -> str:
        return f"{self.source}: " + "; ".join(n.describe() for n in self.nodes)


def _machine_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not on Linux
        return 8 * 1024**3


def _machine_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def this_machine() -> Cluster:
    """This machine as a one-node cluster: the cores this process may use, its memory."""
    node = NodeKind("this machine", 1, _machine_cores(), _machine_memory())
    return Cluster((node,), "this machine", local=True)


def parse_bandwidth(value: Any, where: str) -> float:
    """Bytes/s from a number (bytes/s) or text: `10Gbit/s`, `10Gbps`, `10Gb/s` (bits) or
    `1.25GB/s`, `1.25GByte/s` (bytes); the prefixes k, M, G, T are decimal."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        rate = float(value)
    else:
        match = _RATE.match(str(value))
        if match is None:
            raise ConfigError(f"{where}: expected a bandwidth like 10Gbit/s or 1.25GB/s, got {value!r}")
        number, prefix, unit = match.groups()
        scale = 1000.0 ** ("kmgt".index(prefix.lower()) + 1) if prefix else 1.0
        in_bits = unit in ("bit", "b", "bps")  # a lower-case b is a bit, as in Gb/s
        rate = float(number) * scale / (8 if in_bits else 1)
    if not (math.isfinite(rate) and rate > 0):
        raise ConfigError(f"{where}: the bandwidth must be > 0, got {value!r}")
    return rate


def _node(entry: Any, where: str, machine: NodeKind) -> NodeKind:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a table of fields, got {type(entry).__name__}")
    unknown = sorted(set(entry) - _FIELDS)
    if unknown:
        raise ConfigError(
            f"{where}: unknown field {unknown[0]!r}; the fields are {', '.join(sorted(_FIELDS))}"
        )
    for key in ("kind", "count"):
        if key not in entry:
            raise ConfigError(f"{where}: the field {key!r} is required")

    def integer(key: str, default: int, least: int) -> int:
        value = entry.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ConfigError(f"{where}: {key} must be an integer >= {least}, got {value!r}")
        return value

    speed = entry.get("speed", 1.0)
    if (
        not isinstance(speed, (int, float))
        or isinstance(speed, bool)
        or not (math.isfinite(speed) and speed > 0)
    ):
        raise ConfigError(f"{where}: speed must be a number > 0, got {speed!r}")
    memory = entry.get("memory")
    return NodeKind(
        kind=str(entry["kind"]),
        count=integer("count", 1, 1),
        cores=integer("cores", machine.cores, 1),
        memory=machine.memory if memory is None else parse_memory(str(memory), f"{where}: memory"),
        gpus=integer("gpus", 0, 0),
        speed=float(speed),
        network=parse_bandwidth(entry.get("network", DEFAULT_NETWORK), f"{where}: network"),
    )


def load_cluster(path: str | Path) -> Cluster:
    """Read a cluster file (TOML or JSON, see the module's docstring); errors name the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the cluster file ({exc.strerror or exc})") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(
            f"{path}: not a valid {'JSON' if path.suffix.lower() == '.json' else 'TOML'} file: {exc}"
        ) from None
    entries = data.get("node") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: expected one or more [[node]] tables (a 'node' list in JSON)")
    machine = this_machine().nodes[0]
    nodes = tuple(_node(e, f"{path}: node {i + 1}", machine) for i, e in enumerate(entries))
    kinds = [n.kind for n in nodes]
    if len(set(kinds)) != len(kinds):
        raise ConfigError(f"{path}: node kinds must be unique, got {kinds}")
    return Cluster(nodes, str(path), local=False)
