"""Writer failover on the sandbox VMs (TCG): N faults of each kind, timings split by phase.

Setup (all torn down at the end, ``lifecycle.down``): a throwaway sandbox with 3 VMs
(``lifecycle.up``, as ``rbdfleet sandbox up --vms 3``), the product's own path to a fleet on it
(``rbdfleet provision``, ``deploy``, ``coordinator run`` with its Ceph-blocklist fencer and
libvirt role switch; :class:`orchestrator.sandbox.demo.Mission`), a client thread putting
4 KiB files continuously and a reader thread reading back the last acknowledged one.

Fault kinds, each injected ``--rounds`` times on whichever VM is the writer at that moment:

- ``kill``: ``kill -9`` of the agent in the writer VM; recovery: ``rbdfleet deploy`` restarts it
  as a reader;
- ``pause``: ``virsh suspend`` of the writer VM, ``virsh resume`` once the new writer acked a
  put; recovery: its agent restarted and redeployed (as the VM pause test does);
- ``poweroff``: ``virsh destroy`` of the writer VM; recovery: ``virsh start``, then redeploy;
- ``cutoff``: inside the writer VM, the blackhole policy routes of tests/vm_faults.py cut what
  its agent sends the coordinator's port and answers from its agent port (SSH stays open);
  healed after the failover; recovery: agent restarted and redeployed.

Per fault, seconds from the fault (host wall clock; the coordinator's log lines carry the same
clock, millisecond resolution):

  evidence  -> the coordinator's first word against the old writer: a client's report, the
               hypervisor's lifecycle event, or its first failed probe (``event=probe_failed``)
  detect    -> ``event=node_confirmed_dead`` for the old writer
  fence     -> ``action_done FenceNode(old)``
  switch    -> the role switch's last ``provision step done ... attach rw disk to (new)``
  promote   -> ``action_done PromoteNode(new)`` (the agent replayed the journal, accepts writes)
  announce  -> ``action_done PublishMap`` naming the new writer
  learn     -> the put client's first write targets naming the new writer
  first_put -> the client thread's first put acknowledged by the new writer (the target)

and the reads that failed between the fault and the recovery. The breakdown of each fault is
printed too (and kept in ``--json``): ``injected``, when the fault command returned (its
delivery into the guest is part of every phase); the coordinator's lines of the failover
(probe failures, reports, events, each provision step with its seconds, each action); the new
writer's promotion steps in its guest, from its agent log (``guest_steps``); the put client's
requests to the old writer and its first to the new one. A sampler times a health probe of
every live agent once a second, as the coordinator's probes ask it (``probe_times``): what a
probe timeout must allow for on this host. Target (docs/architecture.md
"Targets"): first_put <= 1.5 s p99 per kind on TCG VMs, 0 failed reads.

    .venv/bin/python -m bench.vm_failover_bench [--rounds 10] [--kinds kill,pause,cutoff,poweroff]
        [--json OUT] [--png docs/benchmarks/vm_failover.png] [--dir DIR]
    .venv/bin/python -m bench.vm_failover_bench --from-progress STDERR [--png PNG] [--json OUT]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import ipaddress
import json
import os
import re
import shutil
import ssl
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from agents.errors import NotFound, RbdfleetError
from agents.service import UNIT_NAME
from orchestrator.adapters.ssh import ParamikoShell
from orchestrator.core.remote import shell_script
from orchestrator.deploy import AgentLayout
from orchestrator.errors import SandboxError
from orchestrator.sandbox import lifecycle, vms
from orchestrator.sandbox.demo import Mission
from orchestrator.sandbox.libvirtd import SYSTEM_URI
from orchestrator.sandbox.lifecycle import COORDINATOR_PORT
from orchestrator.sandbox.state import StateFile

KINDS = ("kill", "pause", "cutoff", "poweroff")  # the one that reboots a VM last
PHASES = ("evidence", "detect", "fence", "switch", "promote", "announce", "learn", "first_put")
TARGET_S = 1.5
DEPLOY_ATTEMPTS = 3  # seen on a host at load 30: paramiko authentication timeouts
CUT_TABLE = 87  # the guest routing table of the blackhole route (as tests/vm_faults.py)
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def say(message: str) -> None:
    print(f"[vm-failover {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def log_events(text: str, since: float) -> list[tuple[float, str]]:
    """(wall time, line) of every coordinator log line stamped at or after ``since``."""
    events = []
    for line in text.splitlines():
        match = _STAMP.match(line)
        if match is None:
            continue
        stamp = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if stamp >= since - 0.001:  # the log has millisecond resolution
            events.append((stamp, line))
    return events


def phases(events: list[tuple[float, str]], fault: float, old: str, new: str
           ) -> dict[str, float | None]:
    """Seconds from ``fault`` to each coordinator phase; each phase is looked for after the
    previous one (a map published for another reason before the promotion does not count).
    ``evidence``: the first word against the old writer (a client's report, the hypervisor's
    event, a failed probe), whichever came first."""
    wanted: list[tuple[str, Callable[[str], bool]]] = [
        ("evidence", lambda s: f"node={old} " in s + " " and (
            "event=client_report" in s or "event=probe_failed" in s
            or ("event=hypervisor_reported" in s and "state=running" not in s))),
        ("detect", lambda s: "event=node_confirmed_dead" in s and f"node={old} " in s + " "),
        ("fence", lambda s: f"action=FenceNode({old}," in s and "event=action_done" in s),
        ("switch", lambda s: "provision step done" in s and "attach rw disk to" in s
         and f"({new})" in s),
        ("promote", lambda s: f"action=PromoteNode({new}," in s and "event=action_done" in s),
        ("announce", lambda s: "action=PublishMap(" in s and f"writer={new})" in s
         and "event=action_done" in s),
    ]
    out: dict[str, float | None] = {}
    since = fault - 0.001
    for name, match in wanted:
        at = next((t for t, line in events if t >= since and match(line)), None)
        out[name] = None if at is None else round(at - fault, 3)
        if at is not None:
            since = at
    return out


_SECONDS = re.compile(r"seconds=([0-9.]+)")
_WHAT = re.compile(r"(event=\w+|action='[^']*'|action=\S+|reason=\S+|refused=\S+|state=\S+)")


def details(events: list[tuple[float, str]], fault: float, until: float) -> list[str]:
    """The coordinator's lines of the failover (fault to ``until``), shortened: when each
    probe failure, report, event, provision step and action came, for the breakdown."""
    keep = ("event=client_report", "event=probe_failed", "event=hypervisor_reported",
            "event=node_confirmed_dead", "event=action_done", "provision step done",
            "event=action_failed", "event=map_published")
    out = []
    for t, line in events:
        if fault <= t <= until + 0.001 and any(k in line for k in keep):
            node = re.search(r"node=(\S+)", line)
            out.append(f"+{t - fault:.3f} " + " ".join(_WHAT.findall(line))
                       + (f" node={node.group(1)}" if node else "")
                       + (f" seconds={m.group(1)}" if (m := _SECONDS.search(line)) else ""))
    return out


_GUEST_STAMP = re.compile(r"ts=(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")


def guest_steps(log: str) -> dict[str, float]:
    """Seconds from the last promotion's start in an agent's log (the guest's own clock, so
    durations only) to: ``device`` the read-write disk found and opened (the warm adoption's
    own ``seconds`` before its line), ``adopt`` the warm adoption done (or the cold open),
    ``epoch`` the journal replayed and the epoch record written, ``writer`` accepting
    writes; ``cold`` 1 when the promotion was cold."""
    lines = log.splitlines()
    start = max((i for i, line in enumerate(lines)
                 if "event=role_changed" in line and "to=promoting/" in line), default=None)
    if start is None:
        return {}

    def stamp(line: str) -> float | None:
        m = _GUEST_STAMP.search(line)
        return None if m is None else datetime.strptime(
            m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()

    t0 = stamp(lines[start])
    if t0 is None:
        return {}
    out: dict[str, float] = {}
    marks = (("adopt", "event=promotion_"), ("epoch", "event=epoch_record"),
             ("writer", "to=writer/"))
    for line in lines[start + 1:]:
        for name, marker in marks:
            if name not in out and marker in line and (t := stamp(line)) is not None:
                out[name] = round(t - t0, 3)
                if name == "adopt" and (took := _SECONDS.search(line)) is not None:
                    out["device"] = round(t - t0 - float(took.group(1)), 3)
        if "event=promotion_cold" in line:
            out["cold"] = 1.0
    return out


def client_steps(targets: list[tuple[float, str, int]],
                 sent: list[tuple[float, float, str, str]], fault: float, old: str,
                 new: str) -> dict[str, Any]:
    """The put client's side (seconds from ``fault``): ``learn`` its first targets naming
    ``new``; ``attempts`` its requests to ``old`` after the fault (ended at, outcome) and the
    first to ``new`` (sent, ended, outcome)."""
    learn = next((t for t, w, _ in targets if t > fault and w == new), None)
    to_old = [(round(e - fault, 3), o) for s, e, n, o in sent if e > fault and n == old]
    to_new = next(((round(s - fault, 3), round(e - fault, 3), o) for s, e, n, o in sent
                   if s > fault and n == new), None)
    return {"learn": None if learn is None else round(learn - fault, 3),
            "to_old": to_old[:6], "first_to_new": to_new}


class _TimedTargets:
    """The put client's coordinator client, recording when each write's targets came back
    and which writer they named: when the client learned the new map."""

    def __init__(self, inner: Any, seen: list[tuple[float, str, int]]) -> None:
        self._inner = inner
        self._seen = seen

    def targets(self, kind: str, path: str) -> Any:
        answer = self._inner.targets(kind, path)
        self._seen.append((time.time(), answer.ordered[0].node, answer.epoch))
        return answer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _TimedTransport:
    """The put client's transport, recording each request to a node: (sent, ended, node,
    outcome), the outcome ``ok`` or the error's class name."""

    def __init__(self, inner: Any, sent: list[tuple[float, float, str, str]]) -> None:
        self._inner = inner
        self._sent = sent

    def request(self, node: str, *args: Any, **kwargs: Any) -> Any:
        started = time.time()
        outcome = "ok"
        try:
            return self._inner.request(node, *args, **kwargs)
        except BaseException as exc:
            outcome = type(exc).__name__
            raise
        finally:
            self._sent.append((started, time.time(), node, outcome))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class Load:
    """One thread putting 4 KiB files one after another, one reading back the last one."""

    def __init__(self, mission: Mission, io_timeout: float) -> None:
        self.put_client = mission.client(timeout=120.0)
        self.put_client.io_timeout = io_timeout
        # what the put client did, for the client's share of a failover
        self.targets: list[tuple[float, str, int]] = []  # (wall time, writer named, epoch)
        self.sent: list[tuple[float, float, str, str]] = []  # (sent, ended, node, outcome)
        self.put_client.coordinator = _TimedTargets(  # type: ignore[assignment]
            self.put_client.coordinator, self.targets)
        self.put_client.transport = _TimedTransport(  # type: ignore[assignment]
            self.put_client.transport, self.sent)
        self.get_client = mission.client(timeout=120.0)
        self.get_client.io_timeout = io_timeout
        self.acks: list[tuple[float, str, int]] = []  # (wall time, node, epoch)
        self.read_failures: list[tuple[float, str]] = []
        self.reads = 0
        self.last: str | None = None
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._put, daemon=True),
                         threading.Thread(target=self._get, daemon=True)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(150)

    def _put(self) -> None:
        i = 0
        while not self._stop.is_set():
            path = f"/bench/vm/{i % 64:02d}.bin"
            try:
                ack = self.put_client.put_bytes(os.urandom(4096), path)
            except RbdfleetError:
                time.sleep(0.01)
                continue
            self.acks.append((time.time(), ack.node, ack.epoch))
            self.last = path
            i += 1
            time.sleep(0.02)

    def _get(self) -> None:
        while not self._stop.is_set():
            path = self.last
            if path is None:
                time.sleep(0.05)
                continue
            try:
                self.get_client.get_bytes(path)
            except NotFound:
                pass
            except RbdfleetError as exc:
                self.read_failures.append((time.time(), f"{path}: {exc}"))
                continue
            self.reads += 1
            time.sleep(0.02)


