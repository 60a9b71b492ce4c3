"""Paginated listings on real agents (writer + 2 readers, file image): pages over HTTP with
the directory changing between them, each page from another node; FleetClient.ls and
ls_pages against them; refused queries."""

from __future__ import annotations

import urllib.parse
from typing import Any

import pytest

from agents.core.protocol import LIST_LIMIT
from orchestrator.client import FleetClient, Targets
from orchestrator.core.fleetmap import Target
from tests.coordinator_harness import transport
from tests.fixtures.agents import AgentFleet

pytestmark = pytest.mark.integration


def _mkdir(fleet: AgentFleet, grant: str, path: str) -> None:
    resp = fleet.client.call(fleet["w"].address, "POST", "/v1/mkdir", grant,
                             {"path": path, "parents": True})
    assert resp.status == 201, resp.body


def _delete(fleet: AgentFleet, grant: str, path: str) -> None:
    resp = fleet.client.request(fleet["w"].address, "DELETE", "/v1/files" + path,
                                headers={"Authorization": "Bearer " + grant})
    assert resp.status == 200, resp.body


def test_pages_over_http_with_changes_between_them(file_fleet: AgentFleet) -> None:
    fleet, c = file_fleet, file_fleet.client
    epoch = fleet.epoch("w")
    wg = fleet.grant("w", "writer", epoch)
    for i in range(0, 30, 2):
        _mkdir(fleet, wg, f"/d/n{i:02d}")
    existed = {f"n{i:02d}" for i in range(0, 30, 2)}
    seen: list[str] = []
    after: str | None = None
    nodes = ["r1", "r2", "w"]
    for page_no in range(20):
        node = nodes[page_no % 3]  # each page from another node: the cursor is a name
        query = {"limit": "4", **({"after": after} if after is not None else {})}
        resp = c.call(fleet[node].address, "GET", "/v1/list/d?" + urllib.parse.urlencode(query),
                      fleet.grant(node, "reader", epoch))
        assert resp.status == 200, resp.body
        page = resp.json()
        names = [e["path"].rsplit("/", 1)[-1] for e in page["entries"]]
        assert len(names) <= 4
        seen += names
        if page["next"] is None:
            break
        assert page["next"] == names[-1]
        after = page["next"]
        # between pages: one entry before the cursor and one after it appear, one after it
        # that existed from the start goes
        _mkdir(fleet, wg, f"/d/m{page_no:02d}")
        _mkdir(fleet, wg, f"/d/n{page_no:02d}x")
        gone = min((n for n in existed if n > after), default=None)
        if gone is not None:
            _delete(fleet, wg, f"/d/{gone}")
            existed.discard(gone)
    else:
        raise AssertionError("the listing never ended")
    assert len(seen) == len(set(seen)), "an entry was listed twice"
    assert seen == sorted(seen)
    assert existed <= set(seen), "an entry that existed throughout was skipped"
    assert not any(n.startswith("m") for n in seen)  # added behind the cursor: not listed


def test_refused_list_queries(file_fleet: AgentFleet) -> None:
    fleet = file_fleet
    rg = fleet.grant("r1", "reader", fleet.epoch("r1"))
    for query, code in [("limit=0", "bad_request"), ("limit=x", "bad_request"),
                        ("offset=2", "bad_request"), ("limit=1&limit=2", "bad_request"),
                        ("after=a%2Fb", "bad_path"), ("after=..", "bad_path")]:
        resp = fleet.client.call(fleet["r1"].address, "GET", "/v1/list?" + query, rg)
        assert (resp.status, resp.json()["error"]) == (400, code), (query, resp.body)


class MapOfThisFleet:
    """The coordinator's part FleetClient reads with: the fleet's readers and their grants."""

    def __init__(self, fleet: AgentFleet) -> None:
        self.fleet = fleet.name
        self.transport = transport()
        epoch = fleet.epoch("w")
        self._targets = Targets(epoch, 1, tuple(
            Target(node, fleet[node].address, "reader", fleet.grant(node, "reader", epoch))
            for node in ("r1", "r2")))

    def targets(self, kind: str, path: str) -> Targets:
        assert kind == "read"
        return self._targets

    def report(self, node: str, reason: str) -> None:
        raise AssertionError(f"a healthy reader was reported: {node}: {reason}")


def test_client_pages(file_fleet: AgentFleet) -> None:
    fleet = file_fleet
    wg = fleet.grant("w", "writer", fleet.epoch("w"))
    names = [f"caf\u00e9 {i:02d}+x" for i in range(7)]  # spaces, '+' and UTF-8 in the cursor
    for name in names:
        _mkdir(fleet, wg, f"/d/{name}")
    client = FleetClient(MapOfThisFleet(fleet))  # type: ignore[arg-type]
    first: dict[str, Any] = client.ls("/d", limit=3)
    assert [e["path"] for e in first["entries"]] == [f"/d/{n}" for n in names[:3]]
    assert first["next"] == names[2]
    rest = client.ls("/d", limit=10, after=first["next"])
    assert [e["path"] for e in rest["entries"]] == [f"/d/{n}" for n in names[3:]]
    assert rest["next"] is None
    pages = list(client.ls_pages("/d", limit=2))
    assert [len(p["entries"]) for p in pages] == [2, 2, 2, 1]
    assert [e["path"] for p in pages for e in p["entries"]] == [f"/d/{n}" for n in names]
    whole = client.ls("/d")  # no limit: the agent's default page, which holds them all
    assert len(whole["entries"]) == 7 and whole["next"] is None and LIST_LIMIT >= 7
