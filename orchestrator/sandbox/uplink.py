"""The sandbox's Ceph and libvirt, reached from inside a guest: SSH remote port forwards.

The sandbox cluster listens on the host's loopback only (:mod:`orchestrator.sandbox.ceph`),
and libvirtd on its unix socket: a coordinator installed in a guest (``rbdfleet coordinator
install``) reaches neither, where in a real cloud the coordinator hosts sit on Ceph's public
network and reach the hypervisors over ``qemu+ssh``/``qemu+tls``. An :class:`Uplink` stands
in for that network: one SSH connection to the guest (the sandbox's pinned client key) asks
the guest's sshd to listen on the guest's 127.0.0.1 on

* the mon's v2 and v1 ports and every OSD's public ports, the same numbers as on the host,
  each carried to the host's 127.0.0.1 on that port: the guest's Ceph clients use the
  cluster's own addresses (``mon_host``, the OSD map) unchanged;
* :data:`LIBVIRT_PORT`, carried to libvirtd's unix socket: the guest reaches the host's
  libvirtd as ``qemu+tcp://127.0.0.1:16509/system`` (:data:`LIBVIRT_URI`; only the guest's own
  processes can connect to its loopback).

The connection is kept (:class:`~orchestrator.adapters.ssh.RemoteForwards`): when it drops
(the guest rebooted, or was powered off) it is made again every second until the guest
answers, and the forwards asked for again, so a rebooted coordinator host finds its Ceph and
libvirt again as a real one would. OSD ports are read again at each connection (an OSD
restarted since may listen elsewhere).
"""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

from orchestrator.errors import SandboxError
from orchestrator.services import remote_forwards

__all__ = ["LIBVIRT_PORT", "LIBVIRT_SOCKET", "LIBVIRT_URI", "Uplink", "ceph_ports"]

LIBVIRT_PORT = 16509
LIBVIRT_URI = f"qemu+tcp://127.0.0.1:{LIBVIRT_PORT}/system"
LIBVIRT_SOCKET = Path("/run/libvirt/libvirt-sock")

Opener = Callable[[], socket.socket]


def ceph_ports(conf: Path, mon_ports: Sequence[int]) -> list[int]:
    """The mon's ports and every OSD's public ports (``ceph osd dump``), sorted."""
    done = subprocess.run(["ceph", "--conf", str(conf), "osd", "dump", "--format", "json"],
                          capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise SandboxError(f"ceph osd dump: {done.stderr.strip()[-400:]}")
    ports = set(mon_ports)
    for osd in json.loads(done.stdout).get("osds", []):
        for addr in osd.get("public_addrs", {}).get("addrvec", []):
            ports.add(int(addr["addr"].rsplit(":", 1)[1]))
    return sorted(ports)


def _tcp(port: int) -> Opener:
    return lambda: socket.create_connection(("127.0.0.1", port), timeout=10)


def _unix(path: Path) -> Opener:
    def open_socket() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(path))
        return sock

    return open_socket


class Uplink:
    """Ceph and libvirt forwarded into one guest, kept across its reboots (module
    docstring); a context manager."""

    def __init__(self, address: str, key: Path, known_hosts: Path, ceph_conf: Path,
                 mon_ports: Sequence[int], *, user: str = "root",
                 libvirt_socket: Path = LIBVIRT_SOCKET) -> None:
        def forwards() -> dict[int, Opener]:
            ports: dict[int, Opener] = {p: _tcp(p) for p in ceph_ports(ceph_conf, mon_ports)}
            ports[LIBVIRT_PORT] = _unix(libvirt_socket)
            return ports

        self.address = address
        self._forwards = remote_forwards(address, user, key, known_hosts, forwards)

    def __enter__(self) -> Uplink:
        self._forwards.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._forwards.close()

    @property
    def connections(self) -> int:
        """How often the forwards were set up (1, plus one per reconnection)."""
        return self._forwards.connections

    def wait_connected(self, timeout: float) -> None:
        """Until the forwards are in place; SandboxError after ``timeout``."""
        if not self._forwards.connected.wait(timeout):
            raise SandboxError(f"uplink to {self.address}: no SSH connection in {timeout:g} s")
