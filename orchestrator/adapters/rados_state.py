"""RadosStateStore: the coordinator's StateStore in one RADOS object per fleet, behind a lease.

Layout: object ``rbdfleet.coordinator.<fleet>`` in the fleet's pool; omap keys ``map`` (the
encoded :class:`FleetMap`), ``revision``, ``epoch``, ``url`` (the active coordinator) and
``fenced_readers`` (a JSON list: the readers fenced because their hypervisor stopped
answering, still to be re-attached). The
lease is the cls ``lock`` exclusive lock ``rbdfleet-coordinator`` on that same object, so the
OSD can check it inside every write.

Who can touch it: the coordinator's and the operator's cephx users (``[ceph] user``, caps on
the pool). A VM's own user cannot: its caps name only its fleet's image objects
(``orchestrator.adapters.ceph.vm_user_caps``), and neither this object nor the pool's image
directory is among them (tests/integration/test_ceph_scope.py reads, writes and removes it as
a VM user, and is refused).

What Ceph does and does not guarantee, and what we do about it:

* ``Ioctx.lock_exclusive(duration=...)`` stores a random expiry in the Pacific binding
  (``tv_usec`` left uninitialised). The lock is taken by calling the cls
  method ``lock.lock`` with an encoded request instead: the stored expiry is then exact.
* The lease is measured by the OSD's clock, not ours. A holder that was paused past its lease
  may still *believe* it holds it; it cannot act on that belief, because every write is one
  atomic op ``assert_locked(us)`` + ``omap_cmp(revision == expected)`` + ``set_omap``: after
  the lease passed to someone else the OSD refuses it (EBUSY -> LeaseLost), and after a
  concurrent change it refuses it too (ECANCELED -> StaleMap). Nothing is written then.
* Renewal uses ``MUST_RENEW``: a holder that lost the lease gets ENOENT/EBUSY and steps down
  instead of silently re-taking it; only a fresh ``acquire`` after stepping down may take it.
* The first write of a fleet has no revision to compare: the lease alone guards it (only the
  holder can write, and it read the object empty under that lease).
"""

from __future__ import annotations

import contextlib
import errno
import json
import struct
import threading
from typing import Any

from orchestrator.adapters.ceph import rados_module, translate_ceph_errors
from orchestrator.core.fleetmap import FleetMap
from orchestrator.errors import LeaseLost, StaleMap, StorageError

LOCK_NAME = "rbdfleet-coordinator"
LOCK_EXCLUSIVE = 1
LOCK_FLAG_MAY_RENEW = 1
LOCK_FLAG_MUST_RENEW = 2
KEYS = ("map", "revision", "epoch", "url", "fenced_readers")


def object_name(fleet: str) -> str:
    """The RADOS object that holds ``fleet``'s coordinator state."""
    return f"rbdfleet.coordinator.{fleet}"


def _string(value: str) -> bytes:
    raw = value.encode()
    return struct.pack("<I", len(raw)) + raw


def _envelope(payload: bytes) -> bytes:
    # Ceph's ENCODE_START(1, 1): struct_v, compat_v, payload length.
    return struct.pack("<BBI", 1, 1, len(payload)) + payload


def encode_lock(cookie: str, duration: float, flags: int, description: str = "") -> bytes:
    """cls_lock_lock_op: name, type, cookie, tag, description, duration (sec, nsec), flags."""
    sec = int(duration)
    nsec = round((duration - sec) * 1e9)
    payload = (
        _string(LOCK_NAME)
        + struct.pack("<B", LOCK_EXCLUSIVE)
        + _string(cookie)
        + _string("")
        + _string(description)
        + struct.pack("<IIB", sec, nsec, flags)
    )
    return _envelope(payload)


def encode_assert_locked(cookie: str) -> bytes:
    """cls_lock_assert_op: name, type, cookie, tag."""
    return _envelope(
        _string(LOCK_NAME) + struct.pack("<B", LOCK_EXCLUSIVE) + _string(cookie) + _string("")
    )


