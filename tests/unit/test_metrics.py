"""The stdlib metrics Registry, and the coordinator's series built on it.

Every exposition here is read back with the reference parser (prometheus_client), which keeps
a family's type and help only when its samples follow its own ``# HELP``/``# TYPE`` lines.
The coordinator's series come from a real FleetService (in-memory state store, fake clock,
fake fencer and agents) driven through a confirmed death and a failover.
"""

from __future__ import annotations

import collections
import math
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from agents.core.protocol import Health
from agents.metrics import Registry
from orchestrator.coordinator.api import CoordinatorAPI
from orchestrator.coordinator.metrics import FailoverTimer, TimelineCursor
from orchestrator.coordinator.service import FleetService, ServiceSettings
from orchestrator.core import election as el
from orchestrator.core.fleetmap import FleetMap, initial_map
from orchestrator.core.liveness import LivenessConfig, SelfTestFailed
from orchestrator.errors import AgentUnreachable, FencingFailed
from orchestrator.ports import CoordinatorPorts
from orchestrator.testing.fakes import FakeClock, MemoryLeaseBoard, MemoryStateStore

pytestmark = pytest.mark.unit

Families = dict[str, Any]


def parse(text: str) -> Families:
    """Families by name; each must have a type, a help text and a single block."""
    families: Families = {}
    for family in text_string_to_metric_families(text):
        assert family.name not in families, f"{family.name} split into several blocks"
        assert family.type != "untyped", f"{family.name} lost its type"
        assert family.documentation, f"{family.name} has no help"
        families[family.name] = family
    return families


def samples(families: Families, name: str, **labels: str) -> list[Sample]:
    """Samples named ``name`` (any family) whose labels include ``labels``."""
    return [s for f in families.values() for s in f.samples
            if s.name == name and labels.items() <= s.labels.items()]


def value(families: Families, name: str, **labels: str) -> float:
    found = samples(families, name, **labels)
    assert len(found) == 1, f"{name}{labels}: {found}"
    return float(found[0].value)


# -- Registry ----------------------------------------------------------------------------


def test_counters_and_declared_series_are_exposed_at_zero_before_any_event() -> None:
    r = Registry()
    r.counter("x_events_total", "Events")
    r.counter("x_pushes_total", "Pushes", ("result",), [("ok",), ("failed",)])
    r.counter("x_requests_total", "Requests", ("route",))  # label values unknown in advance
    r.histogram("x_wait_seconds", "Waits")
    families = parse(r.render())
    assert value(families, "x_events_total") == 0
    assert value(families, "x_pushes_total", result="ok") == 0
    assert value(families, "x_pushes_total", result="failed") == 0
    assert samples(families, "x_requests_total") == []
    assert families["x_requests"].type == "counter"  # the family is there, typed, empty
    assert value(families, "x_wait_seconds_count") == 0
    assert value(families, "x_wait_seconds_bucket", le="+Inf") == 0


def test_histogram_buckets_are_cumulative_with_sum_and_count() -> None:
    r = Registry()
    h = r.histogram("x_put_seconds", "Puts", ("route",), buckets=(0.1, 1.0))
    for seconds in (0.05, 0.1, 0.5, 7.0):
        h.observe(seconds, "put")
    families = parse(r.render())
    assert families["x_put_seconds"].type == "histogram"
    buckets = {s.labels["le"]: s.value for s in samples(families, "x_put_seconds_bucket")}
    assert buckets == {"0.1": 2, "1": 3, "+Inf": 4}  # le is "less or equal": 0.1 is in 0.1
    assert value(families, "x_put_seconds_sum", route="put") == pytest.approx(7.65)
    assert value(families, "x_put_seconds_count", route="put") == 4


def test_labelled_gauge_replace_drops_series_that_went_away() -> None:
    r = Registry()
    g = r.gauge("x_up", "Up per node", labelnames=("node",))
    r.gauge("x_level", "Level", lambda: 2.5)
    g.replace({("a",): 1.0, ("b",): 0.0})
    g.replace({("b",): 1.0})
    families = parse(r.render())
    assert [(s.labels, s.value) for s in families["x_up"].samples] == [({"node": "b"}, 1.0)]
    assert value(families, "x_level") == 2.5


def test_label_values_and_help_are_escaped() -> None:
    r = Registry()
    r.counter("x_odd_total", 'Help with \\ and\nnewline', ("path",), [('a"b\\c\nd',)])
    families = parse(r.render())
    assert families["x_odd"].documentation == "Help with \\ and\nnewline"
    assert samples(families, "x_odd_total")[0].labels == {"path": 'a"b\\c\nd'}


