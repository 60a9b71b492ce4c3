"""Sandbox lifecycle: bring up Ceph, namespace hosts and VMs together; tear down exactly them.

Everything the parts create is recorded in ``DIR/state.json`` before it is relied on, so
``down`` works after a crash or a half-failed ``up``: it undoes the recorded resources in
reverse order of creation, each with its part's own undo function, and never by pattern.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator import config as fleet_config
from orchestrator.adapters import ceph as ceph_adapter
from orchestrator.adapters.rados_clients import RadosClientStore
from orchestrator.core.clients import ADMIN_SCOPE, ClientCredential
from orchestrator.errors import SandboxError
from orchestrator.provision import provision_pki
from orchestrator.sandbox import ceph, hosts, libvirtd, processes, vms
from orchestrator.sandbox.state import StateFile

LOG = logging.getLogger(__name__)

Progress = Callable[[str], None]

TEARDOWN: dict[str, Callable[[dict[str, Any]], None]] = {
    **ceph.TEARDOWN,
    **hosts.TEARDOWN,
    **libvirtd.TEARDOWN,
    **vms.TEARDOWN,
    **processes.TEARDOWN,
}

# Host RAM a TCG guest costs with a bounded translation cache (notes/libvirt.md §3), plus Ceph.
VM_RAM_MIB = 400
CEPH_RAM_MIB = 1024
# The coordinator's port on the VM network's gateway (each sandbox has its own gateway).
COORDINATOR_PORT = 7470
# the CLI's client credential in a sandbox: an admin, its secret next to the config
ADMIN_CLIENT = "admin"
CLIENT_SECRET = "client.secret"
# the fleet's PKI (CA key 0600, certificates) next to the master key; `down` removes it
TLS_DIR = "tls"


def default_dir() -> Path:
    """``$RBDFLEET_SANDBOX_DIR``, else a per-user directory under /var/tmp."""
    env = os.environ.get("RBDFLEET_SANDBOX_DIR")
    if env:
        return Path(env)
    return Path("/var/tmp") / f"rbdfleet-{os.getuid()}" / "sandbox"


@dataclass(frozen=True)
class SandboxRequest:
    """What ``up`` should build."""

    vms: int = 3
    hosts: int = 0
    osds: int = 1
    objectstore: str = "memstore"

    def validate(self) -> None:
        """Refuse impossible requests with one clear line each."""
        if not 0 <= self.vms <= 8:
            raise SandboxError(f"--vms must be 0..8, got {self.vms}")
        if not 0 <= self.hosts <= 16:
            raise SandboxError(f"--hosts must be 0..16, got {self.hosts}")
        if not 1 <= self.osds <= 3:
            raise SandboxError(f"--osds must be 1..3, got {self.osds}")
        if self.objectstore not in ("memstore", "bluestore"):
            raise SandboxError(
                f"--objectstore must be memstore or bluestore, got {self.objectstore!r}"
            )


@dataclass
class SandboxSummary:
    """What ``up`` made and where, as printed and as returned to callers."""

    dir: Path
    config: Path
    ceph_conf: Path
    mon: str
    vms: list[dict[str, str]] = field(default_factory=list)
    hosts: list[dict[str, str]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "dir": str(self.dir),
            "config": str(self.config),
            "ceph_conf": str(self.ceph_conf),
            "mon": self.mon,
            "vms": self.vms,
            "hosts": self.hosts,
            "timings": self.timings,
        }


def state_path(directory: Path) -> Path:
    return directory / "state.json"


def preflight(request: SandboxRequest, meminfo: Path = Path("/proc/meminfo")) -> None:
    """Refuse an unusable machine before touching anything."""
    request.validate()
    if os.geteuid() != 0:
        raise SandboxError("the sandbox needs root (it starts daemons, namespaces and VMs)")
    needed = {"ceph-mon": "ceph-mon", "ceph-osd": "ceph-osd", "rbd": "ceph-common"}
    if request.vms:
        needed |= {"libvirtd": "libvirt-daemon-system", "qemu-system-x86_64": "qemu-system-x86",
                   "debootstrap": "debootstrap", "qemu-img": "qemu-utils"}
    if request.hosts:
        needed |= {"sshd": "openssh-server", "ip": "iproute2"}
    for binary, package in needed.items():
        if shutil.which(binary, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
            raise SandboxError(f"{binary} not found: install the Debian package {package!r}")
    available = _mem_available_mib(meminfo)
    wanted = CEPH_RAM_MIB + request.vms * VM_RAM_MIB
    if available < wanted:
        raise SandboxError(
            f"not enough free RAM: {available} MiB available, {wanted} MiB needed "
            f"for Ceph and {request.vms} VMs"
        )


def _mem_available_mib(meminfo: Path) -> int:
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    raise SandboxError(f"{meminfo} has no MemAvailable line")


def up(directory: Path, request: SandboxRequest, progress: Progress = LOG.info) -> SandboxSummary:
    """Bring up a sandbox in ``directory``; on failure undo what was made and re-raise."""
    preflight(request)
    if state_path(directory).exists():
        raise SandboxError(
            f"a sandbox is already recorded in {directory} "
            f"(see `rbdfleet sandbox status --dir {directory}`, or `down` it first)"
        )
    directory.mkdir(parents=True, exist_ok=True)
    state = StateFile(state_path(directory))
    state.set_fact("request", request.__dict__)
    started = time.monotonic()
    try:
        return _build(directory, request, state, progress, started)
    except BaseException:
        progress("sandbox up failed: undoing what was made")
        down(directory, progress=progress)
        raise


def _build(
    directory: Path, request: SandboxRequest, state: StateFile, progress: Progress, started: float
) -> SandboxSummary:
    timings: dict[str, float] = {}

    def timed(name: str, func: Callable[[], Any]) -> Any:
        t0 = time.monotonic()
        result = func()
        timings[name] = round(time.monotonic() - t0, 2)
        return result

    # The parts are independent: VMs take ~20 s to boot under TCG, Ceph ~2 s, hosts ~0.3 s.
    with ThreadPoolExecutor(max_workers=3) as pool:
        ceph_job = pool.submit(timed, "ceph", lambda: ceph.start_cluster(
            directory / "ceph", state, osds=request.osds, objectstore=request.objectstore,
            progress=progress))
        hosts_job: Future[Any] | None = None
        if request.hosts:
            hosts_job = pool.submit(timed, "hosts", lambda: hosts.start_hosts(
                directory / "hosts", state, request.hosts, progress=progress))
        vms_job: Future[Any] | None = None
        if request.vms:
            vms_job = pool.submit(timed, "vms", lambda: _start_vms(directory, request, state,
                                                                    progress))
        cluster = ceph_job.result()
        host_set = hosts_job.result() if hosts_job else None
        vm_set = vms_job.result() if vms_job else None

    secret = directory / "fleet.secret"
    _write_secret(secret)
    config = directory / "rbdfleet.toml"
    config.write_text(render_config(directory, cluster, vm_set, host_set, secret))
    issue_admin_client(config, directory / CLIENT_SECRET)
    # TLS from the start, as `rbdfleet provision` would make it: the fleet CA, a certificate
    # per VM and host, and the coordinator's on the VM network's gateway
    provision_pki(fleet_config.load(config), [vm_set.gateway] if vm_set else ["127.0.0.1"],
                  datetime.datetime.now(datetime.UTC))
    timings["total"] = round(time.monotonic() - started, 2)
    state.set_fact("timings", timings)
    summary = SandboxSummary(
        dir=directory,
        config=config,
        ceph_conf=cluster.conf,
        mon=cluster.mon_v2,
        vms=[{"name": v.name, "domain": v.domain, "address": v.address}
             for v in (vm_set.vms if vm_set else [])],
        hosts=[{"name": h.name, "address": h.address, "root": str(h.root)}
               for h in (host_set.hosts if host_set else [])],
        timings=timings,
    )
    state.set_fact("summary", summary.to_json())
    return summary


def _start_vms(directory: Path, request: SandboxRequest, state: StateFile,
               progress: Progress) -> Any:
    libvirtd.ensure_libvirtd(state)
    return vms.boot_vms(directory / "vms", state, request.vms, progress=progress)


def issue_admin_client(config: Path, path: Path) -> None:
    """The CLI's admin client credential (docs/security.md): stored in the cluster next to the
    fleet's state, its secret in ``path`` (0600), which the config names."""
    cfg = fleet_config.load(config)
    credential = ClientCredential(ADMIN_CLIENT, ADMIN_SCOPE, secrets.token_bytes(32),
                                  time.time())
    with ceph_adapter.cluster(cfg.ceph) as handle:
        store = RadosClientStore(handle, cfg.ceph.pool, cfg.fleet.name)
        try:
            store.put(credential)
        finally:
            store.close()
    _write_secret(path, credential.secret.hex())