@dataclass
class Row:
    """One injected fault."""

    kind: str
    round: int
    old: str
    new: str = ""
    fault_at: float = 0.0
    injected: float | None = None  # the fault command returned (its delivery, an upper bound)
    evidence: float | None = None
    detect: float | None = None
    fence: float | None = None
    switch: float | None = None
    promote: float | None = None
    announce: float | None = None
    learn: float | None = None
    first_put: float | None = None
    epochs: int = 0  # from the fault to the first put's epoch: 1 unless elections cascaded
    reads: int = 0
    failed_reads: int = 0
    errors: list[str] = field(default_factory=list)
    # the breakdown: the coordinator's lines of the failover, the new writer's promotion in
    # its guest (guest_steps), the put client's side (client_steps)
    log: list[str] = field(default_factory=list)
    guest: dict[str, float] = field(default_factory=dict)
    client: dict[str, Any] = field(default_factory=dict)


def vm_set(summary: lifecycle.SandboxSummary, directory: Path) -> vms.VmSet:
    """The sandbox's VMs as the fault hooks need them (``up`` returns only its summary)."""
    state = StateFile(lifecycle.state_path(directory))
    runtime = next(Path(r["path"]) for r in state.resources if r["kind"] == "vm.dir")
    first = summary.vms[0]
    run_id = first["domain"].split("-")[1]
    subnet = ipaddress.IPv4Network(f"{first['address']}/24", strict=False)
    plan = vms._Plan(run_id=run_id, subnet=subnet, runtime=runtime)
    vm_dir = directory / "vms"
    return vms.VmSet(
        run_id=run_id,
        vms=tuple(vms.SandboxVM(name=v["name"], domain=v["domain"], address=v["address"],
                                uri=SYSTEM_URI, console_log=vm_dir / "console" /
                                f"{v['name']}.log") for v in summary.vms),
        network=plan.network, bridge=plan.bridge, subnet=str(subnet), gateway=plan.gateway,
        ssh_key=vm_dir / "ssh" / "id_ed25519", known_hosts=vm_dir / "ssh" / "known_hosts",
        control_dir=runtime / "cm", disk_dir=runtime / "disks",
        domain_type=vms.accelerator(vms._kvm_module_loaded(), lambda: False))


