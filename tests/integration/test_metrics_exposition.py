"""Every /metrics exposition, read back by the reference parser, and the monitoring files
(alert rules, Grafana dashboard) checked against the series those expositions really have.

The expositions come from real processes and servers: three agent processes on a file image,
an active coordinator (API server + fleet service, state in memory, fence = SIGKILL) that
fails the writer over after it is killed, and a standby coordinator of the same fleet.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.testing.fakes import FakeClock, MemoryLeaseBoard, MemoryStateStore
from tests.coordinator_harness import (
    Coordinator,
    PidFencer,
    bootstrap_map,
    file_image,
    fleet_client,
    start_api,
    start_service,
    wait_in_sync,
    wait_until,
)
from tests.fixtures.agents import AgentClient, AgentFleet, FleetFactory

pytestmark = pytest.mark.integration

MONITORING = Path(__file__).resolve().parents[2] / "docs" / "monitoring"
# Labels Prometheus adds to every target; the documented scrape configuration (docs/metrics.md)
# also gives each agent target its fleet and node.
TARGET_LABELS = frozenset({"job", "instance"})
AGENT_TARGET_LABELS = TARGET_LABELS | {"fleet", "node"}
SELECTOR = re.compile(r"\b(rbdfleet_[a-zA-Z0-9_]+)\s*(\{[^}]*\})?")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")


@dataclass
class Exposed:
    """Sample names of every exposition, with the label values seen on each."""

    labels: dict[str, dict[str, set[str]]] = field(default_factory=dict)

    def add(self, text: str) -> None:
        """Parse one exposition: every family typed, with help, in one block."""
        names: set[str] = set()
        for family in text_string_to_metric_families(text):
            assert family.name not in names, f"{family.name} split into several blocks"
            assert family.type in ("counter", "gauge", "histogram"), (family.name, family.type)
            assert family.documentation, f"{family.name} has no help"
            names.add(family.name)
            for sample in family.samples:
                seen = self.labels.setdefault(sample.name, {})
                for key, value in sample.labels.items():
                    seen.setdefault(key, set()).add(value)

    def check(self, expr: str) -> set[str]:
        """Assert ``expr`` only selects exposed series, by labels they have; the names."""
        used = SELECTOR.findall(expr)
        assert used, f"no rbdfleet series in {expr!r}"
        known: set[str] = set()
        for name, matchers in used:
            assert name in self.labels, f"{expr!r}: no series {name} is exposed"
            have = self.labels[name]
            target = AGENT_TARGET_LABELS if name.startswith("rbdfleet_agent_") else TARGET_LABELS
            known |= set(have) | target
            for label, op, value in MATCHER.findall(matchers or ""):
                assert label in have or label in target, f"{expr!r}: {name} has no {label}"
                if op == "=" and label in have and "$" not in value:
                    assert value in have[label], f"{expr!r}: {name} never has {label}={value}"
        for group in GROUPING.findall(expr):
            for label in filter(None, (g.strip() for g in group.split(","))):
                assert label in known, f"{expr!r}: groups by {label}, which no series has"
        return {name for name, _ in used}


@pytest.fixture
def coordinated(
    fleet_factory: FleetFactory, tmp_path: Path
) -> Iterator[tuple[AgentFleet, Coordinator, Coordinator]]:
    """Agents w, r1, r2; an active coordinator and a standby sharing one in-memory lease
    board (its clock never moves: the lease holds for the whole test)."""
    active, standby = start_api(), start_api()
    fleet = fleet_factory(f"file:{file_image(tmp_path / 'image.raw')}",
                          name=f"mx-{uuid.uuid4().hex[:8]}", coordinator=active.url)
    board = MemoryLeaseBoard(FakeClock())
    try:
        service = start_service(active, MemoryStateStore(board, fleet.name, "c1", 60.0),
                                PidFencer(fleet), bootstrap_map(fleet))
        wait_in_sync(service, 20)
        start_service(standby, MemoryStateStore(board, fleet.name, "c2", 60.0),
                      PidFencer(fleet), None)
        yield fleet, active, standby
    finally:
        standby.stop(release=False)
        active.stop()


def scrape(url_or_address: str) -> str:
    resp = AgentClient(timeout=10).request(url_or_address.removeprefix("http://"), "GET",
                                           "/metrics")
    assert resp.status == 200, resp.body
    assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    return resp.body.decode()


def value(text: str, name: str, **labels: str) -> float:
    found = [s.value for f in text_string_to_metric_families(text) for s in f.samples
             if s.name == name and labels.items() <= s.labels.items()]
    assert len(found) == 1, f"{name}{labels}: {found}"
    return float(found[0])


def test_every_exposition_parses_and_the_monitoring_files_use_only_real_series(
    coordinated: tuple[AgentFleet, Coordinator, Coordinator],
) -> None:
    fleet, active, standby = coordinated
    service = active.service
    assert service is not None
    fresh = scrape(fleet["r2"].address)  # before any put: counters are there, at 0
    assert value(fresh, "rbdfleet_agent_checksum_errors_total") == 0
    assert value(fresh, "rbdfleet_agent_lagging_reports_total") == 0
    assert value(fresh, "rbdfleet_agent_bytes_read_total") == 0
    assert value(scrape(fleet["w"].address), "rbdfleet_agent_pushes_total", result="failed") == 0

    client = fleet_client([active.url], fleet.name)
    client.put_bytes(b"metrics", "/m")
    assert client.get_bytes("/m") == b"metrics"
    fleet["w"].kill()
    wait_until(lambda: service.require_active().writer in ("r1", "r2")
               and service.require_active().phase == "stable", 30, "a new writer published")
    new_writer = service.require_active().writer
    assert new_writer is not None
    wait_until(lambda: value(scrape(active.url), "rbdfleet_coordinator_writer_present",
                             fleet=fleet.name) == 1, 10, "writer_present back to 1")

    exposed = Exposed()
    coordinator_text, standby_text = scrape(active.url), scrape(standby.url)
    for text in (coordinator_text, standby_text,
                 *(scrape(fleet[n].address) for n in ("r1", "r2"))):
        exposed.add(text)

    f = {"fleet": fleet.name}
    assert value(coordinator_text, "rbdfleet_coordinator_active", **f) == 1
    assert value(coordinator_text, "rbdfleet_coordinator_epoch", **f) == 2
    assert value(coordinator_text, "rbdfleet_coordinator_failovers_total", **f) == 1
    assert value(coordinator_text, "rbdfleet_coordinator_failover_duration_seconds_count",
                 **f) == 1
    assert 0 < value(coordinator_text, "rbdfleet_coordinator_failover_duration_seconds_sum",
                     **f) < 30
    assert value(coordinator_text, "rbdfleet_coordinator_fence_pending", **f) == 0
    assert value(coordinator_text, "rbdfleet_coordinator_node_role", node="w", role="out",
                 **f) == 1
    assert value(standby_text, "rbdfleet_coordinator_active", **f) == 0
    assert value(standby_text, "rbdfleet_coordinator_failovers_total", **f) == 0
    assert value(scrape(fleet[new_writer].address), "rbdfleet_agent_is_writer") == 1

    rules = yaml.safe_load((MONITORING / "rbdfleet-alerts.yml").read_text())
    alerts = {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]}
    assert {"RbdfleetNoWriter", "RbdfleetFencePending", "RbdfleetNoActiveCoordinator",
            "RbdfleetNodeDead", "RbdfleetFailoverSlow", "RbdfleetChecksumErrors",
            "RbdfleetReaderLagging"} <= set(alerts)
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert rule["annotations"]["summary"], name
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", "0s"))), name
        exposed.check(rule["expr"])
    assert "3" in alerts["RbdfleetFailoverSlow"]["expr"].split(">")[-1]

    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    shown: set[str] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            shown |= exposed.check(target["expr"])
    assert {
        "rbdfleet_coordinator_epoch", "rbdfleet_coordinator_writer_present",
        "rbdfleet_coordinator_failovers_total",
        "rbdfleet_coordinator_failover_duration_seconds_bucket",
        "rbdfleet_coordinator_node_liveness", "rbdfleet_agent_requests_total",
        "rbdfleet_agent_request_seconds_bucket", "rbdfleet_agent_bytes_written_total",
        "rbdfleet_agent_bytes_read_total", "rbdfleet_agent_checksum_errors_total",
    } <= shown
    fleet_variable = next(v for v in dashboard["templating"]["list"] if v["name"] == "fleet")
    exposed.check(fleet_variable["definition"])
