"""The trust model on real agent processes and a real coordinator (docs/security.md).

Each agent holds only its own key; a grant is MACed with the key of the node that checks it
and names one audience and one purpose. So what a compromised reader VM holds (its key)
writes, demotes and pushes nothing anywhere; a captured grant works only for what it was made
for; a pushed record pointing outside the data area is refused whoever signed the push; and
the coordinator serves each client what its scope allows, until it is revoked.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agents.backends.file import FileDevice
from agents.core import journal
from agents.core.grants import COORDINATOR, REPORT, Grant, agent_key, body_digest, sign
from agents.core.protocol import (
    PUSH_CONTENT_TYPE,
    Heartbeat,
    PushFrame,
    RecordPush,
    SelfTestReport,
)
from agents.core.record import Record
from agents.errors import BadSignature, ForeignGrant
from agents.peers import post_message
from agents.volume import Volume
from orchestrator import config as fleet_config
from orchestrator.adapters.rados_clients import RadosClientStore
from orchestrator.coordinator.api import CLIENT_CACHE_SECONDS
from orchestrator.core.clients import ADMIN_SCOPE, READ_SCOPE, WRITE_SCOPE, ClientCredential
from orchestrator.sandbox.lifecycle import CLIENT_SECRET, issue_admin_client, render_config
from orchestrator.services import client_credential
from tests.coordinator_harness import (
    Coordinator,
    PidFencer,
    bootstrap_map,
    file_image,
    fleet_client,
    rados_store,
    start_api,
    start_service,
    wait_in_sync,
)
from tests.fixtures.agents import (
    TEST_CLIENT,
    TEST_CLIENT_SECRET,
    TEST_SECRET,
    AgentFleet,
    FleetFactory,
    node_peer,
)

pytestmark = pytest.mark.integration


def _with_key_of(fleet: AgentFleet, holder: str, audience: str, purpose: str, epoch: int,
                 subject: str = "") -> str:
    """A grant for ``audience`` made with ``holder``'s key: what ``holder`` can forge."""
    grant = Grant(fleet.name, audience, purpose, epoch, time.time() + 60, subject=subject)
    return sign(grant, agent_key(TEST_SECRET, fleet.name, holder))


def _state(fleet: AgentFleet) -> list[tuple[str, int, int]]:
    return [(fleet.health(n)["role"], fleet.health(n)["epoch"], fleet.health(n)["applied_seq"])
            for n in ("w", "r1", "r2")]


def test_a_readers_key_cannot_write_demote_or_push(file_fleet: AgentFleet) -> None:
    """r1's own key (all a compromised reader VM holds) forges write, read, demote and
    promote grants for w and push grants for r2: every one is refused (401), nothing
    changes; the same requests with the coordinator's grants work."""
    fleet, c = file_fleet, file_fleet.client
    w, r2 = fleet["w"].address, fleet["r2"].address
    assert c.put(w, "/before", b"x", fleet.grant("w", "write", 1)).status == 201
    before = _state(fleet)
    forged_write = _with_key_of(fleet, "r1", "w", "write", 1)
    assert c.put(w, "/forged", b"y", forged_write).status == 401
    assert c.call(w, "POST", "/v1/mkdir", forged_write, {"path": "/forged"}).status == 401
    assert c.get(w, "/before", _with_key_of(fleet, "r1", "w", "read", 1)).status == 401
    demote = {"fleet": fleet.name, "node": "w", "epoch": 2, "writer": "r1"}
    assert c.call(w, "POST", "/v1/demote", _with_key_of(fleet, "r1", "w", "demote", 2),
                  demote).status == 401
    promote = {"fleet": fleet.name, "node": "r2", "epoch": 2}
    assert c.call(r2, "POST", "/v1/promote", _with_key_of(fleet, "r1", "r2", "promote", 2),
                  promote).status == 401
    push = RecordPush(fleet=fleet.name, epoch=1, writer="r1", commit_seq=99)
    forged_push = _with_key_of(fleet, "r1", "r2", "push", 1, subject="r1")
    assert _push(c, r2, forged_push, push).status == 401
    # r1's key makes grants r1 accepts, nothing more: a write grant for r1 writes nowhere
    assert c.put(fleet["r1"].address, "/own", b"z",
                 _with_key_of(fleet, "r1", "r1", "write", 1)).status == 409  # not the writer
    assert _state(fleet) == before
    assert c.get(w, "/forged", fleet.grant("w", "read", 1)).status == 404


