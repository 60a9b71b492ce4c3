"""JSON parsing with bounds, for bytes that come from the network or from an image.

``json.loads`` alone recurses once per nesting level (100k-deep input holds the GIL, then
raises RecursionError), turns a 5,000-digit integer into ValueError only after the work, and
accepts ``NaN``/``Infinity``. :func:`loads` refuses all of these up front with
:class:`~agents.errors.JsonLimit` (a ValueError), which each caller turns into its own
error: ``DecodeError`` (400) for a request, a format error for an image.

Pure: no I/O.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

from agents.errors import JsonLimit

__all__ = ["MAX_DEPTH", "MAX_INT_DIGITS", "JsonLimit", "loads"]

MAX_DEPTH: Final = 16  # every message and on-disk document of rbdfleet nests 5 levels or less
MAX_INT_DIGITS: Final = 20  # a u64 has 20 digits; nothing rbdfleet stores is larger
MAX_FLOAT_CHARS: Final = 32  # repr() of any finite double is shorter

_KEEP = b'"[]{}'  # all that decides nesting once escapes are gone
_DROP = bytes(b for b in range(256) if b not in _KEEP)
_STRING = re.compile(rb'"[^"]*"')
_PAIR = re.compile(rb"\[\]|\{\}")


def _check_depth(data: bytes, max_depth: int) -> None:
    """JsonLimit unless the brackets outside strings nest at most ``max_depth`` deep. Every
    step is a C-speed pass over the bytes (no Python loop per byte or per bracket): drop the
    escaped backslashes and quotes, keep only quotes and brackets, drop the strings, then
    remove innermost ``[]``/``{}`` pairs ``max_depth`` times: what is left is nested deeper
    (or unbalanced, which the parser would refuse anyway)."""
    brackets = _STRING.sub(b"", data.replace(b"\\\\", b"").replace(b'\\"', b"")
                           .translate(None, _DROP))
    for _ in range(max_depth):
        if not brackets:
            return
        brackets = _PAIR.sub(b"", brackets)
    if brackets:
        raise JsonLimit(f"JSON nested deeper than {max_depth} levels (or unbalanced)")


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise JsonLimit(f"JSON integer longer than {MAX_INT_DIGITS} digits")
    return int(text)


def _float(text: str) -> float:
    if len(text) > MAX_FLOAT_CHARS:
        raise JsonLimit(f"JSON number longer than {MAX_FLOAT_CHARS} characters")
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise JsonLimit("JSON number out of range")
    return value


def _constant(name: str) -> Any:
    raise JsonLimit(f"JSON constant {name} is not allowed")


def loads(data: bytes | str, *, max_depth: int = MAX_DEPTH) -> Any:
    """Parse UTF-8 JSON ``data``: nesting checked before parsing, integers of at most
    MAX_INT_DIGITS digits, finite numbers only. Raises :class:`JsonLimit` for anything else."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    _check_depth(raw, max_depth)
    try:
        return json.loads(raw.decode("utf-8"), parse_int=_int, parse_float=_float,
                          parse_constant=_constant)
    except JsonLimit:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise JsonLimit(f"not valid JSON: {exc}") from exc
