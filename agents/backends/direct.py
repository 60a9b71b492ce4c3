"""BlockDevice on the guest's shared disk: O_DIRECT required (no page cache between the VM and
the image, so a reader sees the writer's blocks), page-aligned buffers, and the disk found by
its libvirt ``<serial>`` (``/sys/block/*/serial``), never by ``/dev/vdX`` order, which follows
probe order and changes across hot-plugs.

Errors: EROFS/EPERM (a ``<readonly/>`` attach), EIO (a fenced writer) become
``DeviceError(op, errno)`` with the errno kept.
"""

from __future__ import annotations

from pathlib import Path

from agents.backends.file import FileDevice
from agents.errors import NotFound

__all__ = ["DirectDevice", "find_device_by_serial"]


class DirectDevice(FileDevice):
    """The shared disk opened with O_DIRECT (refused, not silently buffered, if it cannot)."""

    def __init__(self, path: str | Path, read_only: bool = False) -> None:
        super().__init__(path, read_only, direct=True)


def find_device_by_serial(serial: str, sys_block: Path = Path("/sys/block")) -> Path:
    """``/dev/NAME`` of the disk whose ``/sys/block/NAME/serial`` equals ``serial``.

    Raises NotFound when no disk (or more than one) carries it: a duplicate serial would make
    the choice of disk a guess.
    """
    matches: list[str] = []
    for entry in sorted(sys_block.iterdir()) if sys_block.is_dir() else []:
        try:
            found = (entry / "serial").read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            continue
        if found == serial:
            matches.append(entry.name)
    if len(matches) != 1:
        raise NotFound(
            f"{'no' if not matches else len(matches)} disk(s) with serial {serial!r} "
            f"under {sys_block}",
            serial=serial,
            matches=matches,
        )
    return Path("/dev") / matches[0]
