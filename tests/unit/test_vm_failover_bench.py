"""The VM failover benchmark's breakdown: phases from the coordinator's log, the promotion's
steps from the new writer's agent log, the put client's side. Pure parsing, no sandbox."""

from __future__ import annotations

from datetime import datetime

import pytest

from bench.vm_failover_bench import client_steps, details, guest_steps, log_events, phases

pytestmark = pytest.mark.unit

T0 = datetime(2026, 12, 3, 9, 0, 0).timestamp()

COORDINATOR = """\
2026-12-03 08:59:59,900 INFO event=probe_failed fleet=demo node=vm1 refused=False
2026-12-03 09:00:00,100 INFO event=client_report fleet=demo node=vm1 reason='refused'
2026-12-03 09:00:00,120 INFO event=probe_failed fleet=demo node=vm1 refused=True
2026-12-03 09:00:00,130 WARNING event=node_confirmed_dead fleet=demo node=vm1 record=x
2026-12-03 09:00:00,200 INFO event=action_done action=FenceNode(vm1,epoch=3)
2026-12-03 09:00:00,700 INFO provision step done action='detach rbd disk from (vm2)' seconds=0.450
2026-12-03 09:00:00,800 INFO provision step done action='attach rw disk to (vm2)' seconds=0.090
2026-12-03 09:00:01,900 INFO event=action_done action=PromoteNode(vm2,epoch=3)
2026-12-03 09:00:01,950 INFO event=action_done action=PublishMap(epoch=3,rev=9,writer=vm2)
"""

_AGENT = "level=INFO logger=agents.agent"
GUEST = "".join(f"ts=2026-12-03 {at} {_AGENT} {message}\n" for at, message in (
    ("10:00:05,000", "event=role_changed node=vm2 from=reader/2 to=promoting/3 "
                     "cause=PromoteRequested"),
    ("10:00:06,000", "event=promotion_warm node=vm2 applied_seq=7 seconds=0.050"),
    ("10:00:06,100", "event=epoch_record node=vm2 epoch=3 seq=8"),
    ("10:00:06,150", "event=role_changed node=vm2 from=promoting/3 to=writer/3 "
                     "cause=EpochRecordWritten")))


def test_phases_are_found_in_order_from_the_fault() -> None:
    events = log_events(COORDINATOR, T0)
    assert len(events) == 8  # the probe failure before the fault is not one of them
    got = phases(events, T0, "vm1", "vm2")
    assert got == {"evidence": 0.1, "detect": 0.13, "fence": 0.2, "switch": 0.8,
                   "promote": 1.9, "announce": 1.95}
    lines = details(events, T0, T0 + 1.95)
    assert lines[0] == "+0.100 event=client_report reason='refused' node=vm1"
    assert "seconds=0.450" in lines[4] and "detach" in lines[4]


def test_a_phase_missing_leaves_the_later_ones_unmatched_from_the_earlier() -> None:
    events = log_events(COORDINATOR, T0)
    got = phases(events, T0, "vm1", "vm3")  # another candidate: no switch, no promotion
    assert got["fence"] == 0.2 and got["switch"] is None and got["promote"] is None


def test_guest_steps_of_the_last_promotion() -> None:
    older = GUEST.splitlines()[0].replace("10:00:05", "09:50:05") + "\n"  # one that failed
    steps = guest_steps(older + GUEST)
    assert steps == {"device": 0.95, "adopt": 1.0, "epoch": 1.1, "writer": 1.15}
    cold = GUEST.replace("promotion_warm node=vm2 applied_seq=7 seconds=0.050",
                         "promotion_cold node=vm2 reason=no_reader")
    assert guest_steps(cold) == {"adopt": 1.0, "cold": 1.0, "epoch": 1.1, "writer": 1.15}
    assert guest_steps("nothing promoted\n") == {}


def test_client_steps() -> None:
    targets = [(T0 - 1, "vm1", 2), (T0 + 0.1, "vm1", 2), (T0 + 2.0, "vm2", 3)]
    sent = [(T0 - 0.5, T0 - 0.4, "vm1", "ok"), (T0 + 0.1, T0 + 0.12, "vm1", "AgentUnreachable"),
            (T0 + 2.01, T0 + 2.2, "vm2", "ok")]
    assert client_steps(targets, sent, T0, "vm1", "vm2") == {
        "learn": 2.0, "to_old": [(0.12, "AgentUnreachable")], "first_to_new": (2.01, 2.2, "ok")}
