"""Ceph adapter: the ONE orchestrator module that imports ``rados`` and ``rbd``.

* :func:`connect` / :func:`cluster` open a guarded, translated librados handle others reuse.
* :class:`RbdImageStore` (ImageStore), :class:`CephxCredentialStore` (CredentialStore) and
  :class:`BlocklistFencer` (Fencer) implement the ports in ``orchestrator.ports``.
* :func:`translate_ceph_errors` maps binding errors to ``orchestrator.errors`` once.

What Ceph does not guarantee, and what we do about it:

* The exclusive-lock feature is cooperative: it never stops a second live read-write
  client. The fence is the OSD blocklist of exact client addresses, never the lock.
* An ``osd blocklist add`` that returned is not yet enforced by every OSD,
  and ``wait_for_latest_osdmap()`` only brings the *calling* client's map up to date: an OSD
  still on the older map serves the fenced client. The fencer then waits until every up OSD
  reports that epoch (``tell osd.N status``: the ``[ceph] user`` needs ``osd 'allow r'``).
* ``osd blocklist ls`` prints two concatenated JSON arrays in 16.2 (G5): parsed with
  ``raw_decode``.
* A client talks to one monitor: its session is listed by that monitor only, so
  :meth:`CephxCredentialStore.sessions` asks every monitor.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

from agents.errors import BindingUnavailable
from orchestrator.config import CephConfig
from orchestrator.errors import ImageBusy, ImageExists, ImageNotFound, StorageError
from orchestrator.ports import (
    Characteristics,
    ClientSession,
    ImageInfo,
    MonHost,
    SecretKey,
    Watcher,
)

try:  # Debian's python3-rados / python3-rbd; absent on a plain venv
    import rados as _rados
except ImportError:  # pragma: no cover - depends on the host
    _rados = None
try:
    import rbd as _rbd
except ImportError:  # pragma: no cover - depends on the host
    _rbd = None

LOG = logging.getLogger(__name__)

__all__ = [
    "BlocklistFencer",
    "CephxCredentialStore",
    "RbdImageStore",
    "client_addresses",
    "cluster",
    "connect",
    "granted_image",
    "mon_command",
    "parse_sessions",
    "rados_module",
    "rbd_module",
    "translate_ceph_errors",
    "vm_user_caps",
]

# Caps of a VM's own user: the objects of its fleet's ONE image (header, data, id), found by
# the image id, plus the class read of the pool's ``rbd_info`` every librbd open does. That is
# all QEMU 7.2 needs for a read-write open with exclusive-lock (watch and lock on the header),
# measured on a real cluster (tests/integration/test_ceph_scope.py): another image, the
# coordinator's state and client objects, and the image directory stay out of reach. QEMU opens
# every RBD disk read-write in librbd, so readers get the same caps (their read-only guarantee
# is the hypervisor's). The mon profile lets the librbd of a new writer blocklist a dead lock
# owner. RBD namespaces would say the same in one clause, but libvirt 9.0 hands QEMU a
# ``pool/ns/image`` name as image ``ns/image`` with no namespace (docs/provisioning.md).
_HEADER_GRANT = re.compile(r"allow rwx pool=(\S+) object_prefix rbd_header\.([0-9a-f]+),")


def vm_user_caps(pool: str, image: str, image_id: str) -> dict[str, str]:
    """The caps ``ensure_user`` gives a VM's cephx user: image ``image`` (id ``image_id``)."""
    return {"mon": "profile rbd",
            "osd": f"allow rwx pool={pool} object_prefix rbd_header.{image_id}, "
                   f"allow rw pool={pool} object_prefix rbd_data.{image_id}., "
                   f"allow rx pool={pool} object_prefix rbd_id.{image}, "
                   f"allow class-read pool={pool} object_prefix rbd_info"}