def _write_secret(path: Path, text: str | None = None) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write((text or secrets.token_hex(32)) + "\n")


def _toml_str(value: object) -> str:
    return json.dumps(str(value))  # a JSON string literal is a valid TOML basic string


def render_config(directory: Path, cluster: Any, vm_set: Any, host_set: Any,
                  secret: Path) -> str:
    """The fleet config (docs/config.md) for this sandbox."""
    names = [v.name for v in vm_set.vms] if vm_set else []
    lines = [
        "# Written by `rbdfleet sandbox up`; see docs/config.md.",
        "[ceph]",
        f"conf = {_toml_str(cluster.conf)}",
        f"keyring = {_toml_str(cluster.keyring)}",
        'user = "admin"',
        f"pool = {_toml_str(cluster.pool)}",
        "create_pool = false",
        f"mon_host = {_toml_str(cluster.mon_v2)}",
        "",
        "[libvirt]",
        'uri = "qemu:///system"',
        "",
        "[ssh]",
        'user = "root"',
    ]
    key_source = vm_set or host_set
    if key_source is not None:
        lines += [f"key = {_toml_str(key_source.ssh_key)}",
                  f"known_hosts = {_toml_str(key_source.known_hosts)}"]
    lines += [
        "",
        "[fleet]",
        'name = "demo"',
        'image = "rbdfleet-demo"',
        'size = "1GiB"',
        f"writer = {_toml_str(names[0] if names else '')}",
        f"secret_file = {_toml_str(secret)}",
        "agent_port = 7480",
        f"client = {_toml_str(ADMIN_CLIENT)}",
        f"client_secret_file = {_toml_str(directory / CLIENT_SECRET)}",
    ]
    for vm in vm_set.vms if vm_set else []:
        lines += ["", "[[vm]]", f"name = {_toml_str(vm.name)}", f"domain = {_toml_str(vm.domain)}",
                  f"uri = {_toml_str(vm.uri)}", f"address = {_toml_str(vm.address)}",
                  "spare = false"]
    if vm_set is not None:
        # The coordinator serves on the VM network's gateway: the agents in the guests send it
        # heartbeats and reports, and host-side clients reach it there too (one per sandbox).
        url = f"https://{vm_set.gateway}:{COORDINATOR_PORT}"
        lines += ["", "[coordinator]", f"urls = [{_toml_str(url)}]",
                  f"listen = {_toml_str(f'{vm_set.gateway}:{COORDINATOR_PORT}')}",
                  # TCG guests on a loaded host can starve an agent past the 1.2 s default
                  # (seen: a false failover during a put): probes wait 1 s and a silent agent
                  # is dead only after 3 s. suspect_after only gates deaths proven by refused
                  # connections (a timed-out probe takes 3 x probe_timeout anyway): 0.5 s
                  # confirms a killed agent that much sooner and weakens nothing.
                  "probe_timeout = 1.0", "suspect_after = 0.5", "dead_after = 3.0"]
    for host in host_set.hosts if host_set else []:
        lines += ["", "[[host]]", f"name = {_toml_str(host.name)}",
                  f"address = {_toml_str(host.address)}", f"root = {_toml_str(host.root)}"]
    # The writer's idle checkpoints wait 1 s instead of 5: every check that the image stays
    # unchanged first waits for the writer to settle, and the sandbox runs many of them.
    lines += ["", "[agents]", "idle_checkpoint = 1.0"]
    lines += ["", "[tls]", f"dir = {_toml_str(directory / TLS_DIR)}"]
    lines += ["", "[sandbox]", f"dir = {_toml_str(directory)}", ""]
    return "\n".join(lines)


