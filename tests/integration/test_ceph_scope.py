"""Least privilege in Ceph, on the sandbox cluster (no VM): what a fleet VM's cephx user reaches.

The users are made by ``CephxCredentialStore.ensure_user`` exactly as ``provision`` makes them,
then used as QEMU and the agents use them: librbd (read-write open, the managed exclusive lock,
a lock taken over from a fenced owner) and ``qemu-io`` (QEMU 7.2's own rbd block driver, the
code a VM's disk runs through). Two fleets, ``a-b``/``c`` and ``a``/``b-c``, whose user names
used to be one.
"""

from __future__ import annotations

import base64
import contextlib
import json
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from orchestrator.adapters import ceph
from orchestrator.adapters.rados_clients import RadosClientStore, clients_object
from orchestrator.adapters.rados_state import RadosStateStore, object_name
from orchestrator.config import from_mapping
from orchestrator.core.clients import ClientCredential
from orchestrator.core.fleetmap import FleetMap, Member
from orchestrator.core.placement import fleet_user_prefix, secret_usage, vm_user
from orchestrator.errors import StorageError
from orchestrator.ports import SecretKey
from orchestrator.provision import IMAGE_FEATURES, Provisioner
from orchestrator.sandbox.ceph import CephCluster
from orchestrator.testing.fakes import MemoryHypervisor
from tests.fixtures.ceph import remove_image

pytestmark = pytest.mark.integration

SIZE = 16 << 20
URI = "qemu:///system"


@dataclass(frozen=True)
class Fleet:
    """A fleet's image and its VM's user (``vm_user(name, vm)``) with the user's key."""

    name: str
    vm: str
    image: str
    key: SecretKey

    @property
    def user(self) -> str:
        return vm_user(self.name, self.vm)


