"""Key files: the one reader for the fleet's master key file (coordinator, deploy) and a
node's own key file (agent).

One key per line, the current key first; a second line is the previous key, still accepted
during a rotation (docs/security.md). A file group or other may read is refused, and no
error ever shows the file's content.
"""

from __future__ import annotations

import os
import stat

from agents.errors import ConfigError

__all__ = ["read_key_lines"]


def read_key_lines(path: str | os.PathLike[str], key: str) -> tuple[bytes, ...]:
    """The file's non-blank lines, stripped, current key first; ConfigError naming ``key``
    when it cannot be read, is not private (mode 0600 or stricter) or holds no line."""
    try:
        with open(path, "rb") as file:
            mode = os.fstat(file.fileno()).st_mode
            data = file.read()
    except OSError as exc:
        raise ConfigError(key, f"{os.fspath(path)} cannot be read: {exc.strerror}") from exc
    if stat.S_IMODE(mode) & 0o077:
        raise ConfigError(key, f"{os.fspath(path)} must be mode 0600 (no group/other access)")
    lines = tuple(line.strip() for line in data.splitlines() if line.strip())
    if not lines:
        raise ConfigError(key, f"{os.fspath(path)} is empty")
    return lines
