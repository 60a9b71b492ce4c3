"""FleetService around a promotion: what its own disk swap explains is not a death.

The loop is not started: the service is made active (observations queued for an inactive one
stay queued and change nothing) and they go through the same methods the loop calls, on a fake
clock; the verdicts are read from the service's liveness state.
"""

from __future__ import annotations

import pytest

from agents.core.protocol import Health
from orchestrator.coordinator.service import FleetService, ServiceSettings, _Outstanding
from orchestrator.core.fleetmap import initial_map
from orchestrator.core.liveness import (
    HeartbeatReceived,
    LivenessConfig,
    ProbeFailed,
    SelfTestFailed,
    Verdict,
)
from orchestrator.errors import AgentUnreachable
from orchestrator.ports import CoordinatorPorts
from orchestrator.testing.fakes import FakeClock, MemoryLeaseBoard, MemoryStateStore, NeverCalled

pytestmark = pytest.mark.unit


class Probes:
    """The agents port's health probe only: each address answers what ``answers`` says
    (an exception class to raise, as the transport does, from its cause)."""

    def __init__(self, answers: dict[str, type[OSError]]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    def health(self, address: str, timeout: float) -> Health:
        self.asked.append(address)
        cause = self.answers[address]
        raise AgentUnreachable(address, address, "probe") from cause()


def service(agents: object | None = None) -> tuple[FleetService, FakeClock]:
    clock = FakeClock()
    store = MemoryStateStore(MemoryLeaseBoard(clock), "f", "c1", 10.0)
    settings = ServiceSettings(url="http://c1", liveness=LivenessConfig())
    bootstrap = initial_map("f", "w", {"w": ("w:1", "writer"), "r2": ("r2:1", "reader")})
    ports = CoordinatorPorts(store=store, fencer=NeverCalled(),
                             agents=agents or NeverCalled(),  # type: ignore[arg-type]
                             clock=clock, wall=lambda: 0.0)
    svc = FleetService(ports, settings, secret=b"k", bootstrap=bootstrap)
    assert store.acquire()
    svc._become_active(clock.monotonic())
    assert svc._events.empty()
    return svc, clock


def verdict(svc: FleetService, node: str, clock: FakeClock) -> Verdict:
    svc._drain(clock.monotonic())  # what the loop would apply before its next verdict
    assert svc._events.empty(), "an observation was queued but never applied"
    return svc._liveness.verdict(node, clock.monotonic())


def _fresh_contact(agents: Probes) -> tuple[FleetService, FakeClock]:
    """A service whose members were heard from 50 ms ago (well within suspect_after), its
    next scheduled probe round a second away: only a hurried probe goes out now."""
    svc, clock = service(agents)
    clock.forward(0.05)
    svc._next_probe = clock.monotonic() + 1.0
    return svc, clock


def test_slow_probes_right_after_the_swap_do_not_kill_the_new_writer() -> None:
    svc, clock = service()
    before = clock.monotonic()
    clock.forward(0.1)
    svc._after_promotion("r2", 2)
    svc.submit(SelfTestFailed("r2", before, "device-read"))  # sent during the swap
    svc._drain(clock.monotonic())
    for _ in range(4):  # the guest digests its hot-plug: probes time out
        clock.forward(0.25)
        svc._observe_probe("r2", None)
    assert verdict(svc, "r2", clock) is not Verdict.DEAD
    clock.forward(svc.settings.liveness.dead_after)  # then silence and a failed probe are
    svc._observe_probe("r2", None)
    assert verdict(svc, "r2", clock) is Verdict.DEAD


def test_after_the_grace_probes_confirm_a_death_as_usual() -> None:
    svc, clock = service()
    svc._after_promotion("r2", 2)
    clock.forward(svc.settings.liveness.dead_after)
    svc._observe_probe("r2", None)  # the grace is over: failed probes count again
    svc._liveness = svc._liveness.observe(ProbeFailed("r2", clock.monotonic()))
    svc._liveness = svc._liveness.observe(ProbeFailed("r2", clock.monotonic()))
    assert svc._liveness.record("r2").failed_probes == 3  # type: ignore[union-attr]
    svc.submit(SelfTestFailed("r2", clock.monotonic(), "device-read"))  # a fresh report
    svc._drain(clock.monotonic())
    assert verdict(svc, "r2", clock) is Verdict.DEAD


def test_a_failed_self_test_from_before_the_promotion_arriving_late_is_moot() -> None:
    """Seen on VMs: the reader's self-test failed while its disk was swapped; the heartbeat
    and probe answer carrying it (epoch 1) landed after its promotion to writer of epoch 2."""
    svc, clock = service()
    svc._after_promotion("r2", 2)
    clock.forward(0.5)
    svc.submit(HeartbeatReceived("r2", clock.monotonic(), selftest_ok=False, epoch=1))
    svc.submit(SelfTestFailed("r2", clock.monotonic(), "device-read", epoch=1))
    svc._drain(clock.monotonic())
    svc._observe_probe("r2", Health(node="r2", fleet="f", role="reader", epoch=1,
                                    applied_seq=5, safe_seq=5, selftest="failed"))
    assert verdict(svc, "r2", clock) is Verdict.ALIVE


def test_a_failed_self_test_in_the_new_epoch_still_kills_the_new_writer() -> None:
    svc, clock = service()
    svc._after_promotion("r2", 2)
    clock.forward(0.5)
    svc._observe_probe("r2", Health(node="r2", fleet="f", role="writer", epoch=2,
                                    applied_seq=5, safe_seq=5, selftest="failed"))
    assert verdict(svc, "r2", clock) is Verdict.DEAD



class Answers:
    """The agents port's health probe: each address answers ``health`` (set between probes)."""

    def __init__(self, health: Health) -> None:
        self.health_answer = health

    def health(self, address: str, timeout: float) -> Health:
        return self.health_answer


def _reader_health(selftest: str) -> Health:
    return Health(node="r2", fleet="f", role="reader", epoch=1, applied_seq=5, safe_seq=5,
                  selftest=selftest)


@pytest.mark.parametrize("report_between", [True, False])
def test_a_probe_answer_overtaken_by_a_report_does_not_roll_the_node_back(
        report_between: bool) -> None:
    """Seen on VMs across a network cut: a probe answer written during the cut (the node's
    self-test had failed on its fenced disk) reached the coordinator after the heal, after the
    node's newer reports (it was healthy again), and confirmed it dead. An answer whose probe
    was sent before a report admitted since is contact, not news; one sent after is news."""
    agents = Answers(_reader_health("failed"))
    svc, clock = service(agents)
    assert svc._state is not None
    ticket = next(svc._tickets)
    svc._probing["r2"] = _Outstanding(ticket, clock.monotonic())  # sent (during the cut)
    clock.forward(0.3)
    if report_between:  # its newer heartbeat: healthy
        svc.submit(HeartbeatReceived("r2", clock.monotonic(), selftest_ok=True, epoch=1))
        svc._drain(clock.monotonic())
    clock.forward(0.3)
    svc._probe(svc._state.map.member("r2"), 0.3, ticket)  # its late answer
    expected = Verdict.ALIVE if report_between else Verdict.DEAD
    assert verdict(svc, "r2", clock) is expected


def probe(svc: FleetService, node: str) -> None:
    """What the loop does for one probe of ``node``: send it (the pool thread's body, run
    here) and fold its answer in."""
    assert svc._state is not None
    ticket = next(svc._tickets)
    svc._probing[node] = _Outstanding(ticket, svc.clock.monotonic())
    svc._probe(svc._state.map.member(node), 0.3, ticket)
    svc._drain(svc.clock.monotonic())


def test_a_refused_probe_is_confirmed_by_a_second_one_sent_at_once() -> None:
    """A killed agent in a running VM: its port refuses. The first refusal asks for the next
    probe in the same iteration; the second confirms the death, no silence waited for."""
    agents = Probes({"w:1": ConnectionRefusedError, "r2:1": TimeoutError})
    svc, clock = _fresh_contact(agents)
    probe(svc, "w")
    assert svc._liveness.verdict("w", clock.monotonic()) is Verdict.SUSPECT
    assert svc._next_probe == 0.0  # the confirming probe is due now
    probe(svc, "w")
    assert svc._liveness.verdict("w", clock.monotonic()) is Verdict.DEAD


def test_timed_out_probes_are_no_refusals() -> None:
    agents = Probes({"w:1": ConnectionRefusedError, "r2:1": TimeoutError})
    svc, clock = _fresh_contact(agents)
    for _ in range(3):
        probe(svc, "r2")
    assert svc._next_probe == clock.monotonic() + 1.0  # no probe hurried
    assert svc._liveness.verdict("r2", clock.monotonic()) is Verdict.SUSPECT
    record = svc._liveness.record("r2")
    assert record is not None and (record.failed_probes, record.refused_probes) == (3, 0)


def test_a_readers_refusals_take_the_usual_probe_count() -> None:
    """Only the writer's refusals are its quick death: a reader out sooner would gain the
    failover nothing and race the writer's word on it (the service's docstring)."""
    agents = Probes({"w:1": TimeoutError, "r2:1": ConnectionRefusedError})
    svc, clock = _fresh_contact(agents)
    for _ in range(2):
        probe(svc, "r2")
    assert svc._liveness.verdict("r2", clock.monotonic()) is Verdict.SUSPECT
    probe(svc, "r2")
    clock.forward(svc.settings.liveness.suspect_after)
    assert svc._liveness.verdict("r2", clock.monotonic()) is Verdict.DEAD  # 3 and the silence
