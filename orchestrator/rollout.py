"""Roll a fleet's agents out to its VMs: key, per-VM config, blank volume formatted, start.

The use case behind ``rbdfleet deploy``, over :class:`~orchestrator.deploy.AgentDeployer` (the
per-host install/start/stop machinery) and a :class:`~orchestrator.ports.RemoteShell`:

1. install the agent package and each VM's config (:func:`agent_config`) on every VM;
2. write each VM's OWN key (derived from the fleet's master key, :mod:`orchestrator.coordinator.
   keys`) to ``/etc/rbdfleet/node.key`` (0600); the master never leaves this machine. The
   writer's config also gets push grants for its readers (the coordinator renews them). Its
   TLS material from the fleet's PKI directory (``rbdfleet provision`` made it): its own
   certificate and key (0600) and the fleet CA's certificate; the CA key stays here. Where
   systemd runs the agent the key files are its account's, the certificates root's
   (:meth:`~orchestrator.deploy.AgentDeployer.put_files`);
3. on every VM, wait until the guest sees the shared disk (found by its fleet serial, never
   by ``/dev/vdX`` order); on the writer, with ``format_if_blank``, run
   ``rbdfleet-agent format --if-blank`` through its read-write disk: an all-zero image gets
   an empty volume, this fleet's volume is kept, anything else is refused;
4. start the readers, then the writer (it pushes to them from its first put), and wait
   until every started agent answers ``/v1/health``.

Roles: from the coordinator's map when one answers (its writer and epoch: after a failover
the old writer comes back as a reader), else from ``[fleet] writer`` at epoch 1 (bootstrap).
An agent already running this package version is left alone, whatever its config says:
restarting a live writer would be a failover (to change a running agent's config, undeploy
it first). So a second deploy changes nothing. Spare VMs are not deployed: their disk is
attached only when the coordinator needs them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from agents.core.protocol import Health
from agents.errors import RbdfleetError
from orchestrator.config import FleetConfig
from orchestrator.coordinator.keys import FleetKeys
from orchestrator.core.disks import fleet_serial
from orchestrator.core.remote import Executable, RemoteCommand
from orchestrator.deploy import AgentDeployer, DeployTarget, HostResult
from orchestrator.errors import DeployError, RemoteCommandFailed
from orchestrator.pki import FleetPki
from orchestrator.ports import RemoteShell

LOG = logging.getLogger(__name__)

__all__ = ["GUEST_SECRET", "FleetRollout", "RolloutReport", "agent_config"]

# Where a VM's own key lives in the guest (mode 0600); the agent config names it.
GUEST_SECRET = "/etc/rbdfleet/node.key"
# Its TLS certificate, key (0600) and the fleet CA, where the Ansible role puts them too.
GUEST_TLS = {"cert": "/etc/rbdfleet/agent.crt", "key": "/etc/rbdfleet/agent.key",
             "ca": "/etc/rbdfleet/ca.crt"}

# Waits for the fleet's disk in the guest (hot-plug shows it ~1 s after the attach), then with
# "format" runs `rbdfleet-agent format --if-blank` on it. argv: release serial fleet wait mode.
_DISK = r"""
import sys, time
release, serial, fleet, wait, mode = sys.argv[1:6]
sys.path.insert(0, release)
from agents.backends.direct import find_device_by_serial
from agents.errors import NotFound
deadline = time.monotonic() + float(wait)
while True:
    try:
        print("disk %s" % find_device_by_serial(serial), flush=True)
        break
    except NotFound as exc:
        if time.monotonic() > deadline:
            sys.exit("the fleet's disk is not visible in the guest: %s" % exc)
        time.sleep(0.2)
if mode == "format":
    from agents.daemon import main
    sys.exit(main(["format", "--backend", "device:" + serial, "--fleet", fleet, "--if-blank"]))