def granted_image(caps: dict[str, str]) -> tuple[str, str] | None:
    """``(pool, image id)`` that caps made by :func:`vm_user_caps` grant, else None."""
    match = _HEADER_GRANT.match(caps.get("osd", ""))
    return None if match is None else (match[1], match[2])


def rados_module() -> Any:
    """The ``rados`` binding, or BindingUnavailable naming the Debian package."""
    if _rados is None:
        raise BindingUnavailable("rados", "python3-rados")
    return _rados


def rbd_module() -> Any:
    """The ``rbd`` binding, or BindingUnavailable naming the Debian package."""
    if _rbd is None:
        raise BindingUnavailable("rbd", "python3-rbd")
    return _rbd


@contextlib.contextmanager
def translate_ceph_errors(what: str) -> Iterator[None]:
    """Re-raise ``rados``/``rbd`` errors inside the block as StorageError subclasses.

    ``what`` says what was being done ("create image rbd/x"); it must never contain a key.
    """
    try:
        yield
    except StorageError:
        raise
    except Exception as exc:
        translated = _translate(exc, what)
        if translated is None:
            raise
        raise translated from exc


def _translate(exc: BaseException, what: str) -> StorageError | None:
    rbd, rados = _rbd, _rados
    if rbd is not None:
        if isinstance(exc, rbd.ImageNotFound):
            return ImageNotFound(f"{what}: image not found")
        if isinstance(exc, rbd.ImageExists):
            return ImageExists(f"{what}: image exists")
        if isinstance(exc, rbd.ImageBusy):
            return ImageBusy(f"{what}: image busy (it still has watchers)")
        if isinstance(exc, rbd.Error):
            return StorageError(f"{what}: {_describe(exc)}")
    if rados is not None:
        if isinstance(exc, rados.PermissionDeniedError | rados.PermissionError):
            return StorageError(f"{what}: permission denied (check the cephx user and keyring)")
        if isinstance(exc, rados.TimedOut):
            return StorageError(f"{what}: timed out (is the cluster reachable?)")
        if isinstance(exc, rados.ObjectNotFound):
            return StorageError(f"{what}: not found")
        if isinstance(exc, rados.Error):
            return StorageError(f"{what}: {_describe(exc)}")
    return None


def _describe(exc: BaseException) -> str:
    errno = getattr(exc, "errno", None)
    text = str(exc) or type(exc).__name__
    return f"{text} (errno {errno})" if errno else text


def connect(config: CephConfig, timeout: float = 30.0) -> Any:
    """A connected ``rados.Rados`` for ``config.user`` with its keyring; caller shuts it down.

    ``rbd_cache`` is off: the image is shared and a host-side cache would serve stale data.
    """
    rados = rados_module()
    where = f"connect to Ceph ({config.conf}) as client.{config.user}"
    if not config.conf.exists():
        raise StorageError(f"{where}: {config.conf} does not exist")
    if not config.keyring.exists():
        raise StorageError(f"{where}: keyring {config.keyring} does not exist")
    with translate_ceph_errors(where):
        handle = rados.Rados(
            conffile=str(config.conf),
            rados_id=config.user,
            conf={"keyring": str(config.keyring), "rbd_cache": "false"},
        )
        try:
            handle.connect(timeout=int(timeout))
        except BaseException:
            handle.shutdown()
            raise
    return handle


@contextlib.contextmanager
def cluster(config: CephConfig, timeout: float = 30.0) -> Iterator[Any]:
    """``with cluster(cfg) as handle:`` a connected ``rados.Rados``, shut down on exit."""
    handle = connect(config, timeout)
    try:
        yield handle
    finally:
        handle.shutdown()


