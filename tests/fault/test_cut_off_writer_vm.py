"""The writer VM is cut off from the coordinator, not from Ceph, under a stream of puts.

On the session's three TCG guests and Ceph cluster, one fleet of its own (the ``mission``
fixture of the mission test). The shared disk is the RBD image attached through QEMU's librbd,
which runs on the host: a cut inside the guest leaves the writer its disk. The coordinator (and
the client) listen on the VM network's gateway; inside the writer's guest, policy routes send
to a blackhole route what the agent sends the gateway's coordinator port and what it answers
from its agent port (heartbeats, probe and client answers). SSH (port 22) stays open: it is the
test's control channel, no part of the product's paths.

1. tests/jepsen.py's recorded workload runs from the host (puts of 100 B to 3 MiB, deletes,
   renames, mkdirs; reads from every reader); a process in the writer's VM keeps writing to its
   read-write disk (as a stale writer would); the writer's guest is cut off;
2. the coordinator confirms the writer dead, persists epoch 2, fences it (Ceph blocklist of
   exactly its QEMU's client addresses, readers untouched), gives a reader a read-write disk
   through libvirt and promotes it, and only after the map is published releases the old
   writer's disk; the clients follow; the history is clean under every checker, the final
   state read on every node handed out. Meanwhile, on its side
   of the cut, the old agent still runs as the writer of epoch 1 and the stale writer
   process's write fails (EIO: its QEMU's Ceph client is blocklisted);
   A client on the old writer's side of the cut (in another guest) with an epoch-1 grant
   gets its put refused: the old writer's disk is gone (re-attached ``<readonly/>`` by that
   release, which needs no network path to the guest);
3. the route heals: the coordinator demotes the old writer (reader of epoch 2, no flapping;
   or the agent stepped down by itself first, its self-test having met its fenced disk),
   not a byte of the image changed since the fence (sha256 of the whole image, fsck clean),
   the stale grant is refused as of an ended epoch (409); after an explicit rejoin it is an
   in-sync reader.

Budget: ~2 min with the VMs already booted.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from agents.service import UNIT_NAME
from orchestrator.rollout import GUEST_TLS
from orchestrator.sandbox.demo import Mission
from orchestrator.sandbox.lifecycle import COORDINATOR_PORT
from orchestrator.sandbox.vms import VmSet
from tests.integration.test_mission_vm import _health, _modes, mission  # noqa: F401
from tests.vm_faults import (
    WRITER,
    confirmed_dead,
    continue_under_stream,
    fail_over_under_stream,
    fsck,
    image_digest,
    member,
    old_writer_steps_down,
    say_as,
    stale_put,
    start_under_stream,
    status_of,
)

pytestmark = [pytest.mark.fault, pytest.mark.vm]

CUT_TABLE = 87  # the guest's routing table holding the blackhole route (priorities 87, 88)
_say = say_as("cut-off-writer")


def _cut(vms: VmSet, vm: str, agent_port: int, heal: bool = False) -> None:
    """Inside ``vm``: route to a blackhole (or stop routing there) what its agent sends to the
    coordinator's port on the gateway and what it answers the gateway from its agent port."""
    gateway = vms.gateway
    # ipproto 6 (TCP) by number: the minimal guest has no /etc/protocols
    script = (
        f"ip rule del priority {CUT_TABLE}; ip rule del priority {CUT_TABLE + 1}; "
        f"ip route flush table {CUT_TABLE}; ip rule show"
        if heal else
        f"ip route add blackhole {gateway}/32 table {CUT_TABLE} && "
        f"ip rule add priority {CUT_TABLE} to {gateway}/32 ipproto 6 dport {COORDINATOR_PORT}"
        f" table {CUT_TABLE} && "
        f"ip rule add priority {CUT_TABLE + 1} to {gateway}/32 ipproto 6 sport {agent_port}"
        f" table {CUT_TABLE} && ip rule show"
    )
    done = vms.exec(vm, ["sh", "-c", script], timeout=30)
    assert done.returncode == 0, done.stderr
    assert (f"lookup {CUT_TABLE}" in done.stdout) != heal, done.stdout


@pytest.fixture
def cut_writer(mission: Mission, sandbox_vms: VmSet) -> Iterator[Callable[[bool], None]]:  # noqa: F811
    """``cut(heal)``: cut :data:`WRITER`'s guest off (or heal it); healed at teardown whatever
    happened, so the session's guest is never left cut off for the next test."""
    port = mission.config.fleet.agent_port
    yield lambda heal: _cut(sandbox_vms, WRITER, port, heal)
    _cut(sandbox_vms, WRITER, port, heal=True)


def _guest_health(vms: VmSet, vm: str, address: str) -> dict[str, object]:
    """The agent's /v1/health asked from inside its own guest (no gateway on the way), over
    TLS against the fleet CA that deploy installed there."""
    done = vms.exec(vm, ["python3", "-c", "import ssl, sys, urllib.request; print(urllib."
                         "request.urlopen(sys.argv[1], timeout=10, context=ssl."
                         "create_default_context(cafile=sys.argv[2])).read().decode())",
                         f"https://{address}/v1/health", GUEST_TLS["ca"]], timeout=30)
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


