"""Certificate revocation and rotation on real agent processes and a coordinator, without a
restart (docs/security.md, "TLS").

The fleet's certificates come from a PKI directory of this test (the test CA's certificate and
key, its own CRL), so revoking a node here touches no other test. Reader ``r1``'s certificate
opens the writer's node-only ``/v1/records`` and the coordinator's report route; once
``r1`` is revoked (its serial in ``crl.pem`` beside the CA file every process reads) both
refuse it at the handshake within seconds, while ``r2`` is served as before; a new certificate
for ``r1`` (a rotation, written over the files its agent runs with) is taken by that same
agent process and the coordinator takes its reports again.
"""

from __future__ import annotations

import datetime
import http.client
import shutil
import signal
import ssl
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agents.core.grants import PUSH
from orchestrator.coordinator.api import CoordinatorAPI
from orchestrator.pki import FleetPki, inspect, reloading_server_context
from orchestrator.testing.fakes import FakeClock, MemoryLeaseBoard, MemoryStateStore
from tests.coordinator_harness import (
    Coordinator,
    PidFencer,
    bootstrap_map,
    file_image,
    start_service,
    wait_in_sync,
    wait_until,
)
from tests.fixtures.agents import AgentFleet, FleetFactory, coordinator_tls, shared_pki
from tests.integration.test_coordinator_takeover import _heartbeat

pytestmark = pytest.mark.integration

RELOAD_BOUND = 10.0  # seconds: files are looked at every 2 s (agents.tlsreload)


