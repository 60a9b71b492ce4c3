"""Deleted space goes back to Ceph: on a real RBD image served by a writer and two readers
(real agent processes, librbd), N x 1 MiB files are put and then deleted; once the freed
extents leave quarantine the writer discards them, and the image's allocated bytes (from
``Image.diff_iterate``, what ``rbd du`` counts) fall back to an empty formatted image's plus
at most the one object the data area shares with the metadata (the puts' and deletes'
journal records land in the ring, which the empty image's objects already hold here)."""

from __future__ import annotations

import os
import re
from typing import Any

import pytest

from agents.backends.librbd import RbdDevice
from agents.committer import DISCARD_UNIT
from agents.volume import Volume
from tests.fixtures.agents import AgentFleet

pytestmark = pytest.mark.integration

MiB = 1 << 20
FILES = 24


def allocated(cluster: Any, image: str, rados_admin: Any) -> list[tuple[int, int]]:
    """The (offset, length) extents of ``image`` that RADOS holds."""
    import rbd

    extents: list[tuple[int, int]] = []

    def note(offset: int, length: int, exists: bool) -> None:
        if exists:
            extents.append((offset, length))

    with rados_admin.open_ioctx(cluster.pool) as ioctx, \
            rbd.Image(ioctx, image, read_only=True) as img:
        img.diff_iterate(0, img.size(), None, note)
    return extents


def total(extents: list[tuple[int, int]], start: int = 0) -> int:
    """Bytes of ``extents`` from ``start`` on."""
    return sum(max(0, o + n - max(o, start)) for o, n in extents)


def discarded(fleet: AgentFleet) -> float:
    """The writer's rbdfleet_agent_discarded_bytes_total."""
    body = fleet.client.request(fleet["w"].address, "GET", "/metrics").body.decode()
    found = re.search(r"^rbdfleet_agent_discarded_bytes_total (\S+)$", body, re.M)
    assert found is not None, "the writer exposes no discard counter"
    return float(found.group(1))


def test_deleted_files_give_their_space_back_to_ceph(
    rbd_fleet: AgentFleet, rbd_image: tuple[Any, str], rados_admin: Any
) -> None:
    cluster, image = rbd_image
    fleet, c = rbd_fleet, rbd_fleet.client
    dev = RbdDevice(str(cluster.conf), cluster.pool, image, "admin",
                    keyring=str(cluster.keyring), read_only=True)
    try:
        sb = Volume.open(dev).superblock
    finally:
        dev.close()
    empty = allocated(cluster, image, rados_admin)
    assert total(empty, sb.data_offset) == 0  # formatting and the epoch record: metadata only

    wg = fleet.grant("w", "writer", fleet.epoch("w"))
    readers = fleet.reader_addresses("r1", "r2")
    for i in range(FILES):
        resp = c.put(fleet["w"].address, f"/d/f{i:03d}", os.urandom(MiB), wg, readers=readers)
        assert resp.status == 201 and resp.json()["lagging"] == [], resp.body
    assert total(allocated(cluster, image, rados_admin), sb.data_offset) >= FILES * MiB
    assert discarded(fleet) == 0

    for i in range(FILES):
        resp = c.request(fleet["w"].address, "DELETE", f"/v1/files/d/f{i:03d}",
                         headers={"Authorization": "Bearer " + wg})
        assert resp.status == 200, resp.body
    # each write releases what every in-sync reader has passed: by the last delete's answer
    # both readers had acked every delete, so everything was released (and discarded) then
    assert discarded(fleet) >= FILES * MiB

    after = allocated(cluster, image, rados_admin)
    # Every freed object was deleted whole but the one the data area shares with checkpoint
    # slot B (the data area starts inside it): its data part was only zeroed.
    shared = sb.data_offset // DISCARD_UNIT
    left = [(o, n) for o, n in after if o + n > sb.data_offset]
    assert all(o // DISCARD_UNIT == shared and (o + n - 1) // DISCARD_UNIT == shared
               for o, n in left), left
    assert total(after) <= total(empty) + DISCARD_UNIT, (empty, after)