class RadosStateStore:
    """StateStore over an open ``rados.Rados`` handle (the caller owns and shuts it down).

    ``holder`` is the lock cookie: unique per coordinator process (host, pid, random part).
    """

    def __init__(
        self, client: Any, pool: str, fleet: str, holder: str, lease_seconds: float = 2.0
    ) -> None:
        if lease_seconds <= 0:
            raise ValueError("lease_seconds must be > 0")
        self._rados = rados_module()
        self.fleet = fleet
        self.holder = holder
        self.lease_seconds = lease_seconds
        self._oid = object_name(fleet)
        self._held = False
        self._lease_lock = threading.Lock()  # renewals may come from a lease thread too
        with translate_ceph_errors(f"open pool {pool}"):
            self._ioctx = client.open_ioctx(pool)

    def close(self) -> None:
        """Close the pool handle (the lease, if held, simply runs out)."""
        self._ioctx.close()

    def acquire(self) -> bool:
        """Take (or renew) the lease for exactly ``lease_seconds``.

        A holder renews with MUST_RENEW: if the lease was lost meanwhile this raises LeaseLost
        (the caller steps down and must reload). A non-holder gets False while someone holds it.
        """
        with self._lease_lock:
            return self._acquire()

    def _acquire(self) -> bool:
        rados = self._rados
        flags = LOCK_FLAG_MUST_RENEW if self._held else LOCK_FLAG_MAY_RENEW
        data = encode_lock(self.holder, self.lease_seconds, flags, "rbdfleet coordinator")
        try:
            with translate_ceph_errors(f"lease on {self._oid}"):
                try:
                    self._ioctx.execute(self._oid, "lock", "lock", data)
                except (rados.ObjectBusy, rados.ObjectNotFound) as exc:
                    if self._held:
                        self._held = False
                        raise LeaseLost(f"fleet {self.fleet}: lease lost") from exc
                    return False
        except StorageError:
            self._held = False
            raise
        self._held = True
        return True

    def release(self) -> None:
        """Unlock if held (absent or broken lock is fine)."""
        rados = self._rados
        with self._lease_lock:
            was_held, self._held = self._held, False
            if not was_held:
                return
            what = f"release lease on {self._oid}"
            with translate_ceph_errors(what), contextlib.suppress(rados.ObjectNotFound):
                self._ioctx.unlock(self._oid, LOCK_NAME, self.holder)

    def load(self) -> FleetMap | None:
        """The stored map, or None."""
        values = self._read()
        raw = values.get("map")
        return None if raw is None else FleetMap.decode(raw)

    def coordinator_url(self) -> str | None:
        """The URL the active coordinator advertised."""
        raw = self._read().get("url")
        return None if raw is None else raw.decode()

    def fenced_readers(self) -> frozenset[str]:
        """The readers recorded as fenced for a hypervisor that stopped answering."""
        raw = self._read().get("fenced_readers")
        if raw is None:
            return frozenset()
        try:
            names = json.loads(raw)
        except ValueError:
            names = None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise StorageError(f"{self._oid}: fenced_readers is not a list of names: {raw!r}")
        return frozenset(names)

    def record_fenced_readers(self, names: frozenset[str]) -> None:
        """Guarded write of the fenced readers (the lease is asserted, as for the map)."""
        self._guarded_write(("fenced_readers",), (json.dumps(sorted(names)).encode(),), None)

    def _read(self) -> dict[str, bytes]:
        rados = self._rados
        with translate_ceph_errors(f"read {self._oid}"):
            try:
                with rados.ReadOpCtx() as op:
                    it, _ = self._ioctx.get_omap_vals_by_keys(op, KEYS)
                    self._ioctx.operate_read_op(op, self._oid)
                    return {k: bytes(v) for k, v in it}
            except rados.ObjectNotFound:
                return {}

    def save(self, new: FleetMap, expected_revision: int | None) -> None:
        """One atomic op: assert the lease + compare the revision + write map, revision, epoch."""
        if new.fleet != self.fleet:
            raise ValueError(f"map of fleet {new.fleet!r} saved to store of {self.fleet!r}")
        if expected_revision is None:
            current = self.load()
            if current is not None:
                raise StaleMap(
                    f"fleet {self.fleet} exists already", expected=None, found=current.revision
                )
        keys = ("map", "revision", "epoch")
        values = (new.encode(), str(new.revision).encode(), str(new.epoch).encode())
        self._guarded_write(keys, values, expected_revision)

    def advertise(self, url: str) -> None:
        """Guarded write of the active coordinator's URL."""
        self._guarded_write(("url",), (url.encode(),), None)

    def _guarded_write(
        self, keys: tuple[str, ...], values: tuple[bytes, ...], expected_revision: int | None
    ) -> None:
        rados = self._rados
        what = f"guarded write to {self._oid}"
        try:
            with translate_ceph_errors(what), rados.WriteOpCtx() as op:
                op.execute("lock", "assert_locked", encode_assert_locked(self.holder))
                if expected_revision is not None:
                    op.omap_cmp("revision", str(expected_revision), rados.LIBRADOS_CMPXATTR_OP_EQ)
                self._ioctx.set_omap(op, keys, values)
                self._ioctx.operate_write_op(op, self._oid)
        except StorageError as exc:
            cause = exc.__cause__
            code = getattr(cause, "errno", None)
            if isinstance(cause, rados.ObjectBusy | rados.ObjectNotFound) or code in (
                errno.EBUSY,
                errno.ENOENT,
            ):
                self._held = False
                raise LeaseLost(f"fleet {self.fleet}: write refused, lease not held") from cause
            if code == errno.ECANCELED:
                current = self.load()
                raise StaleMap(
                    f"fleet {self.fleet}: stored revision changed (expected {expected_revision})",
                    expected=expected_revision,
                    found=None if current is None else current.revision,
                ) from cause
            raise


__all__ = ["RadosStateStore", "encode_assert_locked", "encode_lock", "object_name"]
