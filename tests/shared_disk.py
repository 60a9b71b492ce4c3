"""One image file, one loop device per node: the file backend's stand-in for per-VM disks.

Every node (agent) opens the shared image through its own loop device (direct I/O on the
backing file, so all of them see the same bytes), as every VM sees the shared RBD image
through its own attachment. That gives the file backend what the VM path has:

* readers' devices are read-only (``blockdev --setro``: the kernel refuses every write with
  EPERM, checked at write time, even on a descriptor opened read-write) — the
  ``<readonly/>`` attach;
* :meth:`LoopAttachments.make_writer` / :meth:`~LoopAttachments.make_reader` turn a node's
  device read-write / read-only — the role switch;
* :meth:`LoopAttachments.fence` turns the node's device read-only — a fence of exactly that
  node that does not need the node's cooperation, its network or its death: its process
  lives on, and its next write fails with EPERM (on RBD: blocklist, then EIO/ESHUTDOWN).

Devices are made with ``losetup --find --show`` and detached by name on :meth:`close`, only
when they still point at our image.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.errors import DeviceAttachError, FencingFailed


def _run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout.strip()


@dataclass
class LoopAttachments:
    """Per-node loop devices over ``image``; a Fencer and a RoleSwitch for the coordinator."""

    image: Path
    devices: dict[str, str] = field(default_factory=dict)
    fenced: list[tuple[str, str, float]] = field(default_factory=list)  # node, device, time

    def attach(self, node: str, *, writable: bool) -> str:
        """A new loop device of ``node`` (read-only unless ``writable``); its path."""
        device = _run("losetup", "--find", "--show", "--direct-io=on", str(self.image))
        self.devices[node] = device
        # Always set: a device's read-only flag outlives its detach, into the next attach.
        _run("blockdev", "--setrw" if writable else "--setro", device)
        return device

    def backend(self, node: str) -> str:
        """The agent backend spec of ``node``'s device."""
        return f"file:{self.devices[node]}"

    def read_only(self, node: str) -> bool:
        """Whether ``node``'s device refuses writes."""
        return _run("blockdev", "--getro", self.devices[node]) == "1"

    def fence(self, vm: str) -> list[str]:
        """Fencer port: ``vm``'s device refuses every later write; returns the device."""
        device = self.devices[vm]
        try:
            _run("blockdev", "--setro", device)
        except RuntimeError as exc:
            raise FencingFailed(f"fence {vm}: {exc}") from exc
        self.fenced.append((vm, device, time.monotonic()))
        return [device]

    def make_writer(self, node: str) -> None:
        """RoleSwitch port: ``node``'s device becomes read-write."""
        self._switch(node, "--setrw")

    def make_reader(self, node: str) -> None:
        """RoleSwitch port: ``node``'s device becomes read-only."""
        self._switch(node, "--setro")

    def _switch(self, node: str, flag: str) -> None:
        try:
            _run("blockdev", flag, self.devices[node])
        except RuntimeError as exc:
            raise DeviceAttachError(f"{flag} of {node}'s device: {exc}") from exc

    def close(self) -> list[str]:
        """Detach every device still backed by our image; the errors (empty: clean)."""
        errors = []
        for node, device in list(self.devices.items()):
            try:
                backing = _run("losetup", "--noheadings", "--output", "BACK-FILE", device)
                if Path(backing).resolve() == self.image.resolve():
                    _run("blockdev", "--setrw", device)  # the next user expects a writable one
                    _run("losetup", "--detach", device)
                del self.devices[node]
            except RuntimeError as exc:
                errors.append(f"{node} {device}: {exc}")
        return errors
