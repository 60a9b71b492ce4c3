"""`make demo`: bring up the sandbox and run the whole mission on it, leaving it running.

1. ``rbdfleet provision``: the shared RBD image, writer read-write, readers ``<readonly/>``;
2. ``rbdfleet deploy``: the agents into the VMs over SSH (pinned host keys), each on the disk
   found by its serial; the writer formats the blank image (``format --if-blank``);
3. ``rbdfleet coordinator run`` in the background, state in RADOS, fencing by Ceph blocklist
   and role switch through libvirt;
4. ``rbdfleet put`` / ``get`` / ``status``;
5. a compromised reader VM, as root over SSH: its raw write to the shared disk is refused
   (``<readonly/>``), and grants it mints with its own agent key (from the installed agent's
   config) get a PUT on the writer, a push to another reader (with its fleet certificate), a
   demote of the writer and a promote of another reader refused (401/403); the image, the map
   and every file are unchanged afterwards;
6. the writer's agent is killed (``kill -9`` in its VM) while a stale writer process in that
   VM keeps writing to the shared disk: the coordinator fences it, switches roles, promotes a
   reader; ``rbdfleet put`` works again, the stale writer's next write fails with EIO, its
   marker (aimed at the first block of ``/demo/hello.bin``) never reaches the image, and every
   acknowledged file reads back intact;
7. a reader's agent is killed (``kill -9``): systemd starts it again and the node rejoins in
   sync with no command from anyone.

Usage: python -m orchestrator.sandbox.demo [--dir DIR] [--vms N]
:class:`Mission` holds the steps; ``tests/integration/test_mission_vm.py`` asserts the same.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agents.core.superblock import SLOTS, choose
from agents.device import ALIGN
from agents.errors import RbdfleetError
from agents.fsck import open_image
from agents.service import UNIT_NAME
from orchestrator.client import FleetClient
from orchestrator.config import FleetConfig
from orchestrator.core.disks import fleet_serial
from orchestrator.core.remote import Executable, RemoteCommand, shell_script
from orchestrator.deploy import AgentLayout
from orchestrator.errors import SandboxError
from orchestrator.sandbox import lifecycle, processes
from orchestrator.sandbox.state import StateFile
from orchestrator.services import Services

Say = Callable[[str], None]

# In the old writer's VM: keep writing to the shared disk through the handle it holds, one
# 4 KiB block (an acknowledged file's first block) rewritten with the bytes it holds, until
# told the failover is over (STALE_GO exists); from then on it writes its own marker there,
# which is what a deposed writer's late write would do. Before that its writes must change
# nothing: until the fence nothing stops them, and the agent still owns the image. Prints the
# errno of its first failed write.
_STALE_WRITER = r'''
import errno, mmap, os, sys, time
serial, offset, go = sys.argv[1], int(sys.argv[2]), sys.argv[3]
names = [n for n in sorted(os.listdir("/sys/block"))
         if os.path.exists("/sys/block/%s/serial" % n)
         and open("/sys/block/%s/serial" % n).read().strip() == serial]
fd = os.open("/dev/" + names[0], os.O_RDWR | os.O_DIRECT)
block = mmap.mmap(-1, 4096)
done, marked, marking = 0, 0, False
print("stale writer on /dev/%s started, aimed at byte %d" % (names[0], offset), flush=True)
while True:
    try:
        if not marking and os.path.exists(go):
            block.seek(0)
            block.write((b"STALE WRITER MARKER " * 205)[:4096])
            marking = True
            print("told the failover is over: writing its marker from now on", flush=True)
        elif not marking:
            os.preadv(fd, [block], offset)
        os.pwritev(fd, [block], offset)
    except OSError as exc:
        print("write failed errno=%d %s after %d writes (%d of them its marker)" % (
            exc.errno, errno.errorcode.get(exc.errno, "?"), done, marked), flush=True)
        break
    done += 1
    marked += marking
    time.sleep(0.01)
'''
STALE_LOG = "/tmp/rbdfleet-stale-writer.log"
STALE_GO = "/tmp/rbdfleet-stale-writer.go"

# In a reader's VM, as root: every request its own credentials can make on another node. The
# only agent key in the VM is this node's own (from the installed agent's config); each grant
# below is minted with it for another node, as an intruder would. Node-only routes also get
# this node's fleet certificate, so what refuses them is the grant. One JSON line per request.
_COMPROMISED_READER = r'''
import http.client, json, ssl, sys, time
sys.path.insert(0, sys.argv[1])
from agents.core.grants import Grant, sign
from agents.daemon import load_config, read_keys
config = load_config(sys.argv[2], {})
key = read_keys(config.secret_file)[0]
context = ssl.create_default_context(cafile=config.tls_ca)
context.load_cert_chain(config.tls_cert, config.tls_key)
for what, node, address, method, path, purpose, subject, epoch, body in json.loads(sys.argv[3]):
    grant = sign(Grant(fleet=config.fleet, audience=node, purpose=purpose, epoch=epoch,
                       expires=time.time() + 60, subject=subject), key)
    host, _, port = address.rpartition(":")
    conn = http.client.HTTPSConnection(host, int(port), timeout=20, context=context)
    try:
        conn.request(method, path, body=body.encode(),
                     headers={"Authorization": "Bearer " + grant})
        resp = conn.getresponse()
        raw = resp.read()
        try:
            error = json.loads(raw).get("error", "")
        except ValueError:
            error = raw[:80].decode("utf-8", "replace")
        status = resp.status
    except OSError as exc:
        status, error = 0, "%s: %s" % (type(exc).__name__, exc)
    finally:
        conn.close()
    print(json.dumps({"what": what, "request": "%s https://%s%s" % (method, address, path),
                      "grant": "%s grant for %s signed with %s's key" % (
                          purpose, node, config.node),
                      "status": status, "error": error}), flush=True)
'''
REFUSED = (401, 403)
# A read-only block device refuses a write at open (EROFS) or at the write (EPERM, EACCES).
READ_ONLY_ERRORS = ("Read-only file system", "Operation not permitted", "Permission denied")
_MARKER = "COMPROMISED READER "


LOCATE_WINDOW = 64 << 20  # where the first put lands (first fit from the data area's start)


def sha256(data: bytes) -> str:
    """Hex digest, for narration and comparisons."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class ImageBlock:
    """4 KiB of the image holding an acknowledged file's bytes: where a stray write does harm
    that the file's checksum and the image's bytes show."""

    path: str
    offset: int
    data: bytes