def test_a_grant_works_only_for_its_audience_and_purpose(file_fleet: AgentFleet) -> None:
    """Re-purposed and re-targeted grants are refused with 403 ``foreign_grant``: a write
    grant as a demote, a read grant as a put, a push grant as a read, r1's read grant on r2;
    an expired one with 401."""
    fleet, c = file_fleet, file_fleet.client
    w, r1, r2 = fleet["w"].address, fleet["r1"].address, fleet["r2"].address
    wg = fleet.grant("w", "write", 1)
    assert c.put(w, "/f", b"data", wg).status == 201
    cases = [
        c.call(w, "POST", "/v1/demote", wg, {"fleet": fleet.name, "node": "w", "epoch": 2}),
        c.put(w, "/g", b"data", fleet.grant("w", "read", 1)),
        c.get(r1, "/f", fleet.grant("r1", "push", 1, subject="w")),
        c.get(r2, "/f", fleet.grant("r1", "read", 1)),
        c.call(w, "POST", "/v1/readers", fleet.grant("w", "promote", 1),
               {"fleet": fleet.name, "epoch": 1, "readers": []}),
    ]
    assert [(r.status, r.json()["error"]) for r in cases] == [(403, "foreign_grant")] * 5
    expired = c.put(w, "/g", b"data", fleet.grant("w", "write", 1, ttl=-1))
    assert (expired.status, expired.json()["error"]) == (401, "grant_expired")
    # a push grant names its writer: r2 presenting w's push grant for r1 is refused
    push = RecordPush(fleet=fleet.name, epoch=1, writer="r2", commit_seq=0)
    named = _push(c, r1, fleet.grant("r1", "push", 1, subject="w"), push)
    assert (named.status, named.json()["error"]) == (403, "foreign_grant")
    assert fleet.health("w")["role"] == "writer"
    assert c.get(r1, "/g", fleet.grant("r1", "read", 1)).status == 404


def _push(client: Any, address: str, grant: str, push: RecordPush) -> Any:
    """POST ``push`` as a writer sends it (binary)."""
    return client.request(address, "POST", "/v1/records", body=push.encode(),
                          headers={"Content-Type": PUSH_CONTENT_TYPE,
                                   "Authorization": "Bearer " + grant})


def _record(volume_tag: int, seq: int, offset: int) -> Record:
    """A well-formed put record of 4 KiB at ``offset`` (its sums are not checked on apply)."""
    payload = {"path": f"/planted-{offset}", "size": 4096, "mtime": 1.0, "crc": 0,
               "extents": [[offset, 4096]], "sums": [0], "chunk": 4096}
    return Record(seq, 1, "put", payload, commit_seq=seq, volume_tag=volume_tag)


def test_a_pushed_record_outside_the_data_area_is_refused(file_fleet: AgentFleet) -> None:
    """A push with a valid push grant whose record points at the superblocks or past the end
    of the image is refused (400) and nothing is applied; the same record inside the data
    area is applied (so the extents are what refused the others)."""
    fleet, c = file_fleet, file_fleet.client
    image = fleet.backend.removeprefix("file:")
    device = FileDevice(image, read_only=True)
    try:
        volume = Volume.open(device)
    finally:
        device.close()
    sb = volume.superblock
    at = journal.align_up(volume.journal_head)  # where a new group commit would start
    r1 = fleet["r1"].address
    seq = fleet.health("r1")["applied_seq"] + 1
    grant = fleet.grant("r1", "push", 1, subject="w")

    def push(offset: int) -> Any:
        record = _record(sb.volume_tag, seq, offset)
        body = RecordPush(fleet=fleet.name, epoch=1, writer="w", commit_seq=seq,
                          frames=(PushFrame(at, record.encode(sb.record_key)),))
        return _push(c, r1, grant, body)

    for offset in (0, sb.data_offset - 4096, sb.data_offset + sb.data_bytes):
        refused = push(offset)
        assert (refused.status, refused.json()["error"]) == (400, "decode_error"), offset
        assert fleet.health("r1")["applied_seq"] == seq - 1
    applied = push(sb.data_offset)
    assert applied.status == 200, applied.body
    assert fleet.health("r1")["applied_seq"] == seq