class Bench:
    """The fleet on the sandbox, its load, and the fault kinds."""

    def __init__(self, directory: Path, summary: lifecycle.SandboxSummary) -> None:
        self.directory = directory
        self.vms = vm_set(summary, directory)
        self.log = directory / "coordinator.log"
        self.mission = Mission(directory / "rbdfleet.toml",
                               StateFile(lifecycle.state_path(directory)), say, echo_cli=False)
        self.broken = False
        port = self.mission.config.fleet.agent_port
        self.probes = ProbeTimes({v.name: f"{v.address}:{port}" for v in self.vms.vms},
                                 self.mission.config.pki_dir / "ca.pem")

    def start(self, io_timeout: float) -> Load:
        self.mission.provision()
        self.mission.deploy()
        self.mission.start_coordinator(self.log)
        load = Load(self.mission, io_timeout)
        load.start()
        self.mission.wait(lambda: len(load.acks) >= 5, 120, "the put stream")
        self.probes.start()
        return load

    def stable(self) -> dict[str, Any]:
        """Wait for a stable map with a writer and every other VM an in-sync reader."""
        count = len(self.vms.vms)

        def ready() -> bool:
            m = self.mission.fleet_map()
            return (m.get("phase") == "stable" and m.get("writer") is not None
                    and sum(1 for x in m.get("members", [])
                            if x["role"] == "reader" and x["in_sync"]) == count - 1)

        self.mission.wait(ready, 240, "a writer and in-sync readers")
        return self.mission.fleet_map()

    def inject(self, kind: str, vm: str) -> None:
        if kind == "kill":
            self.mission.kill_agent(vm)
        elif kind == "pause":
            self.vms.pause(vm)
        elif kind == "poweroff":
            self.vms.crash(vm)
        else:
            self._cut(vm, heal=False)

    def recover(self, kind: str, vm: str, epoch: int) -> None:
        """Undo the fault and bring ``vm``'s agent back as an in-sync reader."""
        if kind == "pause":
            self.vms.resume(vm)
        elif kind == "poweroff":
            self.vms.start(vm)
            dead = self.mission.shell  # its connection to the powered-off guest is dead
            self.mission.shell = ParamikoShell.from_config(self.mission.config.ssh)
            if isinstance(dead, ParamikoShell):
                dead.close()
        elif kind == "cutoff":
            self._cut(vm, heal=True)
        if kind in ("pause", "cutoff"):  # the coordinator demotes the returning old writer
            address = f"{self.mission.config.vm(vm).address}:{self.mission.config.fleet.agent_port}"
            ca = self.mission.config.pki_dir / "ca.pem"
            self.mission.wait(lambda: _epoch(address, ca) >= epoch, 90, f"{vm} demoted")
        if kind != "kill" and kind != "poweroff":
            self.mission.kill_agent(vm)  # the explicit rejoin: a fresh agent
        # Any other node out (a candidate fenced in a second election of the same fault, one a
        # loaded host starved into a false death) gets a fresh agent too; one `deploy` starts
        # them as readers, and the next fault waits for them in sync (``stable``), whichever
        # node a cascade left as the writer.
        for m in self.mission.fleet_map().get("members", []):
            if m["role"] == "out" and m["name"] != vm:
                self.mission.kill_agent(m["name"])
        for attempt in range(DEPLOY_ATTEMPTS):  # idempotent; SSH into a starved guest times out
            try:
                self.mission.cli("deploy", progress=True)
                return
            except SandboxError as exc:
                if attempt == DEPLOY_ATTEMPTS - 1:
                    raise
                say(f"deploy failed, again: {exc}")

    def guest_steps(self, vm: str) -> dict[str, float]:
        """:func:`guest_steps` of ``vm``'s agent log (journald, else its log file); empty when
        the guest does not answer (a breakdown, not the figure)."""
        marks = "event=(role_changed|promotion_|epoch_record)"
        script = (f"(journalctl -u {UNIT_NAME} -o cat --no-pager --since=-600s 2>/dev/null; "
                  f"tail -n 2000 {AgentLayout('/').log_path} 2>/dev/null) "
                  f"| grep -E '{marks}' | tail -n 40")
        try:
            out = self.mission.shell.run(self.mission.config.vm(vm), shell_script(script))
        except RbdfleetError as exc:
            say(f"agent log of {vm} not read: {exc}")
            return {}
        return guest_steps(out.stdout)

    def _cut(self, vm: str, heal: bool) -> None:
        gateway, port = self.vms.gateway, self.mission.config.fleet.agent_port
        script = (
            f"ip rule del priority {CUT_TABLE}; ip rule del priority {CUT_TABLE + 1}; "
            f"ip route flush table {CUT_TABLE}; true"
            if heal else
            f"ip route add blackhole {gateway}/32 table {CUT_TABLE} && "
            f"ip rule add priority {CUT_TABLE} to {gateway}/32 ipproto 6 dport "
            f"{COORDINATOR_PORT} table {CUT_TABLE} && "
            f"ip rule add priority {CUT_TABLE + 1} to {gateway}/32 ipproto 6 sport {port}"
            f" table {CUT_TABLE}")
        self.mission.shell.run(self.mission.config.vm(vm), shell_script(script), check=True)

    def one(self, kind: str, n: int, load: Load) -> Row | None:
        try:
            m = self.stable()
        except SandboxError as exc:  # the fleet did not heal: no further faults
            say(f"{kind} {n}: not injected: {exc}")
            self.broken = True
            return None
        old, epoch = str(m["writer"]), int(m["epoch"])
        row = Row(kind, n, old)
        reads_before, failed_before = load.reads, len(load.read_failures)
        time.sleep(1.0)  # a steady stream before the fault
        self.probes.faulted.add(old)
        row.fault_at = time.time()
        self.inject(kind, old)
        row.injected = round(time.time() - row.fault_at, 3)
        try:
            self.mission.wait(lambda: any(t > row.fault_at and node != old and e > epoch
                                          for t, node, e in load.acks[-20:]),
                              120, "a put acknowledged by a new writer")
            first = min((t, node, e) for t, node, e in load.acks
                        if t > row.fault_at and node != old and e > epoch)
            row.first_put, row.new = round(first[0] - row.fault_at, 3), first[1]
            row.epochs = first[2] - epoch
            time.sleep(0.5)  # the coordinator log has flushed the lines of the failover
            events = log_events(self.log.read_text(), row.fault_at)
            for name, value in phases(events, row.fault_at, old, row.new).items():
                setattr(row, name, value)
            row.log = details(events, row.fault_at, first[0])
            row.client = client_steps(load.targets, load.sent, row.fault_at, old, row.new)
            row.learn = row.client["learn"]
            row.guest = self.guest_steps(row.new)
        except SandboxError as exc:
            row.errors.append(str(exc))
        finally:
            try:
                self.recover(kind, old, epoch + 1)
            except RbdfleetError as exc:  # the fleet is short of a VM: no further faults
                row.errors.append(f"recovery of {old}: {exc}")
                self.broken = True
            self.probes.faulted.discard(old)
        row.reads = load.reads - reads_before
        row.failed_reads = len(load.read_failures) - failed_before
        row.errors += [why for t, why in load.read_failures[failed_before:]]
        say(f"{kind} {n}: {old} -> {row.new or '?'} "
            + " ".join(f"{p}={getattr(row, p)}" for p in PHASES)
            + f" epochs={row.epochs} reads={row.reads} failed={row.failed_reads}")
        say(f"{kind} {n} breakdown: injected {row.injected} guest {row.guest} "
            f"client {row.client}")
        for line in row.log:
            say(f"{kind} {n}   {line}")
        return row