def mon_command(handle: Any, command: dict[str, Any], what: str, target: str | None = None,
                inbuf: bytes = b"") -> bytes:
    """Run a mon command (JSON); a non-zero return becomes StorageError with the mon's text.

    ``what`` describes the command for the message; the command itself (which may carry a
    key in ``inbuf``) is never logged or put into the message.
    """
    with translate_ceph_errors(what):
        if target is None:
            ret, out, status = handle.mon_command(json.dumps(command), inbuf, timeout=30)
        else:
            ret, out, status = handle.mon_command(json.dumps(command), inbuf, timeout=30,
                                                  target=target)
    if ret != 0:
        raise StorageError(f"{what}: {status.strip() or 'failed'} (errno {-ret})")
    return bytes(out)


class RbdImageStore:
    """ImageStore over one librados handle (not thread-safe: one store per thread)."""

    CHARACTERISTICS = Characteristics.NONE

    def __init__(self, handle: Any) -> None:
        self._handle = handle
        self._rbd = rbd_module()

    @contextlib.contextmanager
    def _ioctx(self, pool: str) -> Iterator[Any]:
        with translate_ceph_errors(f"open pool {pool}"):
            ioctx = self._handle.open_ioctx(pool)
        try:
            yield ioctx
        finally:
            ioctx.close()

    def pool_exists(self, pool: str) -> bool:
        """True when ``pool`` exists."""
        with translate_ceph_errors(f"look up pool {pool}"):
            return bool(self._handle.pool_exists(pool))

    def create_pool(self, pool: str) -> None:
        """Create ``pool``, enable the rbd application and initialise it for RBD."""
        with translate_ceph_errors(f"create pool {pool}"):
            self._handle.create_pool(pool)
        mon_command(self._handle, {"prefix": "osd pool application enable", "pool": pool,
                                   "app": "rbd", "yes_i_really_mean_it": True},
                    f"enable rbd on pool {pool}")
        with self._ioctx(pool) as ioctx, translate_ceph_errors(f"initialise pool {pool}"):
            self._rbd.RBD().pool_init(ioctx, False)

    def image_info(self, pool: str, name: str) -> ImageInfo | None:
        """The image, or None when it does not exist."""
        with self._ioctx(pool) as ioctx:
            try:
                with translate_ceph_errors(f"open image {pool}/{name}"), \
                        self._rbd.Image(ioctx, name, read_only=True) as image:
                    return ImageInfo(pool, name, int(image.size()), int(image.features()))
            except ImageNotFound:
                return None

    def create_image(self, pool: str, name: str, size: int, features: int) -> None:
        """Create the image with exactly ``features``; ImageExists when the name is taken."""
        with self._ioctx(pool) as ioctx, translate_ceph_errors(f"create image {pool}/{name}"):
            self._rbd.RBD().create(ioctx, name, size, old_format=False, features=features)

    def remove_image(self, pool: str, name: str) -> None:
        """Remove the image; ImageBusy while it has watchers, ImageNotFound when absent."""
        with self._ioctx(pool) as ioctx, translate_ceph_errors(f"remove image {pool}/{name}"):
            self._rbd.RBD().remove(ioctx, name)

    def watchers(self, pool: str, name: str) -> list[Watcher]:
        """Every client watching the image header (one per open handle)."""
        with self._ioctx(pool) as ioctx, \
                translate_ceph_errors(f"list watchers of {pool}/{name}"), \
                self._rbd.Image(ioctx, name, read_only=True) as image:
            return [Watcher(addr=str(w["addr"]), global_id=int(w["id"]))
                    for w in image.watchers_list()]