# -- with a coordinator -----------------------------------------------------------------------


@pytest.fixture
def coordinated(fleet_factory: FleetFactory, tmp_path: Path, rados_admin: Any,
                ceph_cluster: Any) -> Iterator[tuple[AgentFleet, Coordinator, RadosClientStore]]:
    """w, r1, r2 on a file image; one coordinator whose client credentials are in RADOS:
    the harness's admin, ``writer`` (write scope) and ``reader`` (read scope). The writer
    starts with no push grant: only the coordinator's (answers to its heartbeats) let it
    push."""
    coordinator = start_api()
    fleet = fleet_factory(f"file:{file_image(tmp_path / 'image.raw')}",
                          name=f"trust-{uuid.uuid4().hex[:8]}", coordinator=coordinator.url,
                          push_grants={})
    store = rados_store(rados_admin, ceph_cluster.pool, fleet.name)
    clients = RadosClientStore(rados_admin, ceph_cluster.pool, fleet.name)
    for name, scope in ((TEST_CLIENT, ADMIN_SCOPE), ("writer", WRITE_SCOPE),
                        ("reader", READ_SCOPE)):
        secret = TEST_CLIENT_SECRET if name == TEST_CLIENT else f"{name}-secret-0123456".encode()
        clients.put(ClientCredential(name, scope, secret))
    try:
        wait_in_sync(start_service(coordinator, store, PidFencer(fleet), bootstrap_map(fleet),
                                   clients=clients), 20)
        yield fleet, coordinator, clients
    finally:
        coordinator.stop()
        store.close()
        clients.close()


def test_scopes_and_revocation(
    coordinated: tuple[AgentFleet, Coordinator, RadosClientStore],
) -> None:
    """read: read targets only; write: also puts, never fence or failover (403); a revoked
    client is refused (401) once the coordinator's cache of it runs out; admin fences. The
    put is acked by both readers: the writer pushes with the coordinator's push grants."""
    fleet, coordinator, clients = coordinated
    assert fleet["w"].config["push_grants"] == {}
    urls = [coordinator.url]
    reader = fleet_client(urls, fleet.name, client="reader", secret=b"reader-secret-0123456")
    writer = fleet_client(urls, fleet.name, client="writer", secret=b"writer-secret-0123456")
    assert sorted(writer.put_bytes(b"hello", "/hello").body["acked"]) == ["r1", "r2"]
    assert reader.get_bytes("/hello") == b"hello"
    with pytest.raises(ForeignGrant):
        reader.coordinator.targets("write", "/x")
    with pytest.raises(ForeignGrant):
        writer.coordinator.fence("r2")
    with pytest.raises(ForeignGrant):
        writer.coordinator.failover("r1")
    service = coordinator.service
    assert service is not None and service.require_active().writer == "w"
    assert clients.remove("writer")
    time.sleep(CLIENT_CACHE_SECONDS + 0.5)
    with pytest.raises(BadSignature):
        writer.coordinator.targets("write", "/x")
    stranger = fleet_client(urls, fleet.name, client="reader", secret=b"not-its-secret-012345")
    with pytest.raises(BadSignature):
        stranger.coordinator.targets("read", "/hello")
    # a reader VM's key is no client credential: not as itself, not as the admin
    r1_key = agent_key(TEST_SECRET, fleet.name, "r1")
    for name in ("r1", TEST_CLIENT):
        with pytest.raises(BadSignature):
            fleet_client(urls, fleet.name, client=name, secret=r1_key).coordinator.fence("w")
    admin = fleet_client(urls, fleet.name)
    assert admin.coordinator.fence("r2")["epoch"] == 1  # a reader leaves without a new epoch