def _blocklist(fleet: Mission) -> set[str]:
    listing = subprocess.run(["ceph", "-c", str(fleet.config.ceph.conf), "osd", "blocklist",
                              "ls"], capture_output=True, text=True, timeout=60, check=True)
    return {line.split()[0] for line in listing.stdout.splitlines() if "/" in line}


def _watchers(fleet: Mission) -> set[str]:
    """Client addresses watching the fleet's image (one librbd instance per attached disk)."""
    ceph = fleet.config.ceph
    status = subprocess.run(["rbd", "-c", str(ceph.conf), "--keyring", str(ceph.keyring),
                             "status", f"{ceph.pool}/{fleet.config.fleet.image}",
                             "--format", "json"], capture_output=True, text=True, timeout=60,
                            check=True)
    return {w["address"] for w in json.loads(status.stdout)["watchers"]}


def _event_line(log: str, *words: str) -> int:
    """Index of the first coordinator log line holding every one of ``words`` (-1: none)."""
    return next((i for i, line in enumerate(log.splitlines())
                 if all(w in line for w in words)), -1)


def test_writer_cut_off_from_the_coordinator_is_fenced_changes_no_byte_and_steps_down(
        mission: Mission, sandbox_vms: VmSet,  # noqa: F811
        cut_writer: Callable[[bool], None]) -> None:
    running = start_under_stream(mission, WRITER, "/cut")
    agent_port = mission.config.fleet.agent_port
    address = f"{mission.config.vm(WRITER).address}:{agent_port}"
    watchers, blocklisted = _watchers(mission), _blocklist(mission)
    assert len(watchers) == 3, watchers  # one librbd client per VM's QEMU
    _say("cutting the writer's guest off from the coordinator")
    failover = fail_over_under_stream(mission, running, WRITER,
                                      lambda: cut_writer(False), _say)
    _say(f"new writer {failover.new_writer} announced {failover.announced} s, first write "
         f"acknowledged by it {failover.first_ack} s after the cut")
    mission.end_failover(WRITER)  # a stale write that lands from now on changes the image

    # Order is law: confirmed dead, epoch 2 persisted, fenced, the new writer's disk read-write,
    # promoted, published; the old writer's disk is released only after that (background).
    mission.wait(lambda: _event_line(running.log.read_text(), "provision step done",
                                     "detach rw disk from", f"({WRITER})") > -1,
                 30, "the old writer's disk released")
    log = running.log.read_text()
    order = [_event_line(log, *words) for words in (
        ("event=node_confirmed_dead", f"node={WRITER}"),
        ("event=action_done", "action=PersistEpoch(epoch=2"),
        (f"fenced vm={WRITER} addr=",),
        ("provision step done", "attach rw disk to", f"({failover.new_writer})"),
        ("event=action_done", f"action=PromoteNode({failover.new_writer},epoch=2)"),
        ("event=action_done", "action=PublishMap(", f"writer={failover.new_writer})"),
        ("provision step done", "detach rw disk from", f"({WRITER})"))]
    assert order[0] > -1 and order == sorted(order), order
    # the fence: exactly the old writer's QEMU client addresses, no reader's
    fenced = set(mission.fenced_addresses(WRITER, running.log))
    assert fenced and fenced <= watchers, (fenced, watchers)
    assert _blocklist(mission) - blocklisted == fenced
    assert not (watchers - fenced) & _blocklist(mission)
    _say(f"blocklisted for {WRITER}: {sorted(fenced)} (of the image's watchers {sorted(watchers)})")

    # On its side of the cut the old writer runs on, still the writer of epoch 1 ...
    inside = _guest_health(sandbox_vms, WRITER, address)
    assert (inside["role"], inside["epoch"]) == ("writer", 1), inside
    # ... and the stale writer process's writes to the shared disk fail.
    mission.wait(lambda: "failed" in mission.stale_writer_log(WRITER), 60,
                 "the cut-off stale writer's failed write")
    outcome = mission.stale_write_outcome(WRITER)
    _say(f"stale writer in the cut-off VM: {outcome}; disks now {_modes(mission)}")
    assert "errno=5 EIO" in outcome
    _say(mission.landmark_intact())
    assert _modes(mission)[failover.new_writer] == "rw"
    image_before = image_digest(mission)
    # A client on its side of the cut (in the other reader's guest) holds an epoch-1 write grant:
    # the old writer takes the put and its write meets a disk it no longer has.
    stale = [stale_put(mission, sandbox_vms, failover.other, address)]
    # (409 not_writer, outcome unknown: the write met a fenced disk; the writer stops and the
    # client library asks the coordinator for the writer again)
    assert stale[0] == (409, "not_writer"), f"stale put to the cut-off writer -> {stale}"

    healed = time.monotonic()  # figures below count from the heal command (~0.2 s of SSH)
    cut_writer(True)
    _say("route healed")
    mission.wait(lambda: _health(address)["epoch"] == 2, 30, f"{WRITER} demoted")
    demoted = round(time.monotonic() - healed, 2)
    _say(f"{WRITER} a reader of epoch 2 {demoted} s after the heal")
    # Who ended epoch 1 on the old writer's side must show: the coordinator's demotion once
    # the route healed, or, when the cut outlasted a self-test period (waiting for the new
    # writer to settle before the image digest makes it longer), the agent itself: its
    # self-test met the fenced disk (device_fenced), it stepped down and took epoch 2 from
    # its disk. Which one comes first is a race; one of them must have happened.
    journal = sandbox_vms.exec(WRITER, ["journalctl", "-b", "-u", UNIT_NAME, "--no-pager",
                                        "-o", "cat"]).stdout
    by_itself = "event=device_fenced" in journal and "cause=DeviceFenced" in journal
    old_writer_steps_down(mission, running, WRITER, image_before, healed, _say)
    if by_itself:
        _say(f"{WRITER} stepped down by itself: its self-test met its fenced disk")
    else:  # the demotion runs on a side thread of the coordinator: its log line may follow
        mission.wait(lambda: f"action=DemoteNode({WRITER},epoch=2)" in running.log.read_text(),
                     30, f"the coordinator's DemoteNode({WRITER}) in its log")
        _say(f"{WRITER} demoted by the coordinator")
    stale.append(stale_put(mission, sandbox_vms, failover.other, address))
    assert stale[-1][0] == 409, f"stale put after the heal -> {stale}"  # epoch 1 is over
    assert image_digest(mission) == image_before
    _say(f"stale epoch-1 puts to {WRITER}: during the cut -> {stale[0]}, after -> {stale[1]}")
    assert _modes(mission) == {WRITER: "ro", failover.new_writer: "rw", failover.other: "ro"}
    _say(f"failover with a writer cut off from the coordinator: announced "
         f"{failover.announced} s, put acknowledged {failover.first_ack} s; demoted "
         f"{demoted} s after the heal; rejoin {mission.timings['rejoin']} s")