"""


def agent_config(cfg: FleetConfig, vm: str, *, coordinators: Sequence[str] = (),
                 writer: str | None = None, epoch: int = 1) -> dict[str, Any]:
    """The agent config (docs/agent.md) of ``vm``: its disk by serial, its role.

    ``writer``/``epoch``: the fleet's current writer (default ``[fleet] writer``) and epoch.
    The agent listens on the VM's address; the writer pushes to every other non-spare VM.
    A spare's agent waits for the disk the coordinator attaches when it replaces a reader.
    TLS with the files :data:`GUEST_TLS` unless the fleet is ``[tls] insecure_plaintext``;
    the timings of ``[agents]`` that are set.
    """
    me = cfg.vm(vm)
    writer = cfg.fleet.writer if writer is None else writer
    port = cfg.fleet.agent_port
    config: dict[str, Any] = {
        "node": me.name,
        "fleet": cfg.fleet.name,
        "backend": "device:" + fleet_serial(cfg.fleet.name, cfg.ceph.pool, cfg.fleet.image),
        "secret_file": GUEST_SECRET,
        "listen": f"{me.address}:{port}",
        "advertise": f"{me.address}:{port}",
        "role": "writer" if me.name == writer else "spare" if me.spare else "reader",
        "epoch": epoch,
        **cfg.agents.settings(),
    }
    if me.name == writer:
        config["readers"] = {
            v.name: f"{v.address}:{port}" for v in cfg.active_vms if v.name != me.name
        }
    if coordinators:  # the active one and its standbys: agents report to whichever is active
        config["coordinator"] = (coordinators[0] if len(coordinators) == 1
                                 else list(coordinators))
    if cfg.tls.insecure_plaintext:
        config["insecure_plaintext"] = True
    else:
        config["tls"] = dict(GUEST_TLS)
    return config


@dataclass
class RolloutReport:
    """What ``deploy`` did: per-VM results, the writer's format outcome, step timings (s)."""

    hosts: dict[str, HostResult] = field(default_factory=dict)
    disks: dict[str, str] = field(default_factory=dict)  # vm -> guest device path
    formatted: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        """Whether anything was installed, configured, formatted or started."""
        return any(r.changed for r in self.hosts.values()) or self.formatted.startswith("formatted")

    def to_json(self) -> dict[str, Any]:
        """Machine-readable form (``rbdfleet deploy --json``)."""
        return {
            "changed": self.changed,
            "formatted": self.formatted,
            "disks": dict(self.disks),
            "timings": dict(self.timings),
            "hosts": {
                name: {
                    "ok": r.ok,
                    "changed": r.changed,
                    "actions": list(r.actions),
                    "pid": r.pid,
                    "version": r.version,
                    "error": r.error,
                    "seconds": r.seconds,
                }
                for name, r in sorted(self.hosts.items())
            },
        }


