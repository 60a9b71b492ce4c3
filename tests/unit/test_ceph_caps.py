"""The caps a VM user gets (orchestrator.adapters.ceph), without a cluster: what they name,
that ensure_user reads them back, and the image ids a prefix grant must not mix up. What the
caps allow on a real cluster is tests/integration/test_ceph_scope.py."""

from __future__ import annotations

import pytest

from orchestrator.adapters import ceph
from orchestrator.errors import StorageError

pytestmark = pytest.mark.unit


def test_caps_name_one_image_by_id_and_are_read_back() -> None:
    caps = ceph.vm_user_caps("rbd", "img", "1f2e3d4c5b6a")
    assert caps["mon"] == "profile rbd"
    assert "rbd_header.1f2e3d4c5b6a," in caps["osd"] and "rbd_data.1f2e3d4c5b6a.," in caps["osd"]
    assert "profile" not in caps["osd"] and "namespace" not in caps["osd"]
    assert all(clause.strip().startswith("allow ") and " pool=rbd " in clause
               for clause in caps["osd"].split(","))
    assert ceph.granted_image(caps) == ("rbd", "1f2e3d4c5b6a")
    assert ceph.granted_image({"mon": "profile rbd", "osd": "profile rbd pool=rbd"}) is None
    assert ceph.granted_image({}) is None


class Listed(ceph.CephxCredentialStore):
    """The store with the pool's images given (id → name) instead of listed by librbd."""

    def __init__(self, images: dict[str, str]) -> None:
        super().__init__(handle=None)
        self.images = images

    def _image_ids(self, pool: str) -> dict[str, str]:
        return dict(self.images)


@pytest.mark.parametrize("image", ["short", "long"])
def test_no_grant_when_one_image_id_begins_another(image: str) -> None:
    store = Listed({"abc1": "short", "abc12": "long", "ffff": "other"})
    with pytest.raises(StorageError, match="begin one another"):
        store.ensure_user("rbdfleet.demo.vm1", "rbd", image)


def test_no_grant_for_an_absent_image() -> None:
    with pytest.raises(StorageError, match="image not found"):
        Listed({"abc1": "other"}).ensure_user("rbdfleet.demo.vm1", "rbd", "img")