@dataclass
class Revocable:
    fleet: AgentFleet
    coordinator: Coordinator
    pki: FleetPki

    kept: dict[str, tuple[Path, Path]]  # node -> a copy of its first certificate and key

    def ask(self, url_host: str, port: int, path: str, body: bytes, grant: str,
            node: str) -> int | str:
        """POST presenting ``node``'s first certificate (kept aside: a revocation removes
        the PKI's copy): the answer's status, or ``refused`` when TLS did not let the request
        through."""
        context = ssl.create_default_context(cafile=self.pki.ca_file)
        context.load_cert_chain(*self.kept[node])
        conn = http.client.HTTPSConnection(url_host, port, timeout=10, context=context)
        try:
            conn.request("POST", path, body=body, headers={
                "Authorization": f"Bearer {grant}", "Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            return response.status
        except (ssl.SSLError, OSError, http.client.HTTPException):
            return "refused"
        finally:
            conn.close()

    def push_to_writer(self, node: str) -> int | str:
        """A push to the writer's node-only /v1/records, sent with ``node``'s certificate
        (an empty body: the grant and the body are judged only once TLS let it in)."""
        host, _, port = self.fleet["w"].address.rpartition(":")
        return self.ask(host, int(port), "/v1/records", b"",
                        self.fleet.grant("w", PUSH, 1, subject=node), node)

    def report(self, node: str) -> int | str:
        """A fresh heartbeat of ``node`` to the coordinator's report route."""
        message = _heartbeat(self.fleet, node)
        host, _, port = self.coordinator.url.removeprefix("https://").rpartition(":")
        return self.ask(host, int(port), "/v1/heartbeat", message.encode(),
                        self.fleet.report_grant(node, message), node)


@pytest.fixture
def revocable(fleet_factory: FleetFactory, tmp_path: Path) -> Iterator[Revocable]:
    now = datetime.datetime.now(datetime.UTC)
    pki = FleetPki(tmp_path / "tls", "rbdfleet-test")
    pki.dir.mkdir()
    shutil.copyfile(shared_pki().ca_file, pki.ca_file)  # the test CA: harness clients trust
    shutil.copyfile(shared_pki().key_file("ca"), pki.key_file("ca"))  # these certificates
    pki.ensure_ca(now)  # this directory's own (empty) CRL
    for node in ("w", "r1", "r2"):
        pki.ensure(node, ["127.0.0.1"], now)

    def start(node: str, **settings: Any) -> None:
        fleet.add(node, tls_cert=str(pki.cert_file(node)), tls_key=str(pki.key_file(node)),
                  tls_ca=str(pki.ca_file), **settings)  # the CRL: crl.pem beside the CA

    api = CoordinatorAPI({}, {}, time.time)
    cert, key, _ = coordinator_tls()
    host, port = api.serve("127.0.0.1", 0, reloading_server_context(cert, key, pki.ca_file))
    coordinator = Coordinator(api, f"https://{host}:{port}")
    fleet = fleet_factory(f"file:{file_image(tmp_path / 'image.raw')}",
                          name=f"rv-{uuid.uuid4().hex[:8]}", coordinator=coordinator.url,
                          start=False)
    try:
        for node in ("r1", "r2"):
            start(node)
        start("w", role="writer", readers={n: fleet[n].address for n in ("r1", "r2")})
        service = start_service(coordinator, MemoryStateStore(
            MemoryLeaseBoard(FakeClock()), fleet.name, "c1", 60.0), PidFencer(fleet),
            bootstrap_map(fleet))
        wait_in_sync(service, 20)
        kept = {}
        for node in ("r1", "r2"):
            kept[node] = (tmp_path / f"{node}-first.pem", tmp_path / f"{node}-first.key")
            shutil.copyfile(pki.cert_file(node), kept[node][0])
            shutil.copyfile(pki.key_file(node), kept[node][1])
        yield Revocable(fleet, coordinator, pki, kept)
    finally:
        coordinator.stop()


def test_a_revoked_readers_certificate_is_refused_by_the_writer_and_the_coordinator(
        revocable: Revocable) -> None:
    rv = revocable
    r1 = rv.fleet["r1"].proc
    assert r1 is not None
    # before: r1's certificate opens both node-only routes (the writer then judges the grant
    # and finds it is no reader to push to: an answer of the route, not of TLS)
    before = rv.push_to_writer("r1")
    assert isinstance(before, int) and before != 403, before
    assert rv.report("r1") == 200

    rv.pki.revoke("r1", datetime.datetime.now(datetime.UTC))
    wait_until(lambda: rv.push_to_writer("r1") == "refused", RELOAD_BOUND,
               "the writer refusing r1's revoked certificate")
    wait_until(lambda: rv.report("r1") == "refused", RELOAD_BOUND,
               "the coordinator refusing r1's revoked certificate")
    # everyone else is served as before
    assert rv.report("r2") == 200
    assert isinstance(rv.push_to_writer("r2"), int)

    # a rotation: r1 gets a new certificate in the files its agent runs with; the same
    # process serves with it (the writer's pushes reach r1 again: it is back in sync), and
    # the new certificate opens the report route
    rv.pki.reissue("r1", ["127.0.0.1"], datetime.datetime.now(datetime.UTC))
    rv.kept["r1"] = (rv.pki.cert_file("r1"), rv.pki.key_file("r1"))
    wait_until(lambda: rv.report("r1") == 200, RELOAD_BOUND, "r1's new certificate taken")
    service = rv.coordinator.service
    assert service is not None
    wait_in_sync(service, 30)
    assert rv.fleet["r1"].proc is r1 and rv.fleet["r1"].alive  # the same process throughout


def test_sighup_makes_an_agent_serve_its_new_certificate_at_once(
        fleet_factory: FleetFactory, tmp_path: Path) -> None:
    """With no connection coming in (which would look at the files within 2 s), SIGHUP alone
    rebuilds the agent's server context from its changed files."""
    now = datetime.datetime.now(datetime.UTC)
    pki = FleetPki(tmp_path / "tls", "rbdfleet-test")
    pki.dir.mkdir()
    shutil.copyfile(shared_pki().ca_file, pki.ca_file)
    shutil.copyfile(shared_pki().key_file("ca"), pki.key_file("ca"))
    pki.ensure_ca(now)
    pki.ensure("r1", ["127.0.0.1"], now)
    fleet = fleet_factory(f"file:{file_image(tmp_path / 'image.raw')}",
                          name=f"hup-{uuid.uuid4().hex[:8]}", start=False)
    agent = fleet.add("r1", tls_cert=str(pki.cert_file("r1")), tls_key=str(pki.key_file("r1")),
                      tls_ca=str(pki.ca_file))
    host, _, port = agent.address.rpartition(":")

    def served_serial() -> int:
        der = ssl.get_server_certificate((host, int(port)), ca_certs=str(pki.ca_file))
        return inspect(der.encode()).serial

    first = served_serial()
    renewed = pki.reissue("r1", ["127.0.0.1"], now)
    agent.kill(signal.SIGHUP)
    wait_until(lambda: "event=tls_reloaded" in agent.log.read_text(), 5, "the SIGHUP reload")
    assert served_serial() == renewed.serial != first and agent.alive