@dataclass(frozen=True)
class World:
    cluster: CephCluster
    admin: Any
    credentials: ceph.CephxCredentialStore
    dir: Path
    one: Fleet  # fleet a-b, vm c
    other: Fleet  # fleet a, vm b-c

    @property
    def pool(self) -> str:
        return self.cluster.pool

    def keyring(self, fleet: Fleet) -> Path:
        """The user's own keyring file (0600), as a hypervisor's libvirt secret holds it."""
        path = self.dir / f"{fleet.user}.keyring"
        if not path.exists():
            path.touch(0o600)
            path.write_text(f"[client.{fleet.user}]\n\tkey = "
                            f"{base64.b64encode(fleet.key.reveal()).decode()}\n")
        return path

    @contextlib.contextmanager
    def connected(self, fleet: Fleet) -> Iterator[Any]:
        """A librados client as the fleet's VM user, with no other key in reach."""
        import rados

        client = rados.Rados(conffile=str(self.cluster.conf), rados_id=fleet.user,
                             conf={"keyring": str(self.keyring(fleet)), "rbd_cache": "false"})
        client.connect(timeout=30)
        try:
            yield client
        finally:
            client.shutdown()

    def qemu_io(self, fleet: Fleet, image: str, *commands: str) -> subprocess.CompletedProcess[str]:
        """``qemu-io`` on ``pool/image`` as the fleet's VM user, read-write as QEMU opens it."""
        conf = self.dir / f"{fleet.user}.conf"
        conf.write_text(f"[global]\nmon_host = {self.cluster.mon_host}\n"
                        f"[client]\nkeyring = {self.keyring(fleet)}\n")
        opts = f"driver=rbd,pool={self.pool},image={image},user={fleet.user},conf={conf}"
        argv = ["qemu-io", "--image-opts", opts]
        for command in commands:
            argv += ["-c", command]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def world(ceph_cluster: CephCluster, rados_admin: Any,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    images = ceph.RbdImageStore(rados_admin)
    credentials = ceph.CephxCredentialStore(rados_admin)
    tag = secrets.token_hex(3)
    fleets: list[Fleet] = []
    try:
        for name, vm in (("a-b", "c"), ("a", "b-c")):
            image = f"scope-{tag}-{name}"
            images.create_image(ceph_cluster.pool, image, SIZE, IMAGE_FEATURES)
            key = credentials.ensure_user(vm_user(name, vm), ceph_cluster.pool, image)
            fleets.append(Fleet(name, vm, image, key))
        yield World(ceph_cluster, rados_admin, credentials, tmp_path_factory.mktemp("scope"),
                    *fleets)
    finally:
        for fleet in fleets:
            credentials.remove_user(fleet.user)
            remove_image(rados_admin, ceph_cluster.pool, fleet.image)


def test_two_fleets_whose_names_used_to_meet_get_distinct_users(world: World) -> None:
    one, other = world.one, world.other
    assert f"rbdfleet-{one.name}-{one.vm}" == f"rbdfleet-{other.name}-{other.vm}"  # the old bug
    assert one.user != other.user and one.key != other.key
    for fleet in (one, other):
        assert world.credentials.list_users(fleet.user) == [f"client.{fleet.user}"]
        assert world.credentials.caps(fleet.user) == ceph.vm_user_caps(
            world.pool, fleet.image, image_id(world, fleet.image))


def image_id(world: World, image: str) -> str:
    import rbd

    with world.admin.open_ioctx(world.pool) as ioctx, \
            rbd.Image(ioctx, image, read_only=True) as handle:
        return str(handle.id())


def test_ensuring_one_fleets_user_leaves_the_others_caps_alone(world: World) -> None:
    one, other = world.one, world.other
    before = world.credentials.caps(other.user)
    assert world.credentials.ensure_user(one.user, world.pool, one.image) == one.key
    assert world.credentials.caps(other.user) == before
    # the other fleet's user asked for this fleet's image: refused, nothing changes
    with pytest.raises(StorageError, match="which exists"):
        world.credentials.ensure_user(other.user, world.pool, one.image)
    assert world.credentials.caps(other.user) == before


def test_vm_user_opens_its_image_read_write_and_takes_the_lock(world: World) -> None:
    import rbd

    payload = secrets.token_bytes(4096)
    with world.connected(world.one) as client, client.open_ioctx(world.pool) as ioctx, \
            rbd.Image(ioctx, world.one.image) as image:
        image.lock_acquire(rbd.RBD_LOCK_MODE_EXCLUSIVE)
        assert image.is_exclusive_lock_owner()
        image.write(payload, 1 << 20)
        assert image.read(1 << 20, 4096) == payload
        image.lock_release()
    with world.admin.open_ioctx(world.pool) as ioctx, \
            rbd.Image(ioctx, world.one.image, read_only=True) as image:
        assert image.read(1 << 20, 4096) == payload


def test_a_new_writer_takes_the_lock_from_a_fenced_owner(world: World) -> None:
    """The failover path with the narrow caps: the old writer is blocklisted (the coordinator's
    fence), the new writer's librbd breaks its lock (cls lock on the header)."""
    import rbd

    fence = ceph.mon_command
    with world.connected(world.one) as old, old.open_ioctx(world.pool) as old_ioctx, \
            rbd.Image(old_ioctx, world.one.image) as old_image:
        old_image.lock_acquire(rbd.RBD_LOCK_MODE_EXCLUSIVE)
        watchers = [w["addr"] for w in old_image.watchers_list()]
        assert len(watchers) == 1, watchers
        fence(world.admin, {"prefix": "osd blocklist", "blocklistop": "add",
                            "addr": watchers[0], "expire": 600.0}, "fence")
        world.admin.wait_for_latest_osdmap()
        try:
            with world.connected(world.one) as new, new.open_ioctx(world.pool) as ioctx, \
                    rbd.Image(ioctx, world.one.image) as image:
                image.lock_acquire(rbd.RBD_LOCK_MODE_EXCLUSIVE)
                image.write(b"n" * 4096, 2 << 20)
                assert image.is_exclusive_lock_owner()
                image.lock_release()
        finally:
            fence(world.admin, {"prefix": "osd blocklist", "blocklistop": "rm",
                                "addr": watchers[0]}, "unfence")


def test_vm_user_cannot_open_or_list_another_fleets_image(world: World) -> None:
    import rbd

    with world.connected(world.one) as client, client.open_ioctx(world.pool) as ioctx:
        for read_only in (True, False):
            with pytest.raises(rbd.PermissionError):
                rbd.Image(ioctx, world.other.image, read_only=read_only)
        with pytest.raises(rbd.PermissionError):
            rbd.RBD().list(ioctx)


def test_vm_user_cannot_reach_the_coordinators_state_or_client_secrets(world: World) -> None:
    import rados

    fleet = world.one.name
    store = RadosStateStore(world.admin, world.pool, fleet, f"scope-{secrets.token_hex(4)}", 30)
    clients = RadosClientStore(world.admin, world.pool, fleet)
    try:
        assert store.acquire()
        saved = FleetMap(fleet, 1, 1, "c", (Member("c", "127.0.0.1:1", "writer"),))
        store.save(saved, None)
        clients.put(ClientCredential("ops", "admin", secrets.token_bytes(32)))
        with world.connected(world.one) as client:
            with client.open_ioctx(world.pool) as ioctx:
                for oid in (object_name(fleet), clients_object(fleet)):
                    with pytest.raises(rados.PermissionError):
                        ioctx.read(oid)
                    with pytest.raises(rados.PermissionError):
                        ioctx.write_full(oid, b"{}")
                    with pytest.raises(rados.PermissionError):
                        ioctx.remove_object(oid)
            as_vm = RadosStateStore(client, world.pool, fleet, "vm", 30)
            vm_clients = RadosClientStore(client, world.pool, fleet)
            try:
                with pytest.raises(StorageError, match="permission denied"):
                    as_vm.load()
                with pytest.raises(StorageError, match="permission denied"):
                    as_vm.acquire()
                with pytest.raises(StorageError, match="permission denied"):
                    vm_clients.get("ops")
            finally:
                as_vm.close()
                vm_clients.close()
        assert store.load() == saved
        assert clients.get("ops") is not None
    finally:
        store.release()
        with world.admin.open_ioctx(world.pool) as ioctx:
            for oid in (object_name(fleet), clients_object(fleet)):
                with contextlib.suppress(rados.ObjectNotFound):
                    ioctx.remove_object(oid)
        store.close()
        clients.close()


def test_qemu_opens_its_image_read_write_and_not_another(world: World) -> None:
    """QEMU 7.2's rbd driver (qemu-io, no VM): a write takes the exclusive lock, reads it back,
    discards; the other fleet's image does not open."""
    done = world.qemu_io(world.one, world.one.image, "write -P 0x5a 3M 64k",
                         "read -P 0x5a 3M 64k", "discard 4M 64k")
    assert done.returncode == 0, done.stderr
    assert "wrote 65536/65536" in done.stdout and "read 65536/65536" in done.stdout
    refused = world.qemu_io(world.one, world.other.image, "read 0 4k")
    assert refused.returncode != 0
    assert "Operation not permitted" in refused.stdout + refused.stderr


def test_caps_of_a_removed_image_are_moved_and_foreign_caps_are_left_alone(
        world: World) -> None:
    images = ceph.RbdImageStore(world.admin)
    user = vm_user(f"scope-{secrets.token_hex(3)}", "vm1")
    first, second = (f"scope-{secrets.token_hex(4)}" for _ in range(2))
    try:
        images.create_image(world.pool, first, SIZE, IMAGE_FEATURES)
        key = world.credentials.ensure_user(user, world.pool, first)
        images.remove_image(world.pool, first)  # deleted by hand, created again under a name
        images.create_image(world.pool, second, SIZE, IMAGE_FEATURES)
        assert world.credentials.ensure_user(user, world.pool, second) == key
        assert world.credentials.caps(user) == ceph.vm_user_caps(
            world.pool, second, image_id(world, second))
        # a user made by hand (pool-wide caps) under an rbdfleet name is not rewritten
        ceph.mon_command(world.admin, {"prefix": "auth caps", "entity": f"client.{user}",
                                       "caps": ["mon", "profile rbd",
                                                "osd", f"profile rbd pool={world.pool}"]},
                         "hand-made caps")
        with pytest.raises(StorageError, match="did not make"):
            world.credentials.ensure_user(user, world.pool, second)
        assert json.dumps(world.credentials.caps(user)).count("profile rbd") == 2
    finally:
        world.credentials.remove_user(user)
        for image in (first, second):
            remove_image(world.admin, world.pool, image)


def test_provision_grants_each_vm_its_image_and_retires_a_legacy_user(world: World) -> None:
    """The Provisioner on the real cluster (libvirt faked: no VM): each VM's user gets the
    image's caps and its key (in the libvirt secret) opens the image; a VM still attached under
    its legacy ``rbdfleet-<fleet>-<vm>`` user is moved to its own and the legacy user deleted."""
    import rbd

    name = f"scope{secrets.token_hex(3)}"
    cfg = from_mapping({
        "ceph": {"conf": str(world.cluster.conf), "keyring": str(world.cluster.keyring),
                 "pool": world.pool, "mon_host": world.cluster.mon_v2},
        "ssh": {"key": "/k", "known_hosts": "/kh"},
        "fleet": {"name": name, "image": f"{name}-img", "size": "16MiB", "writer": "vm1",
                  "secret_file": "/s"},
        "vm": [{"name": f"vm{i}", "domain": f"d{i}", "address": f"10.0.0.{i}"} for i in (1, 2)],
    })
    hv = MemoryHypervisor()
    for i in (1, 2):
        hv.define(URI, f"d{i}", active=True)
    provisioner = Provisioner(cfg, ceph.RbdImageStore(world.admin), world.credentials, hv)
    legacy = f"rbdfleet-{name}-vm2"
    try:
        provisioner.provision()
        grant = ceph.vm_user_caps(world.pool, cfg.fleet.image, image_id(world, cfg.fleet.image))
        for vm in ("vm1", "vm2"):
            user = vm_user(name, vm)
            assert world.credentials.caps(user) == grant
            _, key = hv.secrets[(URI, secret_usage(user))]
            with world.connected(Fleet(name, vm, cfg.fleet.image, key)) as client, \
                    client.open_ioctx(world.pool) as ioctx, \
                    rbd.Image(ioctx, cfg.fleet.image) as image:
                image.write(vm.encode() * 2048, 0)
        # vm2 as an older release left it: attached under the legacy user, with its secret
        ceph.mon_command(world.admin, {"prefix": "auth get-or-create",
                                       "entity": f"client.{legacy}",
                                       "caps": ["mon", "profile rbd",
                                                "osd", f"profile rbd pool={world.pool}"]},
                         "legacy user")
        hv.disks[(URI, "d2")] = [replace(d, user=legacy) for d in hv.disks[(URI, "d2")]]
        hv.ensure_secret(URI, secret_usage(legacy), SecretKey(b"legacy"))
        plan, _ = provisioner.provision()
        assert [type(a).__name__ for a in plan.actions] == ["Detach", "Attach", "RemoveSecret",
                                                           "RemoveUser"]
        assert world.credentials.list_users(legacy) == []
        assert hv.secret_uuid(URI, secret_usage(legacy)) is None
        assert [d.user for d in hv.disks[(URI, "d2")]] == [vm_user(name, "vm2")]
        assert provisioner.provision()[0].empty
    finally:
        world.credentials.remove_user(legacy)
        provisioner.deprovision(delete_image=True)
    assert world.credentials.list_users(fleet_user_prefix(name)) == []
