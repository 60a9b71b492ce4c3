"""orchestrator.core.reports: each agent report is admitted once, in bounded memory."""

from __future__ import annotations

import pytest

from orchestrator.core.reports import REPORT_TTL, TAKEOVER_SKEW, ReplayGuard, nonce, watch_from
from orchestrator.errors import ReportOutOfOrder, ReportReplayed

pytestmark = pytest.mark.unit

T0 = 1_000_000.0  # the guard started watching here (wall time)


def test_a_report_is_admitted_once_and_a_new_signing_is_a_new_report() -> None:
    guard = ReplayGuard(since=T0)
    now = T0 + 100
    guard.admit("w", "mac-1", now + REPORT_TTL, now)
    with pytest.raises(ReportReplayed) as replay:
        guard.admit("w", "mac-1", now + REPORT_TTL, now + 5)
    assert replay.value.node == "w"
    # the same body signed again (a lagging report re-sent) has another MAC: admitted
    guard.admit("w", "mac-2", now + 1 + REPORT_TTL, now + 1)
    # nonces are per node: another node's report with an equal nonce is its own
    guard.admit("r1", "mac-1", now + REPORT_TTL, now)


def test_a_replay_is_refused_until_its_grant_expires_and_then_forgotten() -> None:
    guard = ReplayGuard(since=T0)
    signed = T0 + 100
    guard.admit("w", "mac-1", signed + REPORT_TTL, signed)
    for later in (1.0, 30.0, REPORT_TTL - 0.001):
        with pytest.raises(ReportReplayed):
            guard.admit("w", "mac-1", signed + REPORT_TTL, signed + later)
    # once the grant is expired it is refused as such before the guard is asked; the guard
    # drops it at the next admission instead of keeping it for ever
    guard.admit("w", "mac-2", signed + REPORT_TTL + 1 + REPORT_TTL, signed + REPORT_TTL + 1)
    assert guard.remembered("w") == 1


def test_reports_signed_before_the_guard_started_are_refused() -> None:
    """A restarted coordinator cannot know what its predecessor admitted: a report whose
    grant was made before the start (it expires within REPORT_TTL of it) is refused, the
    next one signed after it is not."""
    guard = ReplayGuard(since=T0)
    with pytest.raises(ReportReplayed, match="before this coordinator started"):
        guard.admit("w", "old", T0 - 1 + REPORT_TTL, T0 + 0.5)
    guard.admit("w", "new", T0 + 0.5 + REPORT_TTL, T0 + 0.5)


def test_memory_is_bounded_per_node_and_forgotten_reports_stay_refused() -> None:
    guard = ReplayGuard(since=T0, capacity=4)
    now = T0 + 100
    for i in range(10):  # a node flooding within one grant lifetime
        guard.admit("w", f"mac-{i}", now + i * 0.01 + REPORT_TTL, now + i * 0.01)
        assert guard.remembered("w") <= 4
    # the forgotten ones (0..5) cannot be replayed either: refused as older than remembered
    for i in range(6):
        with pytest.raises(ReportReplayed, match="older than"):
            guard.admit("w", f"mac-{i}", now + i * 0.01 + REPORT_TTL, now + 1)
    for i in range(6, 10):
        with pytest.raises(ReportReplayed, match="received already"):
            guard.admit("w", f"mac-{i}", now + i * 0.01 + REPORT_TTL, now + 1)
    # the flood costs only that node: another node's first report is admitted
    guard.admit("r1", "mac-0", now + REPORT_TTL, now + 1)
    guard.admit("w", "mac-new", now + 2 + REPORT_TTL, now + 2)


def test_the_nonce_is_the_grant_mac() -> None:
    assert nonce("eyJwYXlsb2FkIjoxfQ.bWFj") == "bWFj"
    with pytest.raises(ValueError):
        ReplayGuard(since=T0, capacity=0)


def test_a_coordinator_watches_from_its_start_or_its_taking_of_the_lease_plus_skew() -> None:
    # never held the lease (a standby): from its start
    assert watch_from(T0, None) == T0
    # took the lease later: what its predecessor admitted until then, and what agents whose
    # clocks run ahead signed "after" it, is unknown to it
    assert watch_from(T0, T0 + 500) == T0 + 500 + TAKEOVER_SKEW
    # took it at start (within the skew): still never earlier than its start
    assert watch_from(T0 + 10, T0 + 9) == T0 + 11


def test_a_report_signed_before_a_takeover_is_refused_and_a_fresh_one_admitted() -> None:
    took_lease = T0 + 500
    guard = ReplayGuard(since=watch_from(T0, took_lease))
    # signed a second before the takeover (admitted by the predecessor): refused
    with pytest.raises(ReportReplayed):
        guard.admit("w", "mac-old", took_lease - 1 + REPORT_TTL, took_lease + 3)
    # signed inside the skew margin: refused as well
    with pytest.raises(ReportReplayed):
        guard.admit("w", "mac-skew", took_lease + TAKEOVER_SKEW / 2 + REPORT_TTL,
                    took_lease + 3)
    guard.admit("w", "mac-new", took_lease + TAKEOVER_SKEW + REPORT_TTL, took_lease + 3)


def test_a_report_about_its_sender_signed_before_an_admitted_one_is_refused_as_late() -> None:
    """A heartbeat held back by a network cut and delivered after a newer one must not roll
    the node's state back; the lagging reports a writer sends about others are not ordered."""
    guard = ReplayGuard(since=T0)
    now = T0 + 100
    guard.admit("w", "hb-2", now + 2 + REPORT_TTL, now + 2, ordered=True)
    with pytest.raises(ReportOutOfOrder, match=r"signed 2\.000 s before") as late:
        guard.admit("w", "hb-1", now + REPORT_TTL, now + 7, ordered=True)
    assert late.value.node == "w" and isinstance(late.value, ReportReplayed)
    guard.admit("w", "lagging-1", now + REPORT_TTL, now + 7)  # not ordered: admitted
    guard.admit("r1", "hb-1", now + REPORT_TTL, now + 7, ordered=True)  # per node
    # one signed at the same instant as the newest (agents' threads) is not late
    guard.admit("w", "st-2", now + 2 + REPORT_TTL, now + 7, ordered=True)
    guard.admit("w", "hb-3", now + 3 + REPORT_TTL, now + 7, ordered=True)


def test_after_the_newest_report_expired_an_agent_whose_clock_stepped_back_is_heard_again() -> None:
    guard = ReplayGuard(since=T0)
    now = T0 + 100
    guard.admit("w", "ahead", now + 30 + REPORT_TTL, now, ordered=True)  # its clock 30 s fast
    with pytest.raises(ReportOutOfOrder):  # corrected: refused while the newest is valid...
        guard.admit("w", "fixed-1", now + 1 + REPORT_TTL, now + 1, ordered=True)
    later = now + 30 + REPORT_TTL  # ... and heard once that one expired (at most REPORT_TTL)
    guard.admit("w", "fixed-2", later + REPORT_TTL, later, ordered=True)
