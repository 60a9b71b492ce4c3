"""TLS on by default, mutual TLS between nodes (docs/security.md, "TLS").

Real agent processes and a real coordinator over loopback: an agent without TLS material
refuses to start, plaintext meets no answer from a TLS agent, a wrong CA fails with a clear
error (library and CLI), node-only routes need a fleet certificate while data routes need
only a grant, a certificate of another CA is refused at the handshake, and the insecure flag
works and says so (log line, header on every answer). The coordinator's report routes take a
report only over its node's certificate, and an agent with TLS on refuses a plaintext
coordinator URL."""

from __future__ import annotations

import datetime
import json
import logging
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agents.core.grants import PROMOTE
from agents.core.protocol import SelfTestCheck, SelfTestReport
from agents.daemon import load_config
from agents.errors import PeerCertificateRequired
from agents.peers import Peer, post_message
from agents.tlsreload import current
from orchestrator import config as fleet_config
from orchestrator.adapters.agent_control import HttpAgentControl
from orchestrator.cli.clients import write_secret_file
from orchestrator.coordinator.config import CoordinatorConfig
from orchestrator.errors import (
    AgentUnreachable,
    ConfigError,
    PeerCertificateMismatch,
    Superseded,
)
from orchestrator.pki import FleetPki
from orchestrator.services import server_tls
from orchestrator.testing.fakes import FakeClock, MemoryLeaseBoard, MemoryStateStore
from orchestrator.transport import Cancel, Transport
from tests.coordinator_harness import (
    Coordinator,
    PidFencer,
    bootstrap_map,
    coordinated_file_fleet,
    file_image,
    start_api,
    start_service,
    wait_in_sync,
    wait_until,
)
from tests.fixtures.agents import (
    REPO,
    TEST_CA,
    TEST_CLIENT,
    TEST_CLIENT_SECRET,
    AgentClient,
    AgentFleet,
    FleetFactory,
    coordinator_tls,
    node_peer,
    shared_pki,
)

pytestmark = pytest.mark.integration

NOW = datetime.datetime.now(datetime.UTC)


@pytest.fixture
def fleet(fleet_factory: FleetFactory, tmp_path: Path) -> AgentFleet:
    """A writer ``w`` and a reader ``r1`` with the fixtures' default: TLS from the test CA."""
    return fleet_factory(f"file:{file_image(tmp_path / 'image.raw')}", readers=("r1",))


@pytest.fixture
def other_ca(tmp_path: Path) -> FleetPki:
    """Another fleet's CA (same fleet name, other key), with a certificate for 127.0.0.1."""
    pki = FleetPki(tmp_path / "other-tls", "rbdfleet-test")
    pki.ensure_ca(NOW)
    pki.ensure("intruder", ["127.0.0.1"], NOW)
    return pki