class CephxCredentialStore:
    """CredentialStore over the mon commands of one librados handle."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    def list_users(self, prefix: str) -> list[str]:
        """Entity names ``client.<id>`` whose id starts with ``prefix``."""
        out = mon_command(self._handle, {"prefix": "auth ls", "format": "json"}, "list users")
        entities = [str(e["entity"]) for e in json.loads(out).get("auth_dump", [])]
        return sorted(e for e in entities if e.startswith(f"client.{prefix}"))

    def ensure_user(self, user: str, pool: str, image: str) -> SecretKey:
        """Create ``client.<user>`` with :func:`vm_user_caps` on ``pool/image``, or fix the caps
        of an existing one; returns its key (never logged).

        An existing user whose caps grant an image that still exists (another fleet's, or an
        image of another pool), or caps rbdfleet did not make, is left alone: StorageError. Only
        caps naming an image that is gone (the image was removed and created again) are
        rewritten, so two fleets can never take each other's user over.
        """
        entity = f"client.{user}"
        caps = vm_user_caps(pool, image, self._image_id(pool, image))
        flat = [part for kind, cap in sorted(caps.items()) for part in (kind, cap)]
        try:
            out = mon_command(self._handle, {"prefix": "auth get-or-create", "entity": entity,
                                             "caps": flat, "format": "json"},
                              f"create user {entity}")
        except StorageError as exc:
            if "doesn't match" not in str(exc) and "does not match" not in str(exc):
                raise
            self._check_stale(entity, pool, image)
            # auth caps replaces them all, and keeps the key
            mon_command(self._handle, {"prefix": "auth caps", "entity": entity, "caps": flat},
                        f"set caps of {entity}")
            out = mon_command(self._handle, {"prefix": "auth get", "entity": entity,
                                             "format": "json"}, f"read user {entity}")
        records = json.loads(out)
        key = records[0]["key"] if isinstance(records, list) else records["key"]
        return SecretKey(base64.b64decode(key))

    def caps(self, user: str) -> dict[str, str]:
        """The caps of ``client.<user>`` as the mon keeps them."""
        out = mon_command(self._handle, {"prefix": "auth get", "entity": f"client.{user}",
                                         "format": "json"}, f"read user client.{user}")
        records = json.loads(out)
        record = records[0] if isinstance(records, list) else records
        return {str(k): str(v) for k, v in record.get("caps", {}).items()}

    def _check_stale(self, entity: str, pool: str, image: str) -> None:
        granted = granted_image(self.caps(entity.removeprefix("client.")))
        if granted is None:
            raise StorageError(f"{entity} exists with caps rbdfleet did not make: refusing to "
                               f"rewrite them for {pool}/{image} (remove the user if it is "
                               "a leftover)")
        if granted[1] in self._image_ids(granted[0]):
            raise StorageError(f"{entity} holds image id {granted[1]} in pool {granted[0]}, "
                               f"which exists: it belongs to another fleet, refusing to move "
                               f"it to {pool}/{image}")

    def _image_ids(self, pool: str) -> dict[str, str]:
        """image id → name of every image of ``pool`` (empty when the pool is gone)."""
        rbd = rbd_module()
        with translate_ceph_errors(f"list images of {pool}"):
            if not self._handle.pool_exists(pool):
                return {}
            with self._handle.open_ioctx(pool) as ioctx:
                return {str(i["id"]): str(i["name"]) for i in rbd.RBD().list2(ioctx)}

    def _image_id(self, pool: str, image: str) -> str:
        """The id of ``pool/image``. Refused when it and another image's id are one the
        other's beginning: the header grant is an object prefix, so a grant of the shorter
        would cover the other's header too."""
        ids = self._image_ids(pool)
        mine = [i for i, name in ids.items() if name == image]
        if not mine:
            raise ImageNotFound(f"grant {pool}/{image}: image not found")
        clash = sorted(ids[i] for i in ids
                       if i != mine[0] and (i.startswith(mine[0]) or mine[0].startswith(i)))
        if clash:
            raise StorageError(f"grant {pool}/{image}: its id {mine[0]} and the id of image(s) "
                               f"{', '.join(clash)} begin one another; a prefix grant would "
                               "cover both")
        return mine[0]

    def remove_user(self, user: str) -> None:
        """Delete ``client.<user>``; absent is fine."""
        mon_command(self._handle, {"prefix": "auth rm", "entity": f"client.{user}"},
                    f"remove user client.{user}")

    def mon_names(self) -> list[str]:
        """Names of the monitors in the monmap."""
        out = mon_command(self._handle, {"prefix": "mon dump", "format": "json"}, "read monmap")
        return [str(m["name"]) for m in json.loads(out)["mons"]]

    def mon_hosts(self) -> tuple[MonHost, ...]:
        """Each monitor's msgr2 address (its first address when it has no v2 one)."""
        out = mon_command(self._handle, {"prefix": "mon dump", "format": "json"}, "read monmap")
        hosts = []
        for mon in json.loads(out)["mons"]:
            addrs = mon.get("public_addrs", {}).get("addrvec", [])
            chosen = next((a for a in addrs if a.get("type") == "v2"), addrs[0] if addrs else None)
            if chosen is None:
                continue
            host, _, port = str(chosen["addr"]).rpartition(":")
            hosts.append(MonHost(host.strip("[]"), int(port)))
        return tuple(hosts)

    def sessions(self) -> list[ClientSession]:
        """Client sessions of every monitor (``sessions`` sent to each one by name)."""
        result = []
        for name in self.mon_names():
            out = mon_command(self._handle, {"prefix": "sessions", "format": "json"},
                              f"list sessions of mon.{name}", target=name)
            result.extend(parse_sessions(json.loads(out)))
        return result


