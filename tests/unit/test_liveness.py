"""Failure detector: suspect on one loss, dead only when confirmed; truth table + properties."""

from __future__ import annotations

import pytest
from hypothesis import given, seed, settings
from hypothesis import strategies as st

from orchestrator.core.liveness import (
    FailureReported,
    HeartbeatReceived,
    HypervisorReportedDown,
    HypervisorReportedUp,
    Liveness,
    LivenessConfig,
    Observation,
    ProbeFailed,
    ProbeSucceeded,
    SelfTestFailed,
    Verdict,
)
from orchestrator.errors import ConfigError

pytestmark = pytest.mark.unit

CFG = LivenessConfig(probe_interval=0.2, suspect_after=0.5, dead_after=1.2, confirm_failures=3)
A, S, D = Verdict.ALIVE, Verdict.SUSPECT, Verdict.DEAD


def run(observations: list[Observation], now: float) -> Verdict:
    lv = Liveness(CFG).watch("n", 0.0)
    for obs in observations:
        lv = lv.observe(obs)
    return lv.verdict("n", now)


# Truth table: observations (all about node n) and the verdict at `now`.
@pytest.mark.parametrize(
    ("observations", "now", "expected"),
    [
        ([], 0.1, A),
        ([], 0.5, S),  # quiet for suspect_after
        ([], 1.2, S),  # quiet for dead_after: the silence may be ours, no evidence
        ([], 99.0, S),
        ([ProbeFailed("n", 1.3)], 1.3, D),  # long silence, and a probe after it failed
        ([FailureReported("n", 1.3)] * 5, 5.0, S),  # clients' word is no evidence
        ([HeartbeatReceived("n", 1.0)], 1.4, A),
        ([ProbeFailed("n", 0.1)], 0.1, S),  # one lost probe: suspect only
        ([ProbeFailed("n", 0.1), ProbeFailed("n", 0.3)], 0.3, S),
        ([ProbeFailed("n", 0.1), ProbeFailed("n", 0.3), ProbeFailed("n", 0.5)], 0.5, D),
        ([ProbeFailed("n", 0.1), ProbeFailed("n", 0.15), ProbeFailed("n", 0.2)], 0.2, S),
        ([ProbeFailed("n", 0.1), ProbeFailed("n", 0.15), ProbeFailed("n", 0.2)], 0.5, D),
        # heartbeats still arrive: probes that time out mean slow, not dead
        (
            [
                HeartbeatReceived("n", 0.4),
                ProbeFailed("n", 0.5),
                ProbeFailed("n", 0.6),
                ProbeFailed("n", 0.7),
            ],
            0.7,
            S,
        ),
        (
            [
                ProbeFailed("n", 0.1),
                ProbeFailed("n", 0.3),
                ProbeSucceeded("n", 0.4),
                ProbeFailed("n", 0.5),
            ],
            0.5,
            S,
        ),  # success resets the count
        ([FailureReported("n", 0.1, "client-1")], 0.1, S),  # a client report alone: suspect
        ([FailureReported("n", 0.1)] * 10, 0.2, S),  # ... even many of them
        ([FailureReported("n", 0.1), HeartbeatReceived("n", 0.2)], 0.2, A),
        ([SelfTestFailed("n", 0.1, "EIO on journal")], 0.1, D),  # its own word
        ([HeartbeatReceived("n", 0.1, selftest_ok=False)], 0.1, D),
        ([SelfTestFailed("n", 0.1), ProbeSucceeded("n", 0.2)], 0.2, D),  # a probe can't clear it
        ([SelfTestFailed("n", 0.1), HeartbeatReceived("n", 0.3)], 0.3, A),  # a passing one can
    ],
)
def test_truth_table(observations: list[Observation], now: float, expected: Verdict) -> None:
    assert run(observations, now) is expected


def refused(at: float) -> ProbeFailed:
    return ProbeFailed("n", at, refused=True)