def test_special_values_render_as_the_format_spells_them() -> None:
    r = Registry()
    r.gauge("x_nan", "NaN", lambda: math.nan)
    r.gauge("x_neg", "-Inf", lambda: -math.inf)
    assert "x_nan NaN\n" in r.render() and "x_neg -Inf\n" in r.render()
    families = parse(r.render())
    assert math.isnan(value(families, "x_nan")) and value(families, "x_neg") == -math.inf


@pytest.mark.parametrize(("make", "message"), [
    (lambda r: r.counter("x_events", "no _total"), "_total"),
    (lambda r: r.counter("x-bad_total", "bad name"), "invalid metric name"),
    (lambda r: r.counter("x_total", "bad label", ("__x",)), "invalid label"),
    (lambda r: r.histogram("x_seconds", "le label", ("le",)), "'le'"),
    (lambda r: r.histogram("x_seconds", "unsorted", buckets=(1.0, 0.5)), "increasing"),
    (lambda r: r.histogram("x_seconds_count", "suffix"), "must not end"),
    (lambda r: r.gauge("x_g", "neither read nor labels"), "xor"),
    (lambda r: r.gauge("x_g", "both", lambda: 1.0, ("a",)), "xor"),
])
def test_malformed_metrics_are_refused(make: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make(Registry())


def test_a_histogram_owns_its_suffixed_names() -> None:
    r = Registry()
    r.histogram("x_seconds", "H")
    with pytest.raises(ValueError, match="twice"):
        r.gauge("x_seconds_count", "clash", lambda: 0.0)
    with pytest.raises(ValueError, match="twice"):
        r.histogram("x_seconds", "again")


def test_counters_refuse_to_go_down_or_take_wrong_labels() -> None:
    c = Registry().counter("x_total", "C", ("a",))
    with pytest.raises(ValueError, match="only grows"):
        c.inc("v", amount=-1)
    with pytest.raises(ValueError, match="takes labels"):
        c.inc()
    c.inc("v", amount=2)
    assert c.value("v") == 2 and c.value("w") == 0


# -- timeline -> failover durations ------------------------------------------------------


def durations(entries: list[tuple[float, str, str]]) -> list[float]:
    timer = FailoverTimer()
    return [d for e in entries if (d := timer.feed(e)) is not None]


def test_failover_is_timed_from_the_confirmed_death_to_the_map_naming_the_new_writer() -> None:
    assert durations([
        (10.0, "NodeFailed", "w"), (10.01, "PersistEpoch", "r1"), (10.1, "FenceNode", "w"),
        (11.0, "PromoteNode", "r1"), (11.5, "PublishMap", "r1"),
        (11.6, "DemoteNode", "w"),
    ]) == [pytest.approx(1.5)]


def test_a_reader_death_or_fence_is_no_failover() -> None:
    assert durations([
        (1.0, "NodeFailed", "r2"), (1.1, "PublishMap", "w"), (1.2, "AttachSpare", "s"),
        (5.0, "FenceNode", "r1"), (5.1, "PublishMap", "w"),
    ]) == []


def test_a_requested_failover_is_timed_from_its_first_step() -> None:
    # The reader death long before is over (its map was published): it is not the start.
    assert durations([
        (1.0, "NodeFailed", "r2"), (1.1, "PublishMap", "w"),
        (20.0, "PersistEpoch", "r1"), (20.2, "FenceNode", "w"), (20.5, "PromoteNode", "r1"),
        (20.6, "PublishMap", "r1"),
    ]) == [pytest.approx(0.6)]


def test_a_failed_candidate_and_a_writerless_interlude_stay_one_failover() -> None:
    assert durations([
        (0.0, "NodeFailed", "w"), (0.1, "PersistEpoch", "r1"), (0.2, "FenceNode", "w"),
        # r1's promotion failed (not on the timeline): r1 is fenced, no reader is in sync
        (0.8, "PersistEpoch", ""), (0.9, "FenceNode", "r1"), (1.0, "PublishMap", ""),
        # r2 catches up and is promoted
        (4.0, "PersistEpoch", "r2"), (4.5, "PromoteNode", "r2"), (5.0, "PublishMap", "r2"),
    ]) == [pytest.approx(5.0)]


def test_a_takeover_mid_failover_is_timed_from_this_process_first_step() -> None:
    assert durations([(3.0, "FenceNode", "w"), (3.5, "PromoteNode", "r1"),
                      (4.0, "PublishMap", "r1")]) == [pytest.approx(1.0)]


def test_cursor_hands_out_each_entry_once_even_when_the_deque_drops_old_ones() -> None:
    timeline: collections.deque[tuple[float, str, str]] = collections.deque(maxlen=4)
    cursor = TimelineCursor()
    timeline.extend([(1.0, "a", ""), (2.0, "b", "")])
    assert [e[1] for e in cursor.new(tuple(timeline), timeline.maxlen)] == ["a", "b"]
    assert cursor.new(tuple(timeline), timeline.maxlen) == ()
    timeline.extend([(3.0, "c", ""), (4.0, "d", ""), (5.0, "e", "")])  # "a" dropped
    assert [e[1] for e in cursor.new(tuple(timeline), timeline.maxlen)] == ["c", "d", "e"]
    timeline.extend([(float(t), f"n{t}", "") for t in range(6, 12)])  # more than maxlen
    assert [e[1] for e in cursor.new(tuple(timeline), timeline.maxlen)] == [
        "n8", "n9", "n10", "n11"]


# -- the coordinator's exposition --------------------------------------------------------


class FakeFleet:
    """Fencer and AgentControl: probes are not answered (the tests confirm deaths by failed
    self-tests), a promotion takes ``promote_seconds`` of the fake clock, and fences fail
    while ``fence_refused``."""

    def __init__(self, clock: FakeClock, promote_seconds: float) -> None:
        self.clock = clock
        self.promote_seconds = promote_seconds
        self.fence_refused = False
        self.fenced: list[str] = []

    def fence(self, vm: str) -> list[str]:
        if self.fence_refused:
            raise FencingFailed(f"cannot fence {vm}")
        self.fenced.append(vm)
        return []

    def health(self, address: str, timeout: float) -> Health:
        raise AgentUnreachable(address, address, "not probed in this test")

    def promote(self, address: str, request: Any, grant: str) -> None:
        self.clock.forward(self.promote_seconds)

    def demote(self, address: str, request: Any, grant: str) -> None:
        pass


def epoch_one() -> FleetMap:
    """Writer w, readers r1 and r2 both caught up (either may be promoted)."""
    m = initial_map("f", "w", {"w": ("w:1", "writer"), "r1": ("r1:1", "reader"),
                               "r2": ("r2:1", "reader")})
    return m.set_progress("r1", 0, True).set_progress("r2", 0, True)


def fleet_service(clock: FakeClock, board: MemoryLeaseBoard, holder: str,
                  agents: FakeFleet) -> FleetService:
    bootstrap = epoch_one()
    ports = CoordinatorPorts(store=MemoryStateStore(board, "f", holder, 10.0), fencer=agents,
                             agents=agents, clock=clock, wall=lambda: 0.0)
    return FleetService(ports, ServiceSettings(url=f"http://{holder}", liveness=LivenessConfig()),
                        secret=b"k", bootstrap=bootstrap)


def scrape(api: CoordinatorAPI) -> Families:
    status, body = api.handle("GET", "/metrics", {}, {}, b"")
    assert status == 200 and isinstance(body, str)
    return parse(body)


def test_coordinator_exposition_through_a_writer_death_and_failover() -> None:
    clock = FakeClock()
    board = MemoryLeaseBoard(clock)
    agents = FakeFleet(clock, promote_seconds=0.4)
    active = fleet_service(clock, board, "c1", agents)
    standby = fleet_service(clock, board, "c2", agents)
    api, standby_api = CoordinatorAPI({"f": active}, {}, lambda: 0.0), CoordinatorAPI(
        {"f": standby}, {}, lambda: 0.0)
    assert active.store.acquire() and not standby.store.acquire()
    active._become_active(clock.monotonic())

    before = scrape(api)
    assert value(before, "rbdfleet_coordinator_active", fleet="f") == 1
    assert value(before, "rbdfleet_coordinator_writer_present", fleet="f") == 1
    assert value(before, "rbdfleet_coordinator_epoch", fleet="f") == 1
    assert value(before, "rbdfleet_coordinator_failovers_total", fleet="f") == 0
    assert value(before, "rbdfleet_coordinator_failover_duration_seconds_count", fleet="f") == 0
    assert value(before, "rbdfleet_coordinator_fence_pending", fleet="f") == 0
    assert value(before, "rbdfleet_coordinator_node_role", fleet="f", node="w",
                 role="writer") == 1

    active.submit(SelfTestFailed("w", clock.monotonic(), "device-read"))  # w says it is broken
    active._drain(clock.monotonic())
    clock.forward(0.1)
    active._confirm_deaths(clock.monotonic())  # NodeFailed -> persist, fence, promote, publish

    after = scrape(api)
    assert agents.fenced == ["w"]
    assert value(after, "rbdfleet_coordinator_epoch", fleet="f") == 2
    assert value(after, "rbdfleet_coordinator_writer_present", fleet="f") == 1
    assert value(after, "rbdfleet_coordinator_failovers_total", fleet="f") == 1
    assert value(after, "rbdfleet_coordinator_failover_duration_seconds_count", fleet="f") == 1
    assert value(after, "rbdfleet_coordinator_failover_duration_seconds_sum",
                 fleet="f") == pytest.approx(0.4)  # the fake promotion's time
    assert value(after, "rbdfleet_coordinator_failover_duration_seconds_bucket", fleet="f",
                 le="0.5") == 1
    assert value(after, "rbdfleet_coordinator_node_role", fleet="f", node="w", role="out") == 1
    assert value(after, "rbdfleet_coordinator_map_revision", fleet="f") > value(
        before, "rbdfleet_coordinator_map_revision", fleet="f")
    assert value(scrape(api), "rbdfleet_coordinator_failover_duration_seconds_count",
                 fleet="f") == 1  # a scrape counts each failover once

    idle = scrape(standby_api)  # a standby: no map, but its counters and histogram exist
    assert value(idle, "rbdfleet_coordinator_active", fleet="f") == 0
    assert samples(idle, "rbdfleet_coordinator_writer_present") == []
    assert value(idle, "rbdfleet_coordinator_failovers_total", fleet="f") == 0
    assert value(idle, "rbdfleet_coordinator_failover_duration_seconds_count", fleet="f") == 0


def test_pending_fence_and_last_error_show_while_the_fence_fails() -> None:
    clock = FakeClock()
    agents = FakeFleet(clock, promote_seconds=0.1)
    service = fleet_service(clock, MemoryLeaseBoard(clock), "c1", agents)
    api = CoordinatorAPI({"f": service}, {}, lambda: 0.0)
    agents.fence_refused = True
    assert service.store.acquire()
    service._become_active(clock.monotonic())
    service.submit(SelfTestFailed("w", clock.monotonic(), "device-read"))
    service._drain(clock.monotonic())
    service._confirm_deaths(clock.monotonic())
    families = scrape(api)
    assert value(families, "rbdfleet_coordinator_fence_pending", fleet="f") == 1
    assert value(families, "rbdfleet_coordinator_last_error_present", fleet="f") == 1
    # The published map still names w, but w is being fenced: no writer clients can use.
    assert value(families, "rbdfleet_coordinator_writer_present", fleet="f") == 0
    assert value(families, "rbdfleet_coordinator_batches_failed_total", fleet="f") >= 1
    assert value(families, "rbdfleet_coordinator_failovers_total", fleet="f") == 0




def test_a_coordinator_that_took_over_mid_failover_has_no_writer_until_it_publishes() -> None:
    clock = FakeClock()
    board = MemoryLeaseBoard(clock)
    predecessor = MemoryStateStore(board, "f", "c0", 10.0)
    assert predecessor.acquire()
    predecessor.save(epoch_one().begin_failover("r1"), None)  # then c0 died
    predecessor.release()
    agents = FakeFleet(clock, promote_seconds=0.1)
    agents.fence_refused = True
    service = fleet_service(clock, board, "c1", agents)
    api = CoordinatorAPI({"f": service}, {}, lambda: 0.0)
    assert service.store.acquire()
    service._become_active(clock.monotonic())  # resumes from the fence, which fails
    families = scrape(api)
    assert value(families, "rbdfleet_coordinator_active", fleet="f") == 1
    assert value(families, "rbdfleet_coordinator_writer_present", fleet="f") == 0
    assert value(families, "rbdfleet_coordinator_fence_pending", fleet="f") == 1
    assert samples(families, "rbdfleet_coordinator_epoch") == []  # nothing published yet

    agents.fence_refused = False
    clock.forward(1.0)  # past retry_delay: the next tick runs fence, promote, publish
    service._feed(el.Tick(clock.monotonic()))
    families = scrape(api)
    assert value(families, "rbdfleet_coordinator_writer_present", fleet="f") == 1
    assert value(families, "rbdfleet_coordinator_epoch", fleet="f") == 2
    # timed from this process' first step that succeeded: the fence after the retry
    assert value(families, "rbdfleet_coordinator_failover_duration_seconds_sum",
                 fleet="f") == pytest.approx(0.1)