class FleetRollout:
    """Deploy, stop and inspect the agents of one fleet's VMs (see the module docstring)."""

    def __init__(
        self,
        cfg: FleetConfig,
        shell: RemoteShell,
        deployer: AgentDeployer,
        secret: bytes | tuple[bytes, ...],
        *,
        coordinators: Sequence[str] = (),
        health: Callable[[str, float], Health] | None = None,
        fleet_map: Mapping[str, Any] | None = None,
        disk_wait: float = 60.0,
        ready_wait: float = 120.0,
        progress: Callable[[str], None] = LOG.info,
    ) -> None:
        """``secret``: the fleet's master key(s) (each VM gets its own derived key, never the
        master; nothing is logged); ``coordinators``: the URLs agents report to (the active
        coordinator and its standbys); ``health(address, timeout)`` probes a started agent;
        ``fleet_map``: the coordinator's current map (None at bootstrap)."""
        self.cfg = cfg
        self.shell = shell
        self.deployer = deployer
        self._keys = FleetKeys(cfg.fleet.name, (secret,) if isinstance(secret, bytes) else secret,
                               time.time)
        self.coordinators = coordinators
        self.health = health
        self.writer: str | None = cfg.fleet.writer
        self.epoch = 1
        if fleet_map is not None:
            self.writer, self.epoch = fleet_map.get("writer"), int(fleet_map["epoch"])
        self.disk_wait = disk_wait
        self.ready_wait = ready_wait
        self.progress = progress

    def targets(self) -> list[DeployTarget]:
        """One target per VM, spares included (their agents wait for a disk), writer last."""
        vms = sorted(self.cfg.vms, key=lambda v: v.name == self.writer)
        targets = []
        for vm in vms:
            config = agent_config(self.cfg, vm.name, coordinators=self.coordinators,
                                  writer=self.writer or "", epoch=self.epoch)
            if vm.name == self.writer:
                config["push_grants"] = self._keys.push_grants_to(
                    vm.name, list(config.get("readers", {})), self.epoch)
            targets.append(DeployTarget(vm, "/", config))
        return targets

    def deploy(self, *, format_if_blank: bool = True) -> RolloutReport:
        """Steps 1-4 of the module docstring; DeployError (every VM's result) on a failure."""
        report = RolloutReport()
        version = self.deployer.package.version

        def timed(name: str, step: Callable[[], Any]) -> Any:
            started = time.monotonic()
            result = step()
            report.timings[name] = round(time.monotonic() - started, 2)
            return result

        targets = self.targets()
        found = timed("probe", lambda: self.deployer.status(targets))
        running = {n for n, r in found.items() if r.pid is not None and r.version == version}
        report.hosts.update({n: found[n] for n in running})
        if running:
            self.progress(f"agent {version} already running on {', '.join(sorted(running))}: "
                          "left alone")
        todo = [t for t in targets if t.host.name not in running]
        if not todo:
            return report
        writer = [t for t in todo if t.host.name == self.writer]
        readers = [t for t in todo if t.host.name != self.writer]
        report.hosts.update(timed("install", lambda: self.deployer.install(todo)))
        self.progress(f"agent {version} installed on {', '.join(t.host.name for t in todo)}")
        timed("secret", lambda: self._each(todo, self._put_secret))
        attached = [t for t in todo if t.config["role"] != "spare"]  # a spare has no disk yet
        outputs = timed("disk", lambda: self._each(
            attached, lambda t: self._disk(t, format_if_blank and t in writer)))
        for name, out in outputs.items():
            lines = out.strip().splitlines()
            report.disks[name] = lines[0].removeprefix("disk ") if lines else ""
            if name == self.writer and len(lines) > 1:
                report.formatted = lines[-1]
        self.progress("shared disk visible in the guests: " + ", ".join(
            f"{n} {d}" for n, d in sorted(report.disks.items())))
        if report.formatted:
            self.progress(f"writer {self.writer}: {report.formatted}")
        started = {**timed("start_readers", lambda: self.deployer.deploy(readers)),
                   **timed("start_writer", lambda: self.deployer.deploy(writer))}
        for name, result in started.items():
            installed = report.hosts[name]
            report.hosts[name] = replace(result, changed=installed.changed or result.changed,
                                         actions=installed.actions + result.actions)
        if self.health is not None:
            timed("ready", lambda: self._each(todo, self._wait_ready))
        for name in sorted(t.host.name for t in todo):
            result = report.hosts[name]
            self.progress(f"agent on {name}: pid {result.pid} "
                          f"({', '.join(result.actions) or 'unchanged'})")
        return report

    def stop(self) -> dict[str, HostResult]:
        """Stop every VM's agent (SIGTERM, SIGKILL after the deployer's grace)."""
        return self.deployer.stop(self.targets())

    def status(self) -> dict[str, HostResult]:
        """Installed version and running pid per VM."""
        return self.deployer.status(self.targets())

    # per VM ---------------------------------------------------------------------------------

    def _put_secret(self, target: DeployTarget) -> str:
        files = [(self._keys.node_key_file(target.host.name), GUEST_SECRET, 0o600)]
        if "tls" in target.config:
            files += [(source.read_bytes(), dest, mode)
                      for source, dest, mode in self._tls_files(target.host.name)]
        self.deployer.put_files(target, files)  # after install: its directory is there
        return ""

    def _tls_files(self, vm: str) -> list[tuple[Path, str, int]]:
        """``(source here, path in the guest, mode)`` of ``vm``'s TLS material; PkiError when
        ``rbdfleet provision`` has not made it."""
        pki = FleetPki(self.cfg.pki_dir, self.cfg.fleet.name)
        cert, key = pki.identity(vm)
        return [(cert, GUEST_TLS["cert"], 0o644), (key, GUEST_TLS["key"], 0o600),
                (pki.ca_file, GUEST_TLS["ca"], 0o644)]

    def _disk(self, target: DeployTarget, format_it: bool) -> str:
        release = target.layout.release(self.deployer.package.version)
        serial = target.config["backend"].removeprefix("device:")
        cmd = RemoteCommand(Executable.PYTHON3, [
            "-c", _DISK, release, serial, self.cfg.fleet.name, str(self.disk_wait),
            "format" if format_it else "wait"])
        result = self.shell.run(target.host, cmd, self.disk_wait + 120.0)
        if result.rc != 0:
            message = (result.stderr or result.stdout).strip()[-400:]
            raise RemoteCommandFailed(target.host.name, message, rc=result.rc)
        return result.stdout

    def _wait_ready(self, target: DeployTarget) -> str:
        """Poll the agent's /v1/health until it answers (it binds, then replays the journal)."""
        assert self.health is not None
        address = target.config["advertise"]
        deadline = time.monotonic() + self.ready_wait
        while True:
            try:
                return self.health(address, 5.0).role
            except RbdfleetError as exc:
                if time.monotonic() > deadline:
                    raise RemoteCommandFailed(target.host.name, f"agent at {address} not "
                                              f"answering after {self.ready_wait:.0f} s: {exc}",
                                              rc=-1) from exc
                time.sleep(0.2)

    def _each(self, targets: list[DeployTarget],
              step: Callable[[DeployTarget], str]) -> dict[str, str]:
        """Run ``step`` on every target in parallel; DeployError naming each failed VM."""

        def one(target: DeployTarget) -> tuple[str, str | RbdfleetError]:
            try:
                return target.host.name, step(target)
            except RbdfleetError as exc:
                return target.host.name, exc

        with ThreadPoolExecutor(max_workers=max(1, len(targets))) as pool:
            outcomes = dict(pool.map(one, targets))
        failed = {n: o for n, o in outcomes.items() if isinstance(o, RbdfleetError)}
        if failed:
            results = {n: HostResult(n, ok=n not in failed, error=str(failed.get(n) or "") or None)
                       for n in outcomes}
            raise DeployError("; ".join(f"{n}: {e}" for n, e in sorted(failed.items())), results)
        return {n: str(o) for n, o in outcomes.items()}