def _in_sync(fleet: Mission, vm: str) -> bool:
    now = member(status_of(fleet), vm)
    return now["role"] == "reader" and bool(now["in_sync"])


def _fleet_disk(fleet: Mission, vms: VmSet, vm: str) -> str:
    """The guest device (libvirt target) the fleet's image has in ``vm``'s domain."""
    source = f"{fleet.config.ceph.pool}/{fleet.config.fleet.image}"
    domain = vms.vm(vm)
    listing = subprocess.run(["virsh", "-c", domain.uri, "domblklist", domain.domain],
                             capture_output=True, text=True, timeout=60, check=True)
    return next(line.split()[0] for line in listing.stdout.splitlines()
                if line.split()[1:] == [source])


def test_writer_whose_disk_is_pulled_fails_its_self_test_and_is_replaced(
        mission: Mission, sandbox_vms: VmSet) -> None:  # noqa: F811
    """A real device error on the writer, no fault the coordinator can see: libvirt unplugs
    the writer's disk from its running guest under the recorded workload. The writer's next
    write fails on the device, its agent stops writing and reports its failed self-test, and
    that report alone (no failed probe needed, no hypervisor event: the domain runs on) gets a
    reader promoted: one failover, the history clean on every node, fsck clean; once the
    coordinator gave it its disk back read-only and demoted it, the node is an in-sync reader
    again by itself and holds what the others hold."""
    running = continue_under_stream(mission, "/selftest")
    status = status_of(mission)
    old, epoch = status["map"]["writer"], status["map"]["epoch"]
    domain = sandbox_vms.vm(old)
    device = _fleet_disk(mission, sandbox_vms, old)
    _say(f"detaching {old}'s disk {device} through libvirt (the guest keeps running)")

    def pull() -> None:
        subprocess.run(["virsh", "-c", domain.uri, "detach-disk", domain.domain, device,
                        "--live"], capture_output=True, timeout=60, check=True)

    failover = fail_over_under_stream(mission, running, old, pull, _say, epoch=epoch + 1,
                                      back_by_itself=True)
    evidence = confirmed_dead(running.log, old)
    _say(f"{failover.new_writer} writer {failover.first_ack} s after the unplug; {evidence}")
    assert "selftest_failed=True" in evidence and "hypervisor_down=''" in evidence, evidence
    check = fsck(mission)
    assert check.returncode == 0, check.stdout + check.stderr
    # the release gives it a read-only disk, the demotion reopens its device: back in sync
    mission.wait(lambda: _modes(mission).get(old) == "ro" and _in_sync(mission, old), 120,
                 f"{old} back as an in-sync reader on a read-only disk, by itself")
    running.recorded.check()  # the node back holds what the others hold
    assert status_of(mission)["map"]["epoch"] == epoch + 1
