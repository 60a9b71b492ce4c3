"""libvirt adapter: the ONE orchestrator module that imports ``libvirt``.

:class:`LibvirtHypervisor` implements ``orchestrator.ports.Hypervisor`` over one connection
per URI (opened on first use). :func:`translate_libvirt_errors` maps ``libvirt.libvirtError``
to ``orchestrator.errors`` once.

What libvirt does not guarantee, and what we do about it:

* Detach is an unplug *request* to the guest: the call may return before the disk is gone,
  and a paused guest never completes it. :meth:`LibvirtHypervisor.detach_disk` removes the
  disk from the persistent config first, then waits (bounded) until the live XML no longer
  has it, else raises DetachPending.
* ``<target dev>`` is only a hint; the guest names disks by probe order. The serial is
  what identifies the disk, here and in the guest.
* Secrets are defined ``private='yes'``: their value cannot be read back, so an existing
  secret's value is re-set whenever the key is given.
* Lifecycle events reach only connections opened after an event implementation was
  registered, and only while some thread runs it: :meth:`LibvirtHypervisor.watch_domains`
  registers libvirt's default one once per process, runs it on a daemon thread, and opens a
  connection of its own per watch (so connections opened earlier keep working unchanged).
  A watch whose connection breaks (libvirtd restarted) says so in the log and delivers
  nothing more: the coordinator then detects deaths from silence and probes alone.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from agents.errors import BindingUnavailable
from orchestrator.adapters import domain_xml
from orchestrator.errors import DetachPending, DeviceAttachError, DomainNotFound, HypervisorError
from orchestrator.ports import (
    Characteristics,
    DiskSpec,
    DomainEvent,
    DomainInfo,
    DomainState,
    SecretKey,
)

try:  # Debian's python3-libvirt
    import libvirt as _libvirt
except ImportError:  # pragma: no cover - depends on the host
    _libvirt = None

LOG = logging.getLogger(__name__)

__all__ = ["LibvirtHypervisor", "domain_state", "libvirt_module", "translate_libvirt_errors"]

DETACH_TIMEOUT_S = 20.0
KEEPALIVE = (5, 3)  # a watch notices a dead libvirtd within ~20 s (interval s, missed probes)

# lifecycle event -> the state it means; a detail named here overrides the event's state
# (None: not a change of run state worth telling, e.g. the end of a migration's source side)
_EVENT_STATES: dict[str, DomainState | None] = {
    "STARTED": DomainState.RUNNING,
    "RESUMED": DomainState.RUNNING,
    "SUSPENDED": DomainState.PAUSED,
    "PMSUSPENDED": DomainState.PAUSED,
    "STOPPED": DomainState.STOPPED,
    "CRASHED": DomainState.CRASHED,
}
_DETAIL_STATES: dict[tuple[str, str], DomainState | None] = {
    ("STOPPED", "CRASHED"): DomainState.CRASHED,
    ("STOPPED", "MIGRATED"): None,  # it runs on the destination now
    ("SUSPENDED", "MIGRATED"): None,  # the pause at the end of a live migration
    ("SUSPENDED", "POSTCOPY"): None,
}

_event_loop_lock = threading.Lock()
_event_loop_running = False


def libvirt_module() -> Any:
    """The ``libvirt`` binding, or BindingUnavailable naming the Debian package."""
    if _libvirt is None:
        raise BindingUnavailable("libvirt", "python3-libvirt")
    return _libvirt


@contextlib.contextmanager
def translate_libvirt_errors(what: str, domain: str | None = None,
                             attach: bool = False) -> Iterator[None]:
    """Re-raise ``libvirt.libvirtError`` inside the block as HypervisorError subclasses."""
    try:
        yield
    except HypervisorError:
        raise
    except Exception as exc:
        lv = _libvirt
        if lv is None or not isinstance(exc, lv.libvirtError):
            raise
        code = exc.get_error_code()
        message = (exc.get_error_message() or str(exc)).strip()
        if code == lv.VIR_ERR_NO_DOMAIN and domain is not None:
            raise DomainNotFound(f"{what}: no domain named {domain!r}") from exc
        if attach:
            raise DeviceAttachError(f"{what}: {message}") from exc
        raise HypervisorError(f"{what}: {message}") from exc


def domain_state(lv: Any, event: int, detail: int) -> tuple[DomainState, str] | None:
    """The run state a lifecycle ``event``/``detail`` pair of the binding ``lv`` means, with
    the detail's name (``destroyed``, ``paused``...); None for events that are no change of
    run state (defined, undefined, a guest-initiated shutdown still in progress...)."""
    name = next((n for n in _EVENT_STATES if getattr(lv, f"VIR_DOMAIN_EVENT_{n}", None) == event),
                None)
    if name is None:
        return None
    prefix = f"VIR_DOMAIN_EVENT_{name}_"
    word = next((attr[len(prefix):] for attr in sorted(dir(lv))
                 if attr.startswith(prefix) and getattr(lv, attr) == detail), str(detail))
    key = (name, word)
    state = _DETAIL_STATES[key] if key in _DETAIL_STATES else _EVENT_STATES[name]
    return None if state is None else (state, word.lower())


def _ensure_event_loop(lv: Any) -> None:
    """Register libvirt's default event implementation once per process and run it on a
    daemon thread (module docstring)."""
    global _event_loop_running
    with _event_loop_lock:
        if _event_loop_running:
            return
        with translate_libvirt_errors("register the libvirt event loop"):
            lv.virEventRegisterDefaultImpl()
        threading.Thread(target=_run_event_loop, args=(lv,), name="libvirt-events",
                         daemon=True).start()
        _event_loop_running = True


def _run_event_loop(lv: Any) -> None:
    while True:
        try:
            lv.virEventRunDefaultImpl()
        except lv.libvirtError as exc:  # keep serving the other watches
            LOG.warning("event=libvirt_event_loop_error reason=%s", exc)
            time.sleep(0.1)


def _ignore_libvirt_error(_ctx: object, _error: object) -> None:
    """libvirt error callback that keeps quiet (the error is raised as libvirtError)."""


class LibvirtHypervisor:
    """Hypervisor over libvirt connections, one per URI, closed by :meth:`close`."""

    CHARACTERISTICS = Characteristics.HOT_PLUG | Characteristics.PRIVATE_SECRETS

    def __init__(self, monotonic: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._libvirt = libvirt_module()
        # libvirt's default handler prints every error to stderr, expected ones too (a
        # secret looked up before it exists); errors reach us as exceptions anyway.
        self._libvirt.registerErrorHandler(_ignore_libvirt_error, None)
        self._connections: dict[str, Any] = {}
        self._watches: dict[int, Callable[[], None]] = {}
        self._watch_lock = threading.Lock()
        self._monotonic = monotonic
        self._sleep = sleep

    def __enter__(self) -> LibvirtHypervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End every watch and close every connection opened so far."""
        with self._watch_lock:
            stops = list(self._watches.values())
        for stop in stops:
            stop()
        for conn in self._connections.values():
            with contextlib.suppress(Exception):
                conn.close()
        self._connections.clear()

    def _conn(self, uri: str) -> Any:
        conn = self._connections.get(uri)
        if conn is None:
            with translate_libvirt_errors(f"connect to libvirt at {uri}"):
                conn = self._libvirt.open(uri)
            if conn is None:  # older bindings return None instead of raising
                raise HypervisorError(f"connect to libvirt at {uri}: failed")
            self._connections[uri] = conn
        return conn

    def _domain(self, uri: str, name: str) -> Any:
        with translate_libvirt_errors(f"look up domain {name} on {uri}", domain=name):
            return self._conn(uri).lookupByName(name)

    def _xml(self, dom: Any, inactive: bool) -> str:
        flags = self._libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        name = str(dom.name())
        with translate_libvirt_errors(f"read XML of domain {name}", domain=name):
            return str(dom.XMLDesc(flags))

    def domain(self, uri: str, name: str) -> DomainInfo:
        """The domain and its RBD disks (live ones when running, else persistent ones)."""
        dom = self._domain(uri, name)
        with translate_libvirt_errors(f"read state of domain {name}", domain=name):
            active = bool(dom.isActive())
        disks = domain_xml.parse_disks(self._xml(dom, inactive=not active))
        return DomainInfo(uri=uri, name=name, active=active, disks=tuple(disks))

    def domains(self, uri: str) -> list[DomainInfo]:
        """Every domain on ``uri`` with its RBD disks."""
        with translate_libvirt_errors(f"list domains on {uri}"):
            names = [str(d.name()) for d in self._conn(uri).listAllDomains(0)]
        result = []
        for name in names:
            with contextlib.suppress(DomainNotFound):  # undefined meanwhile
                result.append(self.domain(uri, name))
        return result

    def secret_uuid(self, uri: str, usage: str) -> str | None:
        """UUID of the ceph secret with this usage name, or None."""
        lv = self._libvirt
        try:
            secret = self._conn(uri).secretLookupByUsage(lv.VIR_SECRET_USAGE_TYPE_CEPH, usage)
        except lv.libvirtError as exc:
            if exc.get_error_code() == lv.VIR_ERR_NO_SECRET:
                return None
            with translate_libvirt_errors(f"look up secret {usage} on {uri}"):
                raise
        return str(secret.UUIDString())

    def list_secrets(self, uri: str, prefix: str) -> list[str]:
        """Usage names of the ceph secrets on ``uri`` that start with ``prefix``."""
        lv = self._libvirt
        with translate_libvirt_errors(f"list secrets on {uri}"):
            secrets = self._conn(uri).listAllSecrets(0)
            usages = [str(s.usageID()) for s in secrets
                      if s.usageType() == lv.VIR_SECRET_USAGE_TYPE_CEPH]
        return sorted(u for u in usages if u.startswith(prefix))

    def ensure_secret(self, uri: str, usage: str, key: SecretKey) -> str:
        """Define (or reuse) the private ceph secret ``usage`` and set its value to ``key``."""
        conn = self._conn(uri)
        with translate_libvirt_errors(f"define secret {usage} on {uri}"):
            uuid = self.secret_uuid(uri, usage)
            if uuid is None:
                secret = conn.secretDefineXML(domain_xml.secret_xml(usage, f"rbdfleet {usage}"))
            else:
                secret = conn.secretLookupByUUIDString(uuid)
            secret.setValue(key.reveal())
            return str(secret.UUIDString())

    def remove_secret(self, uri: str, usage: str) -> None:
        """Undefine the ceph secret ``usage``; absent is fine."""
        uuid = self.secret_uuid(uri, usage)
        if uuid is None:
            return
        with translate_libvirt_errors(f"remove secret {usage} on {uri}"):
            self._conn(uri).secretLookupByUUIDString(uuid).undefine()

    def attach_disk(self, uri: str, domain: str, disk: DiskSpec) -> None:
        """Attach LIVE|CONFIG to a running domain, CONFIG only to a stopped one."""
        lv = self._libvirt
        dom = self._domain(uri, domain)
        what = f"attach {disk.serial} ({disk.mode}) to {domain}"
        with translate_libvirt_errors(what, domain=domain, attach=True):
            active = bool(dom.isActive())
            used = domain_xml.targets(self._xml(dom, inactive=True))
            if active:
                used |= domain_xml.targets(self._xml(dom, inactive=False))
            spec = DiskSpec(disk.pool, disk.image, disk.serial, disk.user, disk.secret_uuid,
                            disk.mon_hosts, disk.mode, domain_xml.free_target(used))
            flags = lv.VIR_DOMAIN_AFFECT_CONFIG
            if active:
                flags |= lv.VIR_DOMAIN_AFFECT_LIVE
            dom.attachDeviceFlags(domain_xml.disk_xml(spec), flags)

    def detach_disk(self, uri: str, domain: str, serial: str,
                    live_timeout: float | None = None) -> None:
        """Detach the disk with ``serial`` from the persistent config, then from the live
        domain, and wait until the live domain no longer has it; absent is fine.

        The config goes first so that a restart of the domain never brings the disk back,
        whatever happens to the live unplug. A paused guest cannot answer the unplug request
        (and libvirt would block on it): DetachPending at once, the request is left for a
        later detach once the guest runs. A running guest that does not release the disk
        within ``live_timeout`` (default DETACH_TIMEOUT_S): DetachPending too.
        """
        lv = self._libvirt
        dom = self._domain(uri, domain)
        what = f"detach {serial} from {domain}"
        with translate_libvirt_errors(what, domain=domain, attach=True):
            persistent = domain_xml.disk_element_xml(self._xml(dom, inactive=True), serial)
            if persistent is not None and dom.isPersistent():
                dom.detachDeviceFlags(persistent, lv.VIR_DOMAIN_AFFECT_CONFIG)
            if not dom.isActive():
                return
            live = domain_xml.disk_element_xml(self._xml(dom, inactive=False), serial)
            if live is None:
                return
            if dom.state()[0] == lv.VIR_DOMAIN_PAUSED:
                raise DetachPending(f"{what}: the domain is paused, its guest cannot release "
                                    "the disk until it runs again", domain)
            dom.detachDeviceFlags(live, lv.VIR_DOMAIN_AFFECT_LIVE)
        self._wait_gone(dom, serial, what, DETACH_TIMEOUT_S if live_timeout is None
                        else live_timeout)

    def _wait_gone(self, dom: Any, serial: str, what: str, timeout: float) -> None:
        deadline = self._monotonic() + timeout
        while domain_xml.disk_element_xml(self._xml(dom, inactive=False), serial) is not None:
            if self._monotonic() > deadline:
                raise DetachPending(
                    f"{what}: the guest did not release the disk within {timeout:.1f} s",
                    str(dom.name()))
            self._sleep(0.05)

    def watch_domains(self, uri: str, on_event: Callable[[DomainEvent], None]
                      ) -> Callable[[], None]:
        """Deliver ``uri``'s domain lifecycle events to ``on_event`` from the event loop's
        thread, over a connection of this watch's own; returns the function that ends it."""
        lv = self._libvirt
        _ensure_event_loop(lv)
        with translate_libvirt_errors(f"watch domains on {uri}"):
            conn = lv.open(uri)
            if conn is None:
                raise HypervisorError(f"watch domains on {uri}: connect failed")
            conn.setKeepAlive(*KEEPALIVE)

        def lifecycle(_conn: Any, dom: Any, event: int, detail: int, _opaque: object) -> None:
            found = domain_state(lv, event, detail)
            if found is None:
                return
            try:
                on_event(DomainEvent(uri, str(dom.name()), found[0], found[1]))
            except Exception:  # never let one watcher's bug stop the process's event loop
                LOG.exception("event=domain_event_handler_failed uri=%s", uri)

        def closed(_conn: Any, reason: int, _opaque: object) -> None:
            LOG.warning("event=domain_watch_lost uri=%s reason=%d: no more lifecycle events "
                        "from it", uri, reason)

        with translate_libvirt_errors(f"watch domains on {uri}"):
            callback = conn.domainEventRegisterAny(None, lv.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                                                   lifecycle, None)
            conn.registerCloseCallback(closed, None)
        key = id(conn)

        def stop() -> None:
            with self._watch_lock:
                if self._watches.pop(key, None) is None:
                    return
            with contextlib.suppress(Exception):
                conn.domainEventDeregisterAny(callback)
            with contextlib.suppress(Exception):
                conn.unregisterCloseCallback()
            with contextlib.suppress(Exception):
                conn.close()

        with self._watch_lock:
            self._watches[key] = stop
        return stop