def _health(address: str, ca: Path, timeout: float = 5.0) -> dict[str, Any] | None:
    """The agent's /v1/health over a new TLS connection (fleet CA ``ca``), as the
    coordinator's probes ask it; None while it does not answer."""
    host, _, port = address.rpartition(":")
    conn = http.client.HTTPSConnection(host, int(port), timeout=timeout,
                                       context=ssl.create_default_context(cafile=ca))
    try:
        conn.request("GET", "/v1/health")
        answer = json.loads(conn.getresponse().read())
        return answer if isinstance(answer, dict) else None
    except (OSError, ValueError):
        return None
    finally:
        conn.close()


def _epoch(address: str, ca: Path) -> int:
    """The agent's epoch from its /v1/health; 0 while it does not answer."""
    return int((_health(address, ca) or {}).get("epoch", 0))


class ProbeTimes:
    """Once a second, a health probe of every VM's agent not under a fault (``faulted``),
    timed: what a probe timeout must allow for on this host (connect, TLS handshake, answer)
    while the fleet works. A probe left unanswered for 5 s counts as 5 s."""

    def __init__(self, addresses: dict[str, str], ca: Path) -> None:
        self.addresses = addresses
        self.ca = ca
        self.faulted: set[str] = set()
        self.seconds: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            for vm, address in self.addresses.items():
                if vm in self.faulted:
                    continue
                started = time.monotonic()
                answered = _health(address, self.ca) is not None
                if vm not in self.faulted:  # a fault injected meanwhile: not a live agent's
                    self.seconds.append(time.monotonic() - started if answered else 5.0)

    def summary(self) -> dict[str, Any]:
        if not self.seconds:
            return {"samples": 0}
        return {"samples": len(self.seconds), "p50": round(statistics.median(self.seconds), 3),
                "p99": round(percentile(self.seconds, 99), 3),
                "max": round(max(self.seconds), 3),
                "over_0.3": sum(1 for v in self.seconds if v > 0.3),
                "over_0.5": sum(1 for v in self.seconds if v > 0.5),
                "over_1.0": sum(1 for v in self.seconds if v > 1.0)}