def _context(ca: str | Path, identity: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    if identity is not None:
        context.load_cert_chain(*identity)
    return context


def _serve(config: dict[str, Any], directory: Path) -> subprocess.CompletedProcess[str]:
    """Run ``rbdfleet-agent serve`` with ``config`` until it exits (it must, at once)."""
    path = directory / "agent.json"
    path.write_text(json.dumps(config))
    return subprocess.run([sys.executable, "-m", "agents", "serve", "--config", str(path)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


def test_an_agent_without_tls_material_refuses_to_start(fleet: AgentFleet,
                                                        tmp_path: Path) -> None:
    config = {**fleet["r1"].config, "listen": "127.0.0.1:0", "ready_file": None}
    for key in ("tls_cert", "tls_key", "tls_ca"):
        config.pop(key)
    done = _serve(config, tmp_path)
    assert done.returncode == 2, done.stderr
    assert "TLS is on by default" in done.stderr and "insecure_plaintext" in done.stderr
    assert "Traceback" not in done.stderr
    # a CA that is not a certificate is refused at start too, not at the first connection
    (tmp_path / "bad.pem").write_text("not a certificate\n")
    config.update(fleet["r1"].config)
    config.update(listen="127.0.0.1:0", ready_file=None, tls_ca=str(tmp_path / "bad.pem"))
    done = _serve(config, tmp_path)
    assert done.returncode == 2 and "does not load" in done.stderr, done.stderr


def test_plaintext_gets_no_answer_from_a_tls_agent(fleet: AgentFleet) -> None:
    with pytest.raises(OSError):
        AgentClient(timeout=5, plaintext=True).request(fleet["w"].address, "GET", "/v1/health")
    with pytest.raises(AgentUnreachable):
        HttpAgentControl(Transport()).health(fleet["w"].address, 5.0)
    assert HttpAgentControl(Transport(tls=True, ca_file=TEST_CA)).health(
        fleet["w"].address, 5.0).node == "w"


def test_a_client_with_another_ca_fails_with_a_clear_error(fleet: AgentFleet,
                                                          other_ca: FleetPki) -> None:
    control = HttpAgentControl(Transport(tls=True, ca_file=str(other_ca.ca_file)))
    with pytest.raises(AgentUnreachable, match=r"certificate is not trusted.*this fleet's"):
        control.health(fleet["w"].address, 5.0)


def test_node_only_routes_need_a_fleet_certificate_data_routes_a_grant(
        fleet: AgentFleet) -> None:
    """Without a client certificate: put and get work (grants), promote is refused 403 before
    its grant is looked at; with the coordinator's certificate the same promote is judged by
    its grant (here: refused as stale, which proves it got past the certificate check)."""
    anonymous = AgentClient(tls=_context(TEST_CA))
    put = anonymous.put(fleet["w"].address, "/f", b"x" * 100, fleet.grant("w", "writer", 1))
    assert put.status == 201 and put.json()["acked"] == ["r1"], put.body  # pushed over mTLS
    assert anonymous.get(fleet["r1"].address, "/f", fleet.grant("r1", "reader", 1)).body == (
        b"x" * 100)
    promote = {"epoch": 1, "readers": []}
    for route in ("/v1/promote", "/v1/demote", "/v1/readers", "/v1/records"):
        refused = anonymous.call(fleet["r1"].address, "POST", route,
                                 fleet.grant("r1", PROMOTE, 1), promote)
        assert (refused.status, refused.json()["error"]) == (403, "peer_cert_required"), route
    node = AgentClient()  # the fixtures' client: presents the coordinator's certificate
    judged = node.call(fleet["r1"].address, "POST", "/v1/promote",
                       fleet.grant("r1", PROMOTE, 1), promote)
    assert judged.json()["error"] != "peer_cert_required", judged.body


def test_the_coordinators_requests_resume_their_tls_session_and_survive_a_stale_one(
        fleet: AgentFleet, caplog: pytest.LogCaptureFixture) -> None:
    """The coordinator's transport (mutual TLS) offers an agent the session it got last time:
    the next request resumes it. An agent started again has new ticket keys (as has one
    whose TLS context was reloaded, after a rotation or a new CRL): the stale session is
    refused, the handshake is a full one, and the request is answered all the same."""
    cert, key, _ = coordinator_tls()
    control = HttpAgentControl(Transport(tls=True, ca_file=TEST_CA, identity=(cert, key)))
    address = fleet["r1"].address
    caplog.set_level(logging.DEBUG, logger="orchestrator.transport")
    for _ in range(3):
        assert control.health(address, 5.0).node == "r1"
    resumed = [r for r in caplog.records if "event=tls_session_resumed" in r.getMessage()]
    assert len(resumed) == 2, [r.getMessage() for r in caplog.records]
    fleet["r1"].stop()
    fleet["r1"].start()
    caplog.clear()
    assert control.health(address, 5.0).node == "r1"  # the stale session: a full handshake
    assert not [r for r in caplog.records if "event=tls_session_resumed" in r.getMessage()]
    assert control.health(address, 5.0).node == "r1"
    assert any("event=tls_session_resumed" in r.getMessage() for r in caplog.records)


def test_a_certificate_of_another_ca_is_refused_at_the_handshake(
        fleet: AgentFleet, other_ca: FleetPki) -> None:
    intruder = AgentClient(timeout=5, tls=_context(TEST_CA, other_ca.identity("intruder")))
    with pytest.raises(OSError):  # ssl.SSLError: the agent aborts the handshake
        intruder.call(fleet["r1"].address, "POST", "/v1/promote",
                      fleet.grant("r1", PROMOTE, 1), {"epoch": 1, "readers": []})
    # the agent logs the failed handshake once its side of it is over: a moment after the
    # intruder saw the abort
    wait_until(lambda: "event=tls_handshake_failed" in fleet["r1"].log.read_text(), 5,
               "the failed handshake logged")


def test_the_insecure_flag_serves_plaintext_and_says_so(fleet_factory: FleetFactory,
                                                        tmp_path: Path) -> None:
    fleet = fleet_factory(f"file:{file_image(tmp_path / 'image.raw')}", readers=("r1",),
                          insecure_plaintext=True)
    assert "tls_cert" not in fleet["w"].config
    health = fleet.client.request(fleet["w"].address, "GET", "/v1/health")
    assert health.status == 200 and health.headers["x-rbdfleet-insecure"] == "plaintext"
    put = fleet.client.put(fleet["w"].address, "/p", b"p", fleet.grant("w", "writer", 1))
    assert put.status == 201 and put.json()["acked"] == ["r1"], put.body
    log = fleet["w"].log.read_text()
    assert "level=WARNING" in log.split("event=insecure_plaintext")[0].rsplit("\n", 1)[-1]
    assert "tls=plaintext" in log


def test_the_coordinator_needs_its_certificate_or_the_insecure_flag(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    secret = tmp_path / "fleet.secret"
    secret.write_bytes(b"k\n")
    cfg = fleet_config.from_mapping({
        "ceph": {"conf": "/c", "keyring": "/k"},
        "fleet": {"name": "f", "image": "i", "size": "64MiB", "writer": "",
                  "secret_file": str(secret)}})
    assert cfg.pki_dir == tmp_path / "tls"
    with pytest.raises(ConfigError, match="rbdfleet provision"):
        server_tls(cfg, CoordinatorConfig())
    with pytest.raises(ConfigError, match=r"ca\.pem missing"):
        Transport.for_fleet(cfg)
    (tmp_path / "tls").mkdir()
    shutil.copyfile(TEST_CA, tmp_path / "tls" / "ca.pem")  # the fleet CA, no coordinator.pem
    assert Transport.for_fleet(cfg).ca_file == str(tmp_path / "tls" / "ca.pem")
    with pytest.raises(ConfigError, match=r"coordinator\.pem missing"):
        server_tls(cfg, CoordinatorConfig())
    cert, key, _ = coordinator_tls()
    context, transport = server_tls(cfg, CoordinatorConfig(tls_cert=cert, tls_key=key))
    assert context is not None and current(context).verify_mode == ssl.CERT_OPTIONAL
    assert transport.identity == (cert, key)
    with caplog.at_level(logging.WARNING):
        context, transport = server_tls(cfg, CoordinatorConfig(insecure_plaintext=True))
    assert context is None and not transport.tls
    assert "event=insecure_plaintext" in caplog.text


def test_the_cli_with_another_ca_fails_cleanly(fleet_factory: FleetFactory, tmp_path: Path,
                                               rados_admin: Any, ceph_cluster: Any,
                                               other_ca: FleetPki) -> None:
    """``rbdfleet ls`` against a TLS coordinator: works with the fleet CA ([tls] dir), and with
    another fleet's CA exits non-zero naming the certificate failure, without a traceback."""
    with coordinated_file_fleet(fleet_factory, tmp_path, rados_admin, ceph_cluster.pool,
                                "tls") as (fleet, coordinator, _):
        client_secret = tmp_path / "client.secret"
        write_secret_file(client_secret, TEST_CLIENT_SECRET)

        def ls(tls_dir: Path) -> subprocess.CompletedProcess[str]:
            conf = tmp_path / "rbdfleet.toml"
            conf.write_text(
                '[ceph]\nconf = "/nonexistent/ceph.conf"\nkeyring = "/nonexistent/keyring"\n'
                f'[fleet]\nname = "{fleet.name}"\nimage = "img"\nsize = "64MiB"\nwriter = ""\n'
                f'secret_file = "{fleet.master_file()}"\n'
                f'client = "{TEST_CLIENT}"\nclient_secret_file = "{client_secret}"\n'
                f'[tls]\ndir = "{tls_dir}"\n'
                f'[coordinator]\nurls = ["{coordinator.url}"]\n')
            return subprocess.run([sys.executable, "-m", "orchestrator.cli.app", "ls", "/",
                                   "--config", str(conf)], capture_output=True, text=True,
                                  timeout=120, cwd=REPO)

        good = ls(shared_pki().dir)
        assert good.returncode == 0, good.stderr
        bad = ls(other_ca.dir)
        assert bad.returncode != 0
        assert "CERTIFICATE_VERIFY_FAILED" in bad.stderr and "Traceback" not in bad.stderr



@pytest.fixture
def reporting(fleet_factory: FleetFactory,
              tmp_path: Path) -> Iterator[tuple[AgentFleet, Coordinator, PidFencer]]:
    """A writer ``w`` and readers ``r1``, ``r2`` reporting to a TLS coordinator (its state in
    memory; fence = SIGKILL), with both readers in sync: the agents' own reports (the
    writer's heartbeats name its in-sync readers) went through."""
    coordinator = start_api()
    fleet = fleet_factory(f"file:{file_image(tmp_path / 'image.raw')}",
                          name=f"tls-{uuid.uuid4().hex[:8]}", coordinator=coordinator.url)
    fencer = PidFencer(fleet)
    store = MemoryStateStore(MemoryLeaseBoard(FakeClock()), fleet.name, "c1", 60.0)
    try:
        wait_in_sync(start_service(coordinator, store, fencer, bootstrap_map(fleet)), 20)
        yield fleet, coordinator, fencer
    finally:
        coordinator.stop()


def _failed_selftest(fleet: AgentFleet) -> SelfTestReport:
    """What the coordinator acts on at once: the writer's device failed (a failover)."""
    return SelfTestReport(node="w", fleet=fleet.name, role="writer", epoch=1, ok=False,
                          checks=(SelfTestCheck("device-read", False, "EIO"),),
                          at=time.time())


def test_a_report_needs_the_certificate_of_the_node_it_names(
        reporting: tuple[AgentFleet, Coordinator, PidFencer]) -> None:
    """The writer's failed self-test with its valid grant: refused 403 without a client
    certificate (before the body is read) and over reader r1's certificate, changing nothing;
    the same report over w's own certificate is taken (the writer is failed over)."""
    fleet, coordinator, fencer = reporting
    service = coordinator.service
    assert service is not None
    before = service.require_active()
    report = _failed_selftest(fleet)
    with pytest.raises(PeerCertificateRequired) as anonymous:
        post_message(Peer(coordinator.url, ca_file=TEST_CA), "/v1/selftest", report,
                     grant=fleet.report_grant("w", report), timeout=10)
    assert (anonymous.value.status, anonymous.value.code) == (403, "peer_cert_required")
    with pytest.raises(PeerCertificateMismatch) as foreign:
        post_message(node_peer(coordinator.url, "r1"), "/v1/selftest", report,
                     grant=fleet.report_grant("w", report), timeout=10)
    assert (foreign.value.status, foreign.value.code) == (403, "peer_cert_mismatch")
    # refused before its body: a body announced and never sent gets the answer at once
    host, port = coordinator.url.removeprefix("https://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as raw, \
            _context(TEST_CA).wrap_socket(raw, server_hostname=host) as conn:
        conn.sendall((f"POST /v1/selftest HTTP/1.1\r\nHost: {host}\r\n"
                      f"Authorization: Bearer {fleet.report_grant('w', report)}\r\n"
                      "Content-Length: 60000\r\n\r\n").encode())
        # whole, then closed, within 5 s; reading the body would wait 10 s, then cut
        answer = conn.makefile("rb").read()
    assert answer.startswith(b"HTTP/1.1 403 ") and b'"peer_cert_required"' in answer, answer
    time.sleep(1.0)  # an admitted failed self-test starts a failover within milliseconds
    after = service.require_active()
    assert (after.epoch, after.writer, after.revision) == (before.epoch, "w", before.revision)
    assert fencer.fenced == [] and fleet["w"].alive
    # the control: the same report over w's certificate is what the coordinator acts on
    post_message(node_peer(coordinator.url, "w"), "/v1/selftest", report,
                 grant=fleet.report_grant("w", report), timeout=10)
    wait_until(lambda: service.require_active().writer in ("r1", "r2"), 15, "failover")
    assert [n for n, _ in fencer.fenced] == ["w"]


def test_an_agent_with_tls_refuses_a_plaintext_coordinator_url(fleet: AgentFleet,
                                                               tmp_path: Path) -> None:
    config = {**fleet["r1"].config, "listen": "127.0.0.1:0", "ready_file": None,
              "coordinator": "http://127.0.0.1:9"}
    done = _serve(config, tmp_path)
    assert done.returncode == 2, done.stderr
    assert "config coordinator: 'http://127.0.0.1:9' is plaintext http:// but TLS is on" in (
        done.stderr) and "insecure_plaintext" in done.stderr
    assert "Traceback" not in done.stderr
    base = {"node": "r1", "fleet": "f", "backend": "file:/x", "secret_file": "/s"}
    for url in ("https://127.0.0.1:9", "127.0.0.1:9"):  # https, or host:port (TLS)
        assert load_config(None, {**base, "coordinator": url}).coordinator == (url,)
    assert load_config(None, {**base, "coordinator": "http://127.0.0.1:9",
                              "insecure_plaintext": True}).insecure_plaintext


def test_a_request_to_a_silent_tls_server_is_cut_in_its_handshake() -> None:
    """A paused writer accepts TCP (the kernel does) but never answers the TLS handshake: a
    request the map has moved past must be cut there at once (Superseded, then resent
    elsewhere), not after its whole timeout."""
    silent = socket.create_server(("127.0.0.1", 0))  # listens, never accepts nor answers
    try:
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        cancel = Cancel()
        threading.Timer(0.5, cancel.cancel, ("the map moved on",)).start()
        started = time.monotonic()
        with pytest.raises(Superseded, match="the map moved on"):
            Transport(tls=True, ca_file=TEST_CA).request(
                "w", address, "PUT", "/v1/files/x", body=b"x", timeout=30.0, cancel=cancel)
        assert time.monotonic() - started < 5.0
    finally:
        silent.close()
