"""Byte sizes as people write them (`3GiB`, `512MiB`, `1.5GB`, `3g`) and as the planner prints them."""

from __future__ import annotations

import re

from distinfer.errors import ConfigError

__all__ = ["format_bytes", "parse_memory"]

_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)

# IEC suffixes are binary and SI suffixes decimal, as their standards say. A bare letter (`3g`)
# is binary because that is what docker, the JVM and ulimit mean by it, and memory limits are
# the only sizes this module reads.
_UNITS: dict[str, int] = {"": 1, "b": 1}
for _power, _letter in enumerate("kmgt", start=1):
    _UNITS[_letter] = 1024**_power
    _UNITS[_letter + "i"] = 1024**_power
    _UNITS[_letter + "ib"] = 1024**_power
    _UNITS[_letter + "b"] = 1000**_power

_IEC = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def parse_memory(text: str, option: str = "--worker-memory") -> int:
    """The number of bytes `text` names; `option` is the flag named in the error message."""
    match = _SIZE.match(text)
    unit = _UNITS.get(match.group(2).lower()) if match else None
    if match is None or unit is None:
        raise ConfigError(f"{option}: expected a size like 3GiB or 512MiB, got {text!r}")
    size = round(float(match.group(1)) * unit)
    if size <= 0:
        raise ConfigError(f"{option}: the size must be more than 0 bytes, got {text!r}")
    return size


def format_bytes(n: int) -> str:
    """`n` bytes in the largest binary unit that keeps the number at least 1: `1.5 GiB`, `512 B`.

    One decimal is enough to compare stages by eye; a trailing `.0` is dropped so that round
    sizes read as typed (`3 GiB`), and the result parses back with `parse_memory`.
    """
    value = float(abs(n))
    unit = 0
    while value >= 1024 and unit < len(_IEC) - 1:
        value /= 1024
        unit += 1
    text = f"{value:.1f}".removesuffix(".0") if unit else str(abs(n))
    return f"{'-' if n < 0 else ''}{text} {_IEC[unit]}"