_PROGRESS = re.compile(r"\] (?P<kind>\w+) (?P<round>\d+): (?P<old>\S+) -> (?P<new>\S+) "
                       r"(?P<phases>(?:\w+=\S+ )+)reads=(?P<reads>\d+) failed=(?P<failed>\d+)$")


def rows_from_progress(text: str) -> list[Row]:
    """The rows of a run's progress lines (its stderr): a run cut short (the machine's time
    ran out) keeps every fault it measured there, phases rounded as printed."""
    rows = []
    for line in text.splitlines():
        if (match := _PROGRESS.search(line)) is None:
            continue
        row = Row(match["kind"], int(match["round"]), match["old"],
                  "" if match["new"] == "?" else match["new"], reads=int(match["reads"]),
                  failed_reads=int(match["failed"]))
        for pair in match["phases"].split():
            name, _, value = pair.partition("=")
            if name == "epochs":
                row.epochs = int(value)
            else:
                setattr(row, name, None if value == "None" else float(value))
        rows.append(row)
    return rows


def summarize(rows: list[Row]) -> dict[str, Any]:
    """p50 / p99 / max per kind and phase, failed reads, and the verdict per kind."""
    out: dict[str, Any] = {}
    for kind in dict.fromkeys(r.kind for r in rows):
        mine = [r for r in rows if r.kind == kind]
        per: dict[str, Any] = {"faults": len(mine),
                               "failed_reads": sum(r.failed_reads for r in mine),
                               "reads": sum(r.reads for r in mine),
                               "cascades": sum(1 for r in mine if r.epochs > 1)}
        for phase in PHASES:
            values = [v for r in mine if (v := getattr(r, phase)) is not None]
            per[phase] = ({"p50": round(statistics.median(values), 3),
                           "p99": percentile(values, 99), "max": max(values),
                           "samples": len(values)} if values else None)
        first = per["first_put"]
        per["target_met"] = bool(first and first["samples"] == len(mine)
                                 and first["p99"] <= TARGET_S and per["failed_reads"] == 0)
        out[kind] = per
    return out