def status(directory: Path) -> dict[str, Any]:
    """What the state file records and whether each process/domain is still alive."""
    path = state_path(directory)
    if not path.exists():
        return {"dir": str(directory), "running": False, "resources": []}
    state = StateFile(path)
    resources = []
    for res in state.resources:
        probe = PROBES.get(res["kind"])
        resources.append({**res, "alive": probe(res) if probe else None})
    alive = [r for r in resources if r["alive"]]
    return {
        "dir": str(directory),
        "running": bool(alive),
        "summary": state.facts.get("summary"),
        "resources": resources,
        "health": _ceph_health(directory) if alive else None,
    }


def _ceph_health(directory: Path) -> dict[str, Any] | None:
    try:
        return ceph.cluster_health(ceph.cluster_from_dir(directory / "ceph"))
    except SandboxError as exc:
        return {"error": str(exc)}


PROBES: dict[str, Callable[[dict[str, Any]], bool]] = {
    **ceph.PROBES,
    **hosts.PROBES,
    **libvirtd.PROBES,
    **vms.PROBES,
    **processes.PROBES,
}


def down(directory: Path, progress: Progress = LOG.info) -> list[str]:
    """Undo every recorded resource, newest first. Returns the errors (empty when clean)."""
    path = state_path(directory)
    if not path.exists():
        return []
    state = StateFile(path)
    errors: list[str] = []
    for res in reversed(state.resources):
        undo = TEARDOWN.get(res["kind"])
        if undo is None:
            errors.append(f"no undo for resource kind {res['kind']!r}: {res}")
            continue
        try:
            undo(res)
        except Exception as exc:  # one failed undo must not leave the rest behind
            errors.append(f"{res['kind']} {res}: {exc}")
            continue
        state.forget(res["kind"], **{k: v for k, v in res.items() if k != "kind"})
    if not errors:
        path.unlink()
        for leftover in ("rbdfleet.toml", "fleet.secret", CLIENT_SECRET):
            (directory / leftover).unlink(missing_ok=True)
        shutil.rmtree(directory / TLS_DIR, ignore_errors=True)
        progress(f"sandbox in {directory} is down")
    return errors