# Refused connections: the host answered and no agent listens. Evidence, but two in a row.
@pytest.mark.parametrize(
    ("observations", "now", "expected"),
    [
        ([refused(0.1)], 0.1, S),  # one refusal is no death
        ([refused(0.1), refused(0.11)], 0.11, D),  # no silence needed: 0.11 < suspect_after
        ([ProbeFailed("n", 0.1), refused(0.11)], 0.11, S),  # a timeout and one refusal
        ([refused(0.1), ProbeFailed("n", 0.2)], 0.2, S),  # the refusals were not in a row
        ([refused(0.1), ProbeFailed("n", 0.2), refused(0.3)], 0.3, S),
        ([refused(0.1), ProbeFailed("n", 0.2), refused(0.3), refused(0.31)], 0.31, D),
        ([refused(0.1), ProbeSucceeded("n", 0.2), refused(0.3)], 0.3, S),  # it answered
        ([refused(0.1), HeartbeatReceived("n", 0.2), refused(0.3)], 0.3, S),
        # refusals are failed probes: three of them after suspect_after are dead anyway
        ([refused(0.5), ProbeFailed("n", 0.6), ProbeFailed("n", 0.7)], 0.7, D),
    ],
)
def test_refused_probes_table(observations: list[Observation], now: float,
                              expected: Verdict) -> None:
    assert run(observations, now) is expected


def test_refusals_within_the_promotion_grace_are_discounted() -> None:
    """The swap's grace holds for refusals as for any failed probe; after it they count."""
    lv = Liveness(CFG).watch("n", 0.0).promoted("n", 10.0, epoch=2)
    for t in (10.1, 10.2, 10.3):
        lv = lv.observe(ProbeFailed("n", t, refused=True))
    assert lv.verdict("n", 10.3) is not D
    for t in (11.3, 11.31):
        lv = lv.observe(ProbeFailed("n", t, refused=True))
    assert lv.verdict("n", 11.31) is D


def test_unwatched_nodes_are_alive_and_forget_stops_watching() -> None:
    lv = Liveness(CFG).watch("n", 0.0)
    assert lv.verdict("other", 99.0) is A
    assert lv.forget("n").verdicts(99.0) == {}
    assert lv.verdicts(99.0) == {"n": S}