def plot(rows: list[Row], png: Path) -> str:
    """A timeline per fault: one horizontal bar split at each phase; returns the renderer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = dict(zip(PHASES, ("#bbbbbb", "#4c72b0", "#dd8452", "#55a868", "#c44e52",
                                "#8172b3", "#da8bc3", "#937860"), strict=True))
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(rows) + 1.6))
    labels = []
    for y, row in enumerate(rows):
        start = 0.0
        for phase in PHASES:
            end = getattr(row, phase)
            if end is None or end < start:
                continue
            ax.barh(y, end - start, left=start, color=colours[phase], height=0.7,
                    label=phase if y == 0 else None)
            start = end
        labels.append(f"{row.kind} #{row.round}" + (f" ({row.failed_reads} failed reads)"
                                                     if row.failed_reads else ""))
    ax.axvline(TARGET_S, color="black", linestyle="--", linewidth=1, label="target 1.5 s")
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds from the fault command (each colour ends where its phase ends)")
    ax.set_title("Writer failover on 3 TCG sandbox VMs")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return f"matplotlib {matplotlib.__version__}"


def run(args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    """Sandbox up, fleet, faults, sandbox down (also on failure)."""
    rows: list[Row] = []
    started = time.time()
    say(f"sandbox up in {directory} (Ceph + 3 VMs)")
    summary = lifecycle.up(directory, lifecycle.SandboxRequest(vms=3), progress=say)
    try:
        bench = Bench(directory, summary)
        load = bench.start(args.io_timeout)
        try:
            for kind in args.kinds:
                for n in range(1, args.rounds + 1):
                    if not bench.broken and (row := bench.one(kind, n, load)) is not None:
                        rows.append(row)
        finally:
            load.stop()
            bench.probes.stop()
            probe_times = bench.probes.summary()
            say(f"health probe times of live agents (s): {probe_times}")
            bench.mission.close()
            if args.keep_log:
                shutil.copy(bench.log, args.keep_log)
    finally:
        say("sandbox down")
        lifecycle.down(directory, progress=say)
    return {
        "rounds": args.rounds, "kinds": list(args.kinds), "io_timeout_s": args.io_timeout,
        "target_first_put_p99_s": TARGET_S, "sandbox_up_s": summary.timings.get("total"),
        "seconds": round(time.time() - started, 1), "load_average": os.getloadavg(),
        "probe_times": probe_times,
        "summary": summarize(rows), "rows": [asdict(r) for r in rows],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10, help="faults per kind")
    parser.add_argument("--kinds", type=lambda v: v.split(","), default=list(KINDS))
    parser.add_argument("--io-timeout", type=float, default=1.0,
                        help="client I/O timeout: how long a put in flight to a frozen writer "
                             "waits before the client follows the map")
    parser.add_argument("--dir", type=Path, help="sandbox directory (default: a fresh temp dir)")
    parser.add_argument("--json", type=Path, help="write the result here too")
    parser.add_argument("--png", type=Path, help="render the timeline plot here")
    parser.add_argument("--keep-log", type=Path, help="copy the coordinator log here")
    parser.add_argument("--from-progress", type=Path,
                        help="no sandbox: summarize (and --png) the faults an earlier run "
                             "printed to its stderr, e.g. one cut short")
    args = parser.parse_args(argv)
    if unknown := set(args.kinds) - set(KINDS):
        parser.error(f"unknown kinds {sorted(unknown)}; known: {', '.join(KINDS)}")
    result: dict[str, Any]
    if args.from_progress:
        measured = rows_from_progress(args.from_progress.read_text())
        result = {"from_progress": str(args.from_progress), "summary": summarize(measured),
                  "rows": [asdict(r) for r in measured]}
    else:
        with contextlib.ExitStack() as stack:
            directory = args.dir or Path(stack.enter_context(
                tempfile.TemporaryDirectory(prefix="rbdfleet-vmfb-", dir="/var/tmp")))
            result = run(args, directory.absolute() / "sandbox")
    rows = [Row(**{k: v for k, v in r.items()}) for r in result["rows"]]
    if args.png and rows:
        result["plot"] = {"path": str(args.png), "renderer": plot(rows, args.png)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    for kind, per in result["summary"].items():
        first = per["first_put"] or {}
        print(f"{kind:<9} first_put p50 {first.get('p50')} p99 {first.get('p99')} s, "
              f"failed reads {per['failed_reads']}: target "
              f"{'met' if per['target_met'] else 'NOT met'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
