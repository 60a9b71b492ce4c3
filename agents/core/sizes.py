"""Sizes in settings: one grammar for the agent's config and ``rbdfleet.toml``.

A size is a positive integer number of bytes, or a string ``<digits>[ <unit>]`` with one of
the binary units of :data:`SIZE_UNITS` (case as written; no unit means bytes), surrounded by
optional blanks: ``4096``, ``"4096"``, ``"64MiB"``, ``"1 GiB"``. Zero, negative numbers,
booleans, fractions and decimal units (``GB``) are refused: a size of nothing is never a
setting, and ``GB`` next to ``GiB`` would be ambiguous.
"""

from __future__ import annotations

import re

from agents.errors import ConfigError

__all__ = ["SIZE_UNITS", "format_size", "parse_size"]

SIZE_UNITS: dict[str, int] = {
    "B": 1,
    "KiB": 1 << 10,
    "MiB": 1 << 20,
    "GiB": 1 << 30,
    "TiB": 1 << 40,
}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([A-Za-z]*)\s*$")


def parse_size(value: object, key: str) -> int:
    """Bytes from a size in the module's grammar; ConfigError naming ``key`` otherwise."""
    example = "a size like 4096, '64MiB' or '1 GiB'"
    if isinstance(value, int) and not isinstance(value, bool):
        number, unit = value, "B"
    elif isinstance(value, str) and (match := _SIZE_RE.match(value)):
        number, unit = int(match.group(1)), match.group(2) or "B"
    else:
        raise ConfigError(key, f"expected {example}, got {value!r}")
    if unit not in SIZE_UNITS:
        raise ConfigError(key, f"unknown unit {unit!r} (use one of {', '.join(SIZE_UNITS)})")
    if number <= 0:
        raise ConfigError(key, f"expected {example} (more than 0 bytes), got {value!r}")
    return number * SIZE_UNITS[unit]


def format_size(size: int) -> str:
    """The largest exact unit: 1073741824 → ``'1GiB'``, 4097 → ``'4097B'``."""
    for unit, factor in reversed(SIZE_UNITS.items()):
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"