def test_a_sniffed_report_grant_is_useless_elsewhere(
    coordinated: tuple[AgentFleet, Coordinator, RadosClientStore],
) -> None:
    """The grant on a writer's heartbeat (as a sniffer captures it: report purpose, audience
    coordinator, bound to that heartbeat's body) is refused as a PUT on the writer and as a
    failed self-test of the writer; a reader's key cannot report on the writer either. The
    writer stays the writer and nobody is fenced."""
    fleet, coordinator, _ = coordinated
    heartbeat = Heartbeat(node="w", fleet=fleet.name, role="writer", epoch=1, applied_seq=0,
                          safe_seq=0, selftest="ok", address=fleet["w"].address,
                          sent_at=time.time())
    sniffed = sign(Grant(fleet.name, COORDINATOR, REPORT, 1, time.time() + 60, subject="w",
                         digest=body_digest(heartbeat.encode())),
                   agent_key(TEST_SECRET, fleet.name, "w"))
    put = fleet.client.put(fleet["w"].address, "/sniffed", b"x", sniffed)
    assert (put.status, put.json()["error"]) == (403, "foreign_grant")
    failed = SelfTestReport(node="w", fleet=fleet.name, role="writer", epoch=1, ok=False,
                            checks=(), at=time.time())
    with pytest.raises(ForeignGrant):
        post_message(node_peer(coordinator.url, "w"), "/v1/selftest", failed,
                     grant=sniffed, timeout=10)
    with pytest.raises(BadSignature):  # r1 making w's report grant with its own key
        post_message(node_peer(coordinator.url, "r1"), "/v1/selftest", failed,
                     grant=fleet.report_grant("w", failed, key_of="r1"), timeout=10)
    time.sleep(1.0)
    service = coordinator.service
    assert service is not None and service.require_active().writer == "w"
    assert fleet["w"].alive


def test_sandbox_up_makes_the_admin_client_its_config_names(
        ceph_cluster: Any, rados_admin: Any, tmp_path: Path) -> None:
    """What ``rbdfleet sandbox up`` does after writing the config: an admin credential in
    RADOS next to the fleet's state, its secret (0600) where the config's client_secret_file
    points, so the CLI's coordinator commands authenticate."""
    master = tmp_path / "fleet.secret"
    master.touch(mode=0o600)
    master.write_text("m" * 64 + "\n")
    config = tmp_path / "rbdfleet.toml"
    config.write_text(render_config(tmp_path, ceph_cluster, None, None, master))
    issue_admin_client(config, tmp_path / CLIENT_SECRET)
    cfg = fleet_config.load(config)
    name, secret = client_credential(cfg)
    clients = RadosClientStore(rados_admin, ceph_cluster.pool, cfg.fleet.name)
    try:
        stored = clients.get(name)
        assert stored is not None and (stored.scope, stored.secret) == (ADMIN_SCOPE, secret)
        assert (tmp_path / CLIENT_SECRET).stat().st_mode & 0o777 == 0o600
        assert cfg.fleet.client_secret_file == tmp_path / CLIENT_SECRET
    finally:
        clients.remove(name)
        clients.close()


def test_during_a_rotation_an_agent_accepts_both_masters(fleet_factory: FleetFactory,
                                                         tmp_path: Path) -> None:
    """An agent whose key file holds the key under the new master, then the one under the
    old (step 2 of the rotation in docs/security.md) accepts grants made under either, and
    none made under a third."""
    fleet = fleet_factory(f"file:{file_image(tmp_path / 'image.raw')}", start=False)
    new = b"the-new-master-key-0123456789"
    fleet.key_file("w").write_text(agent_key(new, fleet.name, "w").hex() + "\n"
                                   + agent_key(TEST_SECRET, fleet.name, "w").hex() + "\n")
    fleet.add("w", role="writer")
    c, w = fleet.client, fleet["w"].address
    for i, master in enumerate((TEST_SECRET, new)):
        assert c.put(w, f"/f{i}", b"x", fleet.grant("w", "write", 1, secret=master)).status == 201
    third = c.put(w, "/f2", b"x", fleet.grant("w", "write", 1, secret=b"a-third-master-key"))
    assert (third.status, third.json()["error"]) == (401, "bad_signature")