@pytest.mark.parametrize(
    "kwargs",
    [{"confirm_failures": 1}, {"dead_after": 0.4, "suspect_after": 0.5}, {"probe_timeout": 0},
     {"confirm_refused": 1}],
)
def test_config_refuses_settings_that_act_on_one_loss(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        LivenessConfig(**kwargs)  # type: ignore[arg-type]


@seed(5)
@settings(max_examples=300)
@given(
    n=st.integers(min_value=10, max_value=60),
    lost=st.integers(min_value=0, max_value=59),
    reports=st.lists(st.integers(min_value=0, max_value=59), max_size=5),
    was_refused=st.booleans(),
)
def test_one_lost_heartbeat_or_probe_never_kills(n: int, lost: int, reports: list[int],
                                                 was_refused: bool) -> None:
    """A node that answers every probe_interval except once (a timeout or a refusal) is never
    DEAD, whatever clients say."""
    lv = Liveness(CFG).watch("n", 0.0)
    for i in range(n):
        t = (i + 1) * CFG.probe_interval
        if i == lost:
            lv = lv.observe(ProbeFailed("n", t, refused=was_refused))
        else:
            lv = lv.observe(ProbeSucceeded("n", t) if i % 2 else HeartbeatReceived("n", t))
        if i in reports:
            lv = lv.observe(FailureReported("n", t))
        assert lv.verdict("n", t) is not D
        assert lv.verdict("n", t + CFG.probe_interval / 2) is not D


@seed(6)
@settings(max_examples=200)
@given(start=st.floats(min_value=0, max_value=1000), probes=st.integers(3, 10))
def test_a_dead_node_is_confirmed_within_confirm_failures_probes(start: float, probes: int) -> None:
    lv = Liveness(CFG).watch("n", start)
    t = start
    for _ in range(probes):
        t += CFG.probe_interval
        lv = lv.observe(ProbeFailed("n", t))
    assert lv.verdict("n", t) is D


@seed(7)
@settings(max_examples=300)
@given(
    gaps=st.lists(st.floats(min_value=0.0, max_value=30.0), min_size=1, max_size=20),
    reports=st.integers(min_value=0, max_value=5),
)
def test_no_failed_probe_and_a_passing_self_test_is_never_dead(gaps: list[float],
                                                               reports: int) -> None:
    """Heartbeats at any spacing (the coordinator's loop may have been blocked for seconds),
    any number of client reports: without a failed probe or self-test, never DEAD."""
    lv = Liveness(CFG).watch("n", 0.0)
    t = 0.0
    for gap in gaps:
        t += gap
        assert lv.verdict("n", t) is not D
        lv = lv.observe(HeartbeatReceived("n", t))
    for _ in range(reports):
        lv = lv.observe(FailureReported("n", t))
    assert lv.verdict("n", t + 1000.0) is not D


def test_a_promotion_discounts_what_the_swap_explains() -> None:
    lv = Liveness(CFG).watch("n", 0.0).promoted("n", 10.0, epoch=2)
    lv = lv.observe(SelfTestFailed("n", 9.9, "device-read"))  # observed before the swap
    lv = lv.observe(HeartbeatReceived("n", 10.2, selftest_ok=False, epoch=1))  # older epoch
    for t in (10.3, 10.6, 10.9, 11.1):  # slow answers within dead_after of the promotion
        lv = lv.observe(ProbeFailed("n", t))
    assert lv.verdict("n", 11.1) is S
    for t in (11.3, 11.5, 11.7):  # after the grace failed probes count as usual
        lv = lv.observe(ProbeFailed("n", t))
    assert lv.verdict("n", 11.7) is D
    fresh = Liveness(CFG).watch("n", 0.0).promoted("n", 10.0, epoch=2)
    fresh = fresh.observe(SelfTestFailed("n", 10.5, "device-read", epoch=2))
    assert fresh.verdict("n", 10.5) is D  # a failure in the new epoch is its own


DOWN, UP = HypervisorReportedDown, HypervisorReportedUp


# The hypervisor's word (libvirt lifecycle events): evidence, not silence.
@pytest.mark.parametrize(
    ("observations", "now", "expected"),
    [
        ([DOWN("n", 0.1, "paused")], 0.1, D),  # at once: no probe, no silence needed
        ([DOWN("n", 0.1, "stopped")], 0.1, D),
        ([DOWN("n", 0.1, "crashed")], 0.1, D),
        ([DOWN("n", 0.1, "paused"), UP("n", 0.2)], 0.2, A),  # resumed before anyone acted
        ([DOWN("n", 0.1, "stopped"), UP("n", 0.4)], 0.9, S),  # started, then quiet as usual
        # an answer sent before the pause and read after the event says nothing of now
        ([DOWN("n", 0.1, "paused"), HeartbeatReceived("n", 0.2)], 0.2, D),
        ([DOWN("n", 0.1, "paused"), ProbeSucceeded("n", 0.2)], 0.2, D),
        ([DOWN("n", 0.1, "paused"), UP("n", 0.2), DOWN("n", 0.3, "stopped")], 0.3, D),
        ([UP("n", 0.1)], 0.1, A),  # an up event alone changes nothing
        ([UP("n", 0.1)], 0.6, S),  # and it is no heartbeat: silence still counts from 0
        # an up event does not clear the node's own failed self-test
        ([SelfTestFailed("n", 0.1), DOWN("n", 0.2, "paused"), UP("n", 0.3)], 0.3, D),
    ],
)
def test_hypervisor_reports_table(observations: list[Observation], now: float,
                                  expected: Verdict) -> None:
    assert run(observations, now) is expected


def test_a_hypervisor_report_survives_the_promotion_grace() -> None:
    """The disk swap explains slow probes, never a paused or stopped domain."""
    lv = Liveness(CFG).watch("n", 0.0).promoted("n", 10.0, epoch=2)
    lv = lv.observe(DOWN("n", 10.1, "paused"))
    assert lv.verdict("n", 10.1) is D
    rec = lv.record("n")
    assert rec is not None and rec.hypervisor_down == "paused"