@dataclass(frozen=True)
class Snapshot:
    """What a write that got through would change: the map's epoch, writer and roles, every
    byte of the image, the listing of /demo."""

    epoch: int
    writer: str
    roles: tuple[tuple[str, str], ...]
    image: str
    listing: tuple[str, ...]


@dataclass
class Mission:
    """The mission's steps on one fleet config; each returns what it measured or found."""

    config_path: Path
    state: StateFile
    say: Say = print
    timings: dict[str, float] = field(default_factory=dict)
    echo_cli: bool = True
    files: dict[str, str] = field(default_factory=dict)  # acknowledged: path -> sha256
    landmark: ImageBlock | None = None  # the first block of the first put's file

    def __post_init__(self) -> None:
        self.services = Services(self.config_path)
        self.config: FleetConfig = self.services.config
        self.shell = self.services.shell

    def close(self) -> None:
        """Close SSH connections (the fleet keeps running)."""
        self.services.close()

    # -- the CLI, as a user runs it -----------------------------------------------------

    def cli(self, *args: str, timeout: float = 300.0, check: bool = True,
            progress: bool = False) -> subprocess.CompletedProcess[str]:
        """Run ``rbdfleet ARGS`` (config from ``RBDFLEET_CONFIG``) as a subprocess, echoing
        the command and its output (stderr too with ``progress``, or when it fails)."""
        argv = [sys.executable, "-m", "orchestrator.cli.app", *args]
        env = {**os.environ, "RBDFLEET_CONFIG": str(self.config_path)}
        if self.echo_cli:
            self.say("$ rbdfleet " + shlex.join(args))
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout,
                              check=False)
        if self.echo_cli:
            shown = done.stderr if progress or done.returncode else ""
            for line in (shown + done.stdout).rstrip().splitlines():
                print(f"    {line}", flush=True)
        if check and done.returncode != 0:
            raise SandboxError(f"rbdfleet {' '.join(args)} exited {done.returncode}: "
                               f"{done.stderr.strip()[-600:]}")
        return done

    def timed(self, name: str, func: Callable[[], Any]) -> Any:
        """Run ``func`` and keep its wall time under ``name``."""
        started = time.monotonic()
        result = func()
        self.timings[name] = round(time.monotonic() - started, 2)
        return result

    # -- steps 1-3 ----------------------------------------------------------------------

    def provision(self) -> None:
        """Step 1: image, cephx users, attach (writer rw, readers ro)."""
        self.timed("provision", lambda: self.cli("provision"))
        self.cli("vm", "list")

    def deploy(self) -> None:
        """Step 2: agents into the VMs; the writer formats the blank image."""
        self.timed("deploy", lambda: self.cli("deploy", progress=True))

    def start_coordinator(self, log: Path) -> int:
        """Step 3: ``rbdfleet coordinator run`` in the background, recorded in the state
        file (``sandbox down`` stops it); waits until it serves every member in sync."""
        argv = [sys.executable, "-m", "orchestrator.cli.app", "coordinator", "run",
                "--config", str(self.config_path)]
        self.say("$ rbdfleet coordinator run &   (log: " + str(log) + ")")
        pid = processes.start_process(self.state, argv, log=log,
                                      marker=str(self.config_path))
        readers = len(self.config.active_vms) - 1
        started = time.monotonic()
        self.wait(lambda: len(self._map().get("members", [])) > 0 and sum(
            1 for m in self._map()["members"] if m["role"] == "reader" and m["in_sync"])
            == readers, 120, f"the coordinator serving {readers} in-sync readers "
                             f"(see {log})")
        self.timings["coordinator_ready"] = round(time.monotonic() - started, 2)
        return pid

    def tls_summary(self) -> str:
        """What protects the fleet's traffic, from its config and the running coordinator."""
        urls = sorted({m["address"] for m in self.fleet_map().get("members", [])})
        ca = self.config.pki_dir / "ca.pem"
        return (f"coordinator {self.services.coordinator.urls[0]}, agents "
                f"{', '.join(urls)} serve HTTPS under the fleet CA {ca}; pushes, reports and "
                "role changes present the nodes' certificates (mutual TLS)")

    def client(self, timeout: float = 60.0) -> FleetClient:
        """A library client following the coordinators of the config."""
        return self.services.fleet_client(timeout)

    def _map(self) -> dict[str, Any]:
        try:
            return self.client(5.0).coordinator.map()
        except RbdfleetError:
            return {}

    def fleet_map(self) -> dict[str, Any]:
        """The published map (empty while no coordinator answers)."""
        return self._map()

    def settle(self, timeout: float = 60.0) -> None:
        """Until the writer has nothing left to write at rest (its health says ``settled``:
        idle checkpoints done, journal space given back), so the image changes only with
        the next write; SandboxError after ``timeout``. Comparing the image before and after
        something that must not write starts here."""
        control = self.services.agent_control(self.services.transport())
        port = self.config.fleet.agent_port
        last: list[str] = ["no writer in the map"]  # said in the error: what was still left

        def settled() -> bool:
            writer = self._map().get("writer")
            if not writer:
                return False
            try:
                health = control.health(f"{self.config.vm(writer).address}:{port}", 5.0)
            except RbdfleetError as exc:
                last[0] = f"{writer}: {exc}"
                return False
            last[0] = (f"{writer}: role {health.role}, left {list(health.unsettled)}, in sync "
                       f"{list(health.in_sync)}, lagging {list(health.lagging)}")
            return health.role == "writer" and health.settled
        try:
            self.wait(settled, timeout, "the writer to settle (nothing left to write at rest)")
        except SandboxError as exc:
            raise SandboxError(f"{exc}; last seen: {last[0]}") from None

    @staticmethod
    def wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll ``predicate`` every 0.2 s; SandboxError naming ``what`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise SandboxError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.2)

    # -- step 4 -------------------------------------------------------------------------

    def put_get(self, workdir: Path, size: int = 4 << 20) -> str:
        """Step 4: ``rbdfleet put`` a file, ``get`` it back from a reader; its sha256."""
        local = workdir / "hello.bin"
        local.write_bytes(os.urandom(size))
        self.timed("first_put", lambda: self.cli("put", str(local), "/demo/hello.bin"))
        back = workdir / "hello.back"
        self.cli("get", "/demo/hello.bin", str(back))
        if back.read_bytes() != local.read_bytes():
            raise SandboxError("rbdfleet get returned other bytes than were put")
        digest = sha256(local.read_bytes())
        self.say(f"read back from a reader: sha256 {digest[:16]}... identical")
        back.unlink()
        self.files["/demo/hello.bin"] = digest
        self.landmark = self.locate("/demo/hello.bin", local.read_bytes()[:ALIGN])
        self.cli("status")
        return digest

    def put_many(self, count: int, prefix: str = "/demo/acked") -> dict[str, str]:
        """``count`` small acknowledged puts through the library: path -> sha256."""
        client, acked = self.client(), {}
        for i in range(count):
            data = os.urandom(4096 + i)
            client.put_bytes(data, f"{prefix}-{i:03d}.bin")
            acked[f"{prefix}-{i:03d}.bin"] = sha256(data)
        self.files.update(acked)
        return acked

    def verify(self, acked: dict[str, str]) -> list[str]:
        """Paths whose read differs from what was acknowledged (empty: none lost)."""
        client = self.client()
        return [p for p, digest in sorted(acked.items()) if sha256(client.get_bytes(p)) != digest]

    # -- the image, read from the admin host ------------------------------------------------

    @property
    def serial(self) -> str:
        """The fleet disk's serial, the same in every VM."""
        return fleet_serial(self.config.fleet.name, self.config.ceph.pool,
                            self.config.fleet.image)

    def _read_image(self, reads: Callable[[Any], Any]) -> Any:
        """``reads(device)`` on a read-only handle of the fleet's image (the admin's Ceph
        user, as ``fsck`` opens it)."""
        ceph = self.config.ceph
        device = open_image(f"rbd:{ceph.pool}/{self.config.fleet.image}", conf=str(ceph.conf),
                            user=ceph.user, keyring=str(ceph.keyring))
        try:
            return reads(device)
        finally:
            device.close()

    def image_digest(self) -> str:
        """SHA-256 of every byte of the image."""
        def digest(device: Any) -> str:
            total, piece = hashlib.sha256(), 4 << 20
            for offset in range(0, device.size(), piece):
                total.update(device.read_at(offset, min(piece, device.size() - offset)))
            return total.hexdigest()
        result: str = self._read_image(digest)
        return result

    def image_block(self, offset: int) -> bytes:
        """The 4 KiB of the image at ``offset``."""
        data: bytes = self._read_image(lambda device: device.read_at(offset, ALIGN))
        return data

    def locate(self, path: str, first: bytes) -> ImageBlock:
        """Where the file ``path``, whose first 4 KiB are ``first``, starts on the image: found
        by its bytes near the start of the data area (the superblock says where it is)."""
        def window(device: Any) -> tuple[int, bytes]:
            sb = choose([device.read_at(slot, ALIGN) for slot in SLOTS])
            return sb.data_offset, device.read_at(sb.data_offset,
                                                  min(LOCATE_WINDOW, sb.data_bytes))
        start, data = self._read_image(window)
        for at in range(0, len(data), ALIGN):
            if data[at:at + ALIGN] == first:
                return ImageBlock(path, start + at, first)
        raise SandboxError(f"the first block of {path} is not in the first "
                           f"{LOCATE_WINDOW >> 20} MiB of the data area")

    def aim(self) -> ImageBlock:
        """The block a stray write is aimed at: the first block of the first put's file
        (``put_get``), or of one put now for the purpose when there is none yet."""
        if self.landmark is None:
            data = os.urandom(1 << 20)
            self.client().put_bytes(data, "/stale-target.bin")
            self.files["/stale-target.bin"] = sha256(data)
            self.landmark = self.locate("/stale-target.bin", data[:ALIGN])
        return self.landmark

    def snapshot(self) -> Snapshot:
        """The map's epoch, writer and roles, the image's digest, the listing of /demo."""
        fleet_map = self._map()
        listing = [json.dumps(entry, sort_keys=True)
                   for page in self.client().ls_pages("/demo") for entry in page["entries"]]
        return Snapshot(fleet_map["epoch"], fleet_map["writer"],
                        tuple(sorted((m["name"], m["role"]) for m in fleet_map["members"])),
                        self.image_digest(), tuple(listing))

    # -- step 5 -------------------------------------------------------------------------

    def _agent_address(self, vm: str) -> str:
        return f"{self.config.vm(vm).address}:{self.config.fleet.agent_port}"

    def raw_write_from(self, vm: str, target: ImageBlock) -> str:
        """As root in ``vm``: ``dd`` a marker block over ``target`` on the fleet disk (found
        by its serial), O_DIRECT; its error, or SandboxError if it did not fail with one of a
        read-only device's."""
        host = self.config.vm(vm)
        device = self.shell.run(host, shell_script(
            f'for b in /sys/block/*; do if [ "$(cat $b/serial 2>/dev/null)" = {self.serial} ]; '
            'then echo /dev/${b##*/}; fi; done'), check=True).stdout.strip()
        if not device.startswith("/dev/") or "\n" in device:
            raise SandboxError(f"{vm}: no single disk with serial {self.serial}: {device!r}")
        dd = (f"dd if=/tmp/rbdfleet-marker of={device} bs={ALIGN} seek={target.offset // ALIGN}"
              " count=1 oflag=direct conv=notrunc status=none")
        self.say(f"$ ssh {vm} '{dd}'   (the first block of {target.path})")
        done = self.shell.run(host, shell_script(
            f"yes {shlex.quote(_MARKER)} | head -c {ALIGN} > /tmp/rbdfleet-marker && {dd}"))
        error = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or [""]
        print(f"    {error[0]} (exit {done.rc})", flush=True)
        if done.rc == 0 or not any(e in error[0] for e in READ_ONLY_ERRORS):
            raise SandboxError(f"{vm}: a raw write to the shared disk was not refused as on a "
                               f"read-only device: exit {done.rc}, {error[0]!r}")
        return error[0]

    def forged_requests_from(self, vm: str) -> list[dict[str, Any]]:
        """As root in ``vm``, with grants minted with ``vm``'s own agent key: a read on its own
        agent (accepted: the grants are well made, only the key decides), then a PUT on the
        writer, a push to another reader, a demote of the writer and a promote of another
        reader; the answers, or SandboxError unless the read got 200 and the rest 401/403."""
        fleet_map, readable = self._map(), self.aim().path
        writer, epoch = fleet_map["writer"], fleet_map["epoch"]
        other = next(m["name"] for m in fleet_map["members"]
                     if m["role"] == "reader" and m["name"] != vm)
        attempts = [
            ("control, a read on its own agent", vm, self._agent_address(vm), "GET",
             f"/v1/stat{readable}", "read", "", epoch, ""),
            ("a PUT on the writer", writer, self._agent_address(writer), "PUT",
             "/v1/files/demo/compromised.bin", "write", vm, epoch, _MARKER),
            ("a push to another reader, as the writer", other, self._agent_address(other),
             "POST", "/v1/records", "push", writer, epoch, "{}"),
            ("a demote of the writer", writer, self._agent_address(writer), "POST",
             "/v1/demote", "demote", "", epoch + 1, "{}"),
            ("a promote of another reader", other, self._agent_address(other), "POST",
             "/v1/promote", "promote", "", epoch + 1, "{}"),
        ]
        layout = AgentLayout("/")
        self.say(f"$ ssh {vm} python3 -c ...   (its key from {layout.config_path}, its "
                 "fleet certificate; agents.core.grants.sign)")
        done = self.shell.run(self.config.vm(vm), RemoteCommand(Executable.PYTHON3, [
            "-c", _COMPROMISED_READER, layout.current, layout.config_path,
            json.dumps(attempts)]), timeout=180)
        if done.rc != 0:
            raise SandboxError(f"{vm}: the forged requests did not run: {done.stderr[-600:]}")
        answers = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
        for answer in answers:
            print(f"    {answer['what']}: {answer['request']} ({answer['grant']}) -> "
                  f"{answer['status']} {answer['error']}", flush=True)
        statuses = [a["status"] for a in answers]
        if (len(answers) != len(attempts) or statuses[0] != 200
                or not all(s in REFUSED for s in statuses[1:])):
            raise SandboxError(f"{vm}: expected its own read accepted and every forged request "
                               f"refused (401/403): {answers}")
        return answers

    def compromised_reader(self, vm: str) -> Snapshot:
        """Step 5: what root in reader ``vm`` cannot do with what the VM holds (its read-only
        disk, its agent's key and certificate); the snapshot, the same before and after, or
        SandboxError."""
        target = self.aim()
        self.settle()
        before = self.snapshot()
        self.raw_write_from(vm, target)
        self.forged_requests_from(vm)
        after = self.snapshot()
        if after != before:
            raise SandboxError(f"the fleet changed after {vm}'s refused requests: "
                               f"{before} -> {after}")
        lost = self.verify(self.files)
        if lost:
            raise SandboxError(f"files changed after {vm}'s refused requests: {lost}")
        self.say(f"unchanged: epoch {after.epoch}, writer {after.writer}, image sha256 "
                 f"{after.image[:16]}..., all {len(self.files)} files' sha256, /demo's "
                 f"{len(after.listing)} entries")
        return after

    # -- step 6 -------------------------------------------------------------------------

    def start_stale_writer(self, vm: str) -> int:
        """In ``vm``, a process that keeps writing to the shared disk through the handle it
        holds now (as the old writer would), over the block :meth:`aim` names:
        its own bytes until :meth:`end_failover` tells it the failover is over, its marker
        after; it logs the errno of its first failed write."""
        target = self.aim()
        host = self.config.vm(vm)
        self.shell.run(host, RemoteCommand(Executable.RM, ["-f", STALE_LOG, STALE_GO]),
                       check=True)
        pid = self.shell.start_background(
            host, RemoteCommand(Executable.PYTHON3, [
                "-c", _STALE_WRITER, self.serial, str(target.offset), STALE_GO]),
            workdir="/tmp", log_path=STALE_LOG)
        self.wait(lambda: "started" in self.stale_writer_log(vm), 30, "the stale writer")
        return pid

    def stale_writer_log(self, vm: str) -> str:
        """What the stale writer in ``vm`` printed so far."""
        result = self.shell.run(self.config.vm(vm), RemoteCommand(Executable.CAT, [STALE_LOG]))
        return result.stdout

    def end_failover(self, vm: str) -> None:
        """Tell the stale writer in ``vm`` the new writer is in charge: from now on a write
        of its that lands is one after the failover (its marker over a file's first block)."""
        self.shell.run(self.config.vm(vm), shell_script(f": > {STALE_GO}"), check=True)

    def landmark_intact(self) -> str:
        """What the image holds where the stale writer aimed; SandboxError if it is not the
        file's bytes any more."""
        target = self.aim()
        now = self.image_block(target.offset)
        if now != target.data:
            raise SandboxError(f"the image's byte {target.offset} ({target.path}'s first block)"
                               f" was overwritten: {now[:24]!r}...")
        return (f"byte {target.offset} of the image still holds {target.path}'s first block "
                f"(sha256 {sha256(now)[:16]}...)")

    def stale_write_outcome(self, vm: str) -> str:
        """The stale writer's failed write, explained: EIO is the Ceph fence (its QEMU client
        blocklisted); ENOSPC/ENXIO mean the role switch had already pulled the disk away."""
        line = self.stale_writer_log(vm).strip().splitlines()[-1]
        if "errno=5 " in line:
            return f"{line}: fenced, its QEMU's Ceph client is blocklisted"
        return f"{line}: its read-write disk was already detached by the role switch"

    def fenced_addresses(self, vm: str, log: Path) -> list[str]:
        """The client addresses the coordinator blocklisted for ``vm`` (from its log)."""
        marker = f"fenced vm={vm} addr="
        return [line.split(marker, 1)[1].split()[0] for line in log.read_text().splitlines()
                if marker in line]

    def kill_agent(self, vm: str) -> None:
        """``kill -9`` the agent in ``vm`` (a crash, no goodbye)."""
        pidfile = AgentLayout("/").pidfile
        self.say(f"$ ssh {vm} 'kill -9 $(cat {pidfile})'")
        self.shell.run(self.config.vm(vm), shell_script(f"kill -9 $(cat {pidfile})"),
                       check=True)

    def rejoin(self, vm: str) -> None:
        """``rbdfleet deploy`` again: ``vm``'s stopped agent comes back as a reader (roles
        from the coordinator's map) and catches up until the coordinator has it in sync."""
        self.timed("rejoin", lambda: self.cli("deploy", progress=True))
        self.wait(lambda: any(m["name"] == vm and m["role"] == "reader" and m["in_sync"]
                              for m in self._map().get("members", [])), 120,
                  f"{vm} back as an in-sync reader")

    def crash_and_self_heal(self, vm: str) -> None:
        """``kill -9`` ``vm``'s agent and show systemd starting it again and the node back in
        sync, with no command from anyone (timing ``self_heal``)."""
        host = self.config.vm(vm)

        def service() -> str:
            return self.shell.run(host, RemoteCommand(Executable.SYSTEMCTL, [
                "show", "-p", "MainPID", "-p", "NRestarts", UNIT_NAME]), check=True).stdout

        before = service()
        self.kill_agent(vm)
        killed = time.monotonic()
        self.wait(lambda: (now := service()) != before and "MainPID=0" not in now, 60,
                  f"systemd restarting {vm}'s agent")
        self.say(f"$ ssh {vm} systemctl status {UNIT_NAME}")
        status = self.shell.run(host, RemoteCommand(Executable.SYSTEMCTL, [
            "status", "--no-pager", "-n", "4", UNIT_NAME]))
        for line in status.stdout.rstrip().splitlines():
            print(f"    {line}", flush=True)
        self.wait(lambda: any(m["name"] == vm and m["role"] == "reader" and m["in_sync"]
                              for m in self._map().get("members", [])), 120,
                  f"{vm} back as an in-sync reader")
        self.timings["self_heal"] = round(time.monotonic() - killed, 2)
        self.cli("status")

    def _time_new_writer(self, old: str, killed: float) -> None:
        """Poll the map every 50 ms: seconds from the kill until another writer is announced
        (``failover_announced``), the coordinator's part of the failover."""
        client = self.client(5.0)
        deadline = killed + 120
        while time.monotonic() < deadline:
            try:
                current = client.coordinator.map()
            except RbdfleetError:
                current = {}
            if current.get("writer") not in (None, old) and current.get("phase") == "stable":
                self.timings["failover_announced"] = round(time.monotonic() - killed, 2)
                return
            time.sleep(0.05)

    def fail_over(self, workdir: Path) -> dict[str, Any]:
        """Step 5: kill the writer's agent, time until ``rbdfleet put`` is acknowledged by a
        new writer; the new map."""
        old = self.config.fleet.writer
        local = workdir / "after-failover.bin"
        local.write_bytes(os.urandom(1 << 20))
        self.kill_agent(old)
        killed = time.monotonic()
        watcher = threading.Thread(target=self._time_new_writer, args=(old, killed),
                                   daemon=True)
        watcher.start()
        done = self.cli("put", "--timeout", "120", str(local), "/demo/after-failover.bin",
                        "--json", timeout=180)
        self.timings["failover_put"] = round(time.monotonic() - killed, 2)
        watcher.join(60)
        ack = json.loads(done.stdout)
        self.files["/demo/after-failover.bin"] = sha256(local.read_bytes())
        self.wait(lambda: self._map().get("phase") == "stable", 60, "a stable map")
        new_map = self._map()
        if ack.get("node") == old or new_map.get("writer") in (None, old):
            raise SandboxError(f"no new writer after killing {old}'s agent: {new_map}")
        return new_map


def run_mission(directory: Path, say: Say) -> dict[str, float]:
    """Steps 1-7 on the sandbox in ``directory``; the timings."""
    config_path = directory / "rbdfleet.toml"
    state = StateFile(lifecycle.state_path(directory))
    mission = Mission(config_path, state, say)
    try:
        writer = mission.config.fleet.writer
        say("step 1/7: provision the shared RBD image (writer rw, readers <readonly/>)")
        mission.provision()
        say("step 2/7: deploy the agents into the VMs over SSH; the writer formats the image")
        mission.deploy()
        say("step 3/7: start the coordinator (state in RADOS, blocklist fence, libvirt roles)")
        pid = mission.start_coordinator(directory / "coordinator.log")
        say(f"coordinator pid {pid}, ready in {mission.timings['coordinator_ready']} s")
        say(f"TLS on: {mission.tls_summary()}")
        say("step 4/7: put a file, get it from a reader, status")
        mission.put_get(directory)
        acked = mission.put_many(20)
        say(f"{len(acked)} more small puts acknowledged before the failure")
        reader = next(m["name"] for m in mission.fleet_map()["members"]
                      if m["role"] == "reader")
        say(f"step 5/7: reader {reader} compromised (root over SSH): write the shared disk, "
            "and use its own agent key and certificate against the other nodes")
        mission.compromised_reader(reader)
        say(f"step 6/7: kill -9 the writer's agent on {writer}; a stale writer process there "
            "keeps writing to the shared disk, over /demo/hello.bin's first block")
        mission.start_stale_writer(writer)
        new_map = mission.fail_over(directory)
        say(f"new writer {new_map['writer']} at epoch {new_map['epoch']}: announced "
            f"{mission.timings.get('failover_announced', '?')} s and the put acknowledged "
            f"{mission.timings['failover_put']} s (CLI start included) after the kill")
        mission.end_failover(writer)
        mission.wait(lambda: "failed" in mission.stale_writer_log(writer), 30,
                     "the stale writer's failed write")
        say(f"old writer {writer}: {mission.stale_write_outcome(writer)}")
        say(f"its marker never landed: {mission.landmark_intact()}")
        fenced = mission.fenced_addresses(writer, directory / "coordinator.log")
        say(f"blocklisted for {writer}: {', '.join(fenced)}")
        lost = mission.verify(mission.files)
        if lost:
            raise SandboxError(f"acknowledged writes lost: {lost}")
        say(f"all {len(mission.files)} acknowledged files read back intact after the failover")
        mission.cli("vm", "list")
        say(f"bring {writer} back: deploy restarts its agent as a reader of epoch "
            f"{new_map['epoch']}; it catches up from the journal")
        mission.rejoin(writer)
        mission.cli("status")
        crashed = next(m["name"] for m in mission.fleet_map()["members"]
                       if m["role"] == "reader" and m["in_sync"])
        say(f"step 7/7: kill -9 the agent on reader {crashed}: systemd starts it again and the "
            "node rejoins in sync by itself")
        mission.crash_and_self_heal(crashed)
        say(f"{crashed} in sync again {mission.timings['self_heal']} s after the kill")
    finally:
        mission.close()
    return mission.timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=lifecycle.default_dir())
    parser.add_argument("--vms", type=int, default=3)
    args = parser.parse_args(argv)
    directory = args.dir.absolute()
    started = time.monotonic()

    def say(message: str) -> None:
        print(f"demo [{time.monotonic() - started:6.1f}s] {message}", flush=True)

    try:
        if lifecycle.state_path(directory).exists():
            raise SandboxError(f"a sandbox is already recorded in {directory}: the demo runs "
                               f"on a fresh one (make demo-down DEMO_DIR={directory} first)")
        if args.vms < 2:
            raise SandboxError("the mission needs a writer and at least one reader: --vms >= 2")
        say(f"bringing up the sandbox in {directory} (Ceph + {args.vms} VMs)")
        up = lifecycle.up(directory, lifecycle.SandboxRequest(vms=args.vms), progress=say)
        timings = {"sandbox_up": up.timings.get("total", 0.0), **run_mission(directory, say)}
    except RbdfleetError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        print(f"demo: the sandbox is left as it is; stop it with: make demo-down "
              f"DEMO_DIR={directory}", file=sys.stderr)
        return 1
    say("timings (s): " + ", ".join(f"{k} {v}" for k, v in timings.items()))
    say(f"everything keeps running. Try: export RBDFLEET_CONFIG={directory}/rbdfleet.toml; "
        "rbdfleet status")
    say(f"stop it all (coordinator, VMs, Ceph): make demo-down DEMO_DIR={directory}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