def parse_sessions(sessions: list[Any]) -> list[ClientSession]:
    """Client entries of a mon's ``sessions`` dump (JSON of 16.2: ``entity_name``,
    ``global_id``, ``addrs.addrvec[].{addr,nonce}``)."""
    result = []
    for entry in sessions:
        entity = str(entry.get("entity_name", ""))
        if entry.get("con_type") != "client" or not entity.startswith("client."):
            continue
        addrvec = (entry.get("addrs") or {}).get("addrvec") or [entry.get("socket_addr") or {}]
        first = addrvec[0] if addrvec else {}
        addr = f"{first.get('addr', '')}/{first.get('nonce', 0)}"
        result.append(ClientSession(int(entry.get("global_id", 0)), entity, addr))
    return result


class BlocklistFencer:
    """Fencer: blocklist exactly the addresses a VM's cephx user has on the fleet's image.

    A VM's clients are the image's watchers whose global id belongs to a mon session of
    the VM's own cephx user (one user per VM makes that mapping exact).
    """

    CHARACTERISTICS = Characteristics.FENCES_BY_CLIENT_ADDRESS | Characteristics.WAITS_FOR_OSDMAP

    def __init__(self, handle: Any, pool: str, image: str, users: dict[str, str],
                 expire_seconds: float = 3600.0, enforce_timeout: float = 30.0,
                 monotonic: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        """``users`` maps VM name → cephx id (without ``client.``); ``enforce_timeout``
        bounds the wait for the OSDs to take the blocklist in."""
        self._handle = handle
        self._images = RbdImageStore(handle)
        self._credentials = CephxCredentialStore(handle)
        self._pool = pool
        self._image = image
        self._users = users
        self._expire = expire_seconds
        self._enforce_timeout = enforce_timeout
        self._monotonic = monotonic
        self._sleep = sleep

    def clients(self, vm: str) -> list[str]:
        """The VM's client addresses among the image's watchers."""
        return client_addresses(self._images.watchers(self._pool, self._image),
                                self._credentials.sessions(), self._user_of(vm))

    def _user_of(self, vm: str) -> str:
        try:
            return self._users[vm]
        except KeyError:
            raise StorageError(f"fence {vm}: not a VM of this fleet") from None

    def fence(self, vm: str) -> list[str]:
        """Blocklist the VM's addresses, then wait until every OSD enforces it."""
        addresses = self.clients(vm)
        for addr in addresses:
            mon_command(self._handle, {"prefix": "osd blocklist", "blocklistop": "add",
                                       "addr": addr, "expire": self._expire},
                        f"blocklist {addr} of {vm}")
            LOG.info("fenced vm=%s addr=%s", vm, addr)
        if addresses:
            self._wait_enforced(f"fence {vm}")
        return addresses

    def _wait_enforced(self, what: str) -> None:
        """Return once every up OSD has the osdmap epoch this handle has after
        ``wait_for_latest_osdmap`` (the one holding our blocklist entries); StorageError when
        one does not within ``enforce_timeout``."""
        with translate_ceph_errors(f"{what}: wait for the latest osdmap"):
            self._handle.wait_for_latest_osdmap()
        dump = json.loads(mon_command(self._handle, {"prefix": "osd dump", "format": "json"},
                                      f"{what}: read the osdmap"))
        epoch = int(dump["epoch"])
        deadline = self._monotonic() + self._enforce_timeout
        for osd in sorted(int(o["osd"]) for o in dump.get("osds", []) if o.get("up")):
            while (have := self._osd_epoch(osd, what)) < epoch:
                if self._monotonic() > deadline:
                    raise StorageError(f"{what}: osd.{osd} is at osdmap epoch {have}, not yet "
                                       f"{epoch} (the blocklist), after "
                                       f"{self._enforce_timeout:.0f} s")
                self._sleep(0.01)

    def _osd_epoch(self, osd: int, what: str) -> int:
        """The newest osdmap epoch ``osd`` has (``tell osd.N status``)."""
        with translate_ceph_errors(f"{what}: ask osd.{osd} for its osdmap"):
            ret, out, status = self._handle.osd_command(osd, json.dumps({"prefix": "status"}),
                                                        b"", timeout=30)
        if ret != 0:
            raise StorageError(f"{what}: osd.{osd} status: {status.strip() or 'failed'} "
                               f"(errno {-ret})")
        return int(json.loads(out)["newest_map"])

    def is_fenced(self, vm: str) -> bool:
        """True when every client of ``vm``'s cephx user (its mon sessions and its watchers
        of the image) is on the blocklist, then once every up OSD has the latest osdmap.

        The proof the role switch needs before it attaches a new writer while ``vm`` still
        holds the disk read-write (a paused guest): a blocklisted librbd cannot write again.
        A VM with no client at all has nothing that could write either.
        """
        user = f"client.{self._user_of(vm)}"
        sessions = [s for s in self._credentials.sessions() if s.entity == user]
        ids = {s.global_id for s in sessions}
        watchers = self._images.watchers(self._pool, self._image)
        addresses = {s.addr for s in sessions} | {w.addr for w in watchers if w.global_id in ids}
        blocklisted = set(self.blocklist())
        missing = sorted(addresses - blocklisted)
        if missing:
            LOG.info("not fenced vm=%s unblocklisted=%s", vm, ",".join(missing))
            return False
        self._wait_enforced(f"prove {vm} fenced")
        return True

    def unfence(self, addresses: list[str]) -> None:
        """Remove blocklist entries (the fenced librados clients still must reconnect)."""
        for addr in addresses:
            mon_command(self._handle, {"prefix": "osd blocklist", "blocklistop": "rm",
                                       "addr": addr}, f"un-blocklist {addr}")

    def blocklist(self) -> list[str]:
        """Addresses currently blocklisted."""
        out = mon_command(self._handle, {"prefix": "osd blocklist ls", "format": "json"},
                          "list the blocklist")
        text = out.decode().strip()
        if not text:
            return []
        entries, _ = json.JSONDecoder().raw_decode(text)  # 16.2 prints two arrays (G5)
        return [str(e["addr"]) for e in entries]


def client_addresses(watchers: list[Watcher], sessions: list[ClientSession],
                     user: str) -> list[str]:
    """Addresses of the watchers whose global id has a mon session as ``client.<user>``."""
    ids = {s.global_id for s in sessions if s.entity == f"client.{user}"}
    return sorted({w.addr for w in watchers if w.global_id in ids})
