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
* Lifecycle events and keepalives work only on connections opened after an event
  implementation was registered, and only while some thread runs it: the first
  :class:`LibvirtHypervisor` registers libvirt's default one for the process and runs it on a
  daemon thread, so every connection it opens has keepalives (a peer that stops answering,
  a hypervisor host lost, breaks the connection within ~20 s instead of hanging a call).
  :meth:`LibvirtHypervisor.watch_domains` opens a connection of its own per watch.
* Remote hypervisors (``qemu+ssh://``, ``qemu+libssh://``...; docs/provisioning.md): the
  ``ssh`` transport runs OpenSSH, which would ask for a password or a new host key on a
  terminal, so the adapter opens ``+ssh`` URIs with ``no_tty=1`` (BatchMode: refuse instead
  of asking); the libssh transports have nobody to ask (no auth callback) and refuse too. An
  open of another host's URI is bounded (``connect_timeout``) even when the host swallows
  packets; a connection found broken is opened again at the next call. Every failure to
  reach a hypervisor, or a connection lost in a call, is
  :class:`~orchestrator.errors.HypervisorUnreachable` naming the URI without its query or
  any password (:func:`display_uri`).
* A watch whose connection breaks (libvirtd restarted, SSH connection cut, host lost) says so
  in the log and is opened again in the background, with backoff, until it is ended; events
  of the gap are lost, so meanwhile the coordinator detects deaths from silence and probes.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

from agents.errors import BindingUnavailable
from orchestrator.adapters import domain_xml
from orchestrator.config import display_uri
from orchestrator.errors import (
    DetachPending,
    DeviceAttachError,
    DomainNotFound,
    HypervisorError,
    HypervisorUnreachable,
)
from orchestrator.ports import (
    AttachedDisk,
    Characteristics,
    DiskMode,
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

__all__ = [
    "LibvirtHypervisor",
    "domain_state",
    "libvirt_module",
    "non_interactive",
    "translate_libvirt_errors",
]

DETACH_TIMEOUT_S = 20.0
KEEPALIVE = (5, 3)  # a dead libvirtd or host is noticed within ~20 s (interval s, missed probes)
CONNECT_TIMEOUT_S = 15.0  # an SSH open takes 0.5-2 s on a loaded host; a silent one, forever
WATCH_RETRY_S = (1.0, 30.0)  # first and longest wait between a lost watch's reconnects

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


def non_interactive(uri: str) -> str:
    """``uri`` as opened: an ``+ssh`` URI gets ``no_tty=1`` unless it sets ``no_tty`` itself,
    so OpenSSH runs in BatchMode and refuses (a password, an unknown host key) instead of
    asking on a terminal nobody watches."""
    parts = urllib.parse.urlsplit(uri)
    transport = parts.scheme.partition("+")[2]
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    if transport != "ssh" or any(name == "no_tty" for name, _ in query):
        return uri
    return urllib.parse.urlunsplit(parts._replace(
        query=(parts.query + "&" if parts.query else "") + "no_tty=1"))


def _from_libvirt(exc: BaseException | None) -> bool:
    return _libvirt is not None and isinstance(exc, _libvirt.libvirtError)


class _Opening:
    """One ``libvirt.open`` on a thread of its own, waited for at most a timeout: a host that
    swallows packets (powered off, cut off) or an SSH server that never answers would hold
    the caller for minutes (TCP's connect timeout) or forever. A connection that arrives after
    its caller gave up is closed."""

    def __init__(self, lv: Any, uri: str) -> None:
        self._lv = lv
        self._uri = uri
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._abandoned = False
        self._conn: Any = None
        self._error: BaseException | None = None
        threading.Thread(target=self._run, name="libvirt-open", daemon=True).start()

    def _run(self) -> None:
        conn: Any = None
        error: BaseException | None = None
        try:
            conn = self._lv.open(non_interactive(self._uri))
        except Exception as exc:  # handed to the caller as it is
            error = exc
        with self._lock:
            if self._abandoned:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
                return
            self._conn, self._error = conn, error
            self._done.set()

    def result(self, timeout: float | None) -> Any:
        """The connection; HypervisorUnreachable when the open failed or took longer than
        ``timeout`` (None: no limit), HypervisorError when libvirt refuses the URI itself."""
        shown = display_uri(self._uri)
        self._done.wait(timeout)
        with self._lock:
            if not self._done.is_set():
                self._abandoned = True
                raise HypervisorUnreachable(shown, f"no answer within {timeout or 0:.0f} s")
        error = self._error
        if error is not None:
            if not _from_libvirt(error):
                raise error
            lv = self._lv
            message = (error.get_error_message() or str(error)).strip()  # type: ignore[attr-defined]
            if error.get_error_code() in (lv.VIR_ERR_INVALID_ARG,  # type: ignore[attr-defined]
                                          lv.VIR_ERR_NO_CONNECT):
                raise HypervisorError(f"connect to libvirt at {shown}: {message}") from error
            raise HypervisorUnreachable(shown, message) from error
        if self._conn is None:  # older bindings return None instead of raising
            raise HypervisorUnreachable(shown, "connect failed")
        return self._conn


class LibvirtHypervisor:
    """Hypervisor over libvirt connections, one per URI, closed by :meth:`close`."""

    CHARACTERISTICS = Characteristics.HOT_PLUG | Characteristics.PRIVATE_SECRETS

    def __init__(self, monotonic: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep,
                 connect_timeout: float = CONNECT_TIMEOUT_S) -> None:
        self._libvirt = libvirt_module()
        # libvirt's default handler prints every error to stderr, expected ones too (a
        # secret looked up before it exists); errors reach us as exceptions anyway.
        self._libvirt.registerErrorHandler(_ignore_libvirt_error, None)
        # before any connection is opened: keepalives and events need it (module docstring)
        _ensure_event_loop(self._libvirt)
        self._connections: dict[str, Any] = {}
        self._watches: dict[int, _Watch] = {}
        self._watch_lock = threading.Lock()
        self._monotonic = monotonic
        self._sleep = sleep
        self.connect_timeout = connect_timeout

    def __enter__(self) -> LibvirtHypervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End every watch and close every connection opened so far."""
        with self._watch_lock:
            watches = list(self._watches.values())
            self._watches.clear()
        for watch in watches:
            watch.stop()
        for conn in self._connections.values():
            with contextlib.suppress(Exception):
                conn.close()
        self._connections.clear()

    def open(self, uri: str) -> Any:
        """A new connection to ``uri`` with keepalives; one to another host within
        ``connect_timeout`` (HypervisorUnreachable otherwise). A local daemon's socket answers
        or refuses at once, and a busy one is waited for, as before remote hosts existed (a
        loaded sandbox's libvirtd can take seconds). The caller closes the connection."""
        remote = bool(urllib.parse.urlsplit(uri).netloc)
        conn = _Opening(self._libvirt, uri).result(self.connect_timeout if remote else None)
        with contextlib.suppress(Exception):  # 1: the peer does without keepalives
            conn.setKeepAlive(*KEEPALIVE)
        return conn

    def _conn(self, uri: str) -> Any:
        conn = self._connections.get(uri)
        if conn is not None and not self._alive(conn):
            LOG.warning("event=hypervisor_reconnect uri=%s reason=\"connection lost\"",
                        display_uri(uri))
            self._forget(uri)
            conn = None
        if conn is None:
            conn = self.open(uri)
            self._connections[uri] = conn
        return conn

    @staticmethod
    def _alive(conn: Any) -> bool:
        try:
            return bool(conn.isAlive())  # local: asks the client's socket, no round trip
        except Exception:
            return False

    def _forget(self, uri: str) -> None:
        conn = self._connections.pop(uri, None)
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    @contextlib.contextmanager
    def _calling(self, uri: str, what: str, domain: str | None = None,
                 attach: bool = False) -> Iterator[None]:
        """:func:`translate_libvirt_errors`, and a libvirt error that left ``uri``'s
        connection dead is HypervisorUnreachable (the connection is dropped: the next call
        opens a new one)."""
        try:
            with translate_libvirt_errors(what, domain, attach):
                yield
        except HypervisorUnreachable:
            raise
        except HypervisorError as exc:
            conn = self._connections.get(uri)
            if _from_libvirt(exc.__cause__) and conn is not None and not self._alive(conn):
                self._forget(uri)
                raise HypervisorUnreachable(display_uri(uri), f"{what}: connection lost "
                                            f"({exc.__cause__})") from exc
            raise

    def _domain(self, uri: str, name: str) -> Any:
        with self._calling(uri, f"look up domain {name} on {display_uri(uri)}", domain=name):
            return self._conn(uri).lookupByName(name)

    def _xml(self, uri: str, dom: Any, inactive: bool) -> str:
        flags = self._libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        name = str(dom.name())
        with self._calling(uri, f"read XML of domain {name}", domain=name):
            return str(dom.XMLDesc(flags))

    def domain(self, uri: str, name: str) -> DomainInfo:
        """The domain and its RBD disks: the persistent ones, and when it runs the live ones
        too (by serial; a read-write one wins over a read-only one).

        A disk only in the persistent config of a running domain comes live at its next
        start: left unseen, a deprovision would leave it there, naming a secret it removes,
        and the domain would no longer start; a read-write one would be a writer nobody
        planned for."""
        dom = self._domain(uri, name)
        with self._calling(uri, f"read state of domain {name}", domain=name):
            active = bool(dom.isActive())
            persistent = bool(dom.isPersistent())
        def key(disk: AttachedDisk) -> str:  # a disk without a serial is none of ours
            return disk.serial or f"{disk.pool}/{disk.image} on {disk.target}"

        disks = {key(d): d for d in domain_xml.parse_disks(self._xml(uri, dom, inactive=True))
                 } if persistent or not active else {}
        if active:
            for disk in domain_xml.parse_disks(self._xml(uri, dom, inactive=False)):
                held = disks.get(key(disk))
                if held is None or held.mode is not DiskMode.RW:
                    disks[key(disk)] = disk
        return DomainInfo(uri=uri, name=name, active=active, disks=tuple(disks.values()))

    def domains(self, uri: str) -> list[DomainInfo]:
        """Every domain on ``uri`` with its RBD disks."""
        with self._calling(uri, f"list domains on {display_uri(uri)}"):
            names = [str(d.name()) for d in self._conn(uri).listAllDomains(0)]
        result = []
        for name in names:
            with contextlib.suppress(DomainNotFound):  # undefined meanwhile
                result.append(self.domain(uri, name))
        return result

    def secret_uuid(self, uri: str, usage: str) -> str | None:
        """UUID of the ceph secret with this usage name, or None."""
        lv = self._libvirt
        with self._calling(uri, f"look up secret {usage} on {display_uri(uri)}"):
            try:
                secret = self._conn(uri).secretLookupByUsage(lv.VIR_SECRET_USAGE_TYPE_CEPH,
                                                             usage)
            except lv.libvirtError as exc:
                if exc.get_error_code() == lv.VIR_ERR_NO_SECRET:
                    return None
                raise
            return str(secret.UUIDString())

    def list_secrets(self, uri: str, prefix: str) -> list[str]:
        """Usage names of the ceph secrets on ``uri`` that start with ``prefix``."""
        lv = self._libvirt
        with self._calling(uri, f"list secrets on {display_uri(uri)}"):
            secrets = self._conn(uri).listAllSecrets(0)
            usages = [str(s.usageID()) for s in secrets
                      if s.usageType() == lv.VIR_SECRET_USAGE_TYPE_CEPH]
        return sorted(u for u in usages if u.startswith(prefix))

    def ensure_secret(self, uri: str, usage: str, key: SecretKey) -> str:
        """Define (or reuse) the private ceph secret ``usage`` and set its value to ``key``."""
        with self._calling(uri, f"define secret {usage} on {display_uri(uri)}"):
            conn = self._conn(uri)
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
        with self._calling(uri, f"remove secret {usage} on {display_uri(uri)}"):
            self._conn(uri).secretLookupByUUIDString(uuid).undefine()

    def attach_disk(self, uri: str, domain: str, disk: DiskSpec) -> None:
        """Attach LIVE|CONFIG to a running domain, CONFIG only to a stopped one."""
        lv = self._libvirt
        dom = self._domain(uri, domain)
        what = f"attach {disk.serial} ({disk.mode}) to {domain}"
        with self._calling(uri, what, domain=domain, attach=True):
            active = bool(dom.isActive())
            used = domain_xml.targets(self._xml(uri, dom, inactive=True))
            if active:
                used |= domain_xml.targets(self._xml(uri, dom, inactive=False))
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
        with self._calling(uri, what, domain=domain, attach=True):
            persistent = domain_xml.disk_element_xml(self._xml(uri, dom, inactive=True), serial)
            if persistent is not None and dom.isPersistent():
                dom.detachDeviceFlags(persistent, lv.VIR_DOMAIN_AFFECT_CONFIG)
            if not dom.isActive():
                return
            live = domain_xml.disk_element_xml(self._xml(uri, dom, inactive=False), serial)
            if live is None:
                return
            if dom.state()[0] == lv.VIR_DOMAIN_PAUSED:
                raise DetachPending(f"{what}: the domain is paused, its guest cannot release "
                                    "the disk until it runs again", domain)
            dom.detachDeviceFlags(live, lv.VIR_DOMAIN_AFFECT_LIVE)
        self._wait_gone(uri, dom, serial, what, DETACH_TIMEOUT_S if live_timeout is None
                        else live_timeout)

    def _wait_gone(self, uri: str, dom: Any, serial: str, what: str, timeout: float) -> None:
        deadline = self._monotonic() + timeout
        while domain_xml.disk_element_xml(self._xml(uri, dom, inactive=False),
                                          serial) is not None:
            if self._monotonic() > deadline:
                raise DetachPending(
                    f"{what}: the guest did not release the disk within {timeout:.1f} s",
                    str(dom.name()))
            self._sleep(0.05)

    def watch_domains(self, uri: str, on_event: Callable[[DomainEvent], None], *,
                      keep_trying: bool = False) -> Callable[[], None]:
        """Deliver ``uri``'s domain lifecycle events to ``on_event`` from the event loop's
        thread, over a connection of this watch's own (opened again in the background when
        it breaks); returns the function that ends it. HypervisorUnreachable when the first
        connection cannot be opened, unless ``keep_trying``: then it is opened in the
        background too, as after a loss."""
        watch = _Watch(self, uri, on_event)
        try:
            watch.connect()
        except HypervisorUnreachable as exc:
            if not keep_trying:
                raise
            LOG.warning("event=domain_watch_failed uri=%s reason=%s: no lifecycle events "
                        "from it until it answers", display_uri(uri), exc)
            watch.reconnect_in_background()
        with self._watch_lock:
            self._watches[id(watch)] = watch

        def stop() -> None:
            with self._watch_lock:
                self._watches.pop(id(watch), None)
            watch.stop()

        return stop


class _Watch:
    """One :meth:`LibvirtHypervisor.watch_domains`: its connection, callbacks and reconnects."""

    def __init__(self, hv: LibvirtHypervisor, uri: str,
                 on_event: Callable[[DomainEvent], None]) -> None:
        self._hv = hv
        self._lv = hv._libvirt
        self._uri = uri
        self._shown = display_uri(uri)
        self._on_event = on_event
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._conn: Any = None
        self._callback: int | None = None
        self.reconnects = 0  # connections opened again after a loss (logged)

    def connect(self) -> None:
        """Open the watch's connection and register its callbacks (HypervisorError)."""
        conn = self._hv.open(self._uri)
        try:
            with translate_libvirt_errors(f"watch domains on {self._shown}"):
                callback = conn.domainEventRegisterAny(
                    None, self._lv.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._lifecycle, None)
                conn.registerCloseCallback(self._closed, None)
        except HypervisorError:
            with contextlib.suppress(Exception):
                conn.close()
            raise
        with self._lock:
            if not self._stopped.is_set():
                self._conn, self._callback = conn, callback
                return
        self._release(conn, callback)  # ended while we connected

    def _lifecycle(self, _conn: Any, dom: Any, event: int, detail: int, _opaque: object) -> None:
        found = domain_state(self._lv, event, detail)
        if found is None:
            return
        try:
            self._on_event(DomainEvent(self._uri, str(dom.name()), found[0], found[1]))
        except Exception:  # never let one watcher's bug stop the process's event loop
            LOG.exception("event=domain_event_handler_failed uri=%s", self._shown)

    def _closed(self, conn: Any, reason: int, _opaque: object) -> None:
        """The connection broke (the event loop's thread: reconnect on another one)."""
        with self._lock:
            if self._stopped.is_set() or conn is not self._conn:
                return
            self._conn = None
        LOG.warning("event=domain_watch_lost uri=%s reason=%d: no lifecycle events from it "
                    "until it is reconnected", self._shown, reason)
        self.reconnect_in_background()

    def reconnect_in_background(self) -> None:
        """Open the connection again on a thread of its own, with backoff, until it opens or
        the watch ends."""
        threading.Thread(target=self._reconnect, name="libvirt-watch-reconnect",
                         daemon=True).start()

    def _reconnect(self) -> None:
        wait, longest = WATCH_RETRY_S
        while not self._stopped.wait(wait):
            try:
                self.connect()
            except HypervisorError as exc:
                LOG.warning("event=domain_watch_reconnect_failed uri=%s retry_in=%.0f "
                            "reason=%s", self._shown, min(wait * 2, longest), exc)
                wait = min(wait * 2, longest)
                continue
            self.reconnects += 1
            LOG.warning("event=domain_watch_restored uri=%s reconnects=%d: events of the gap "
                        "are lost", self._shown, self.reconnects)
            return

    def stop(self) -> None:
        """End the watch (twice is fine); a reconnect in progress gives up."""
        with self._lock:
            self._stopped.set()
            conn, callback, self._conn = self._conn, self._callback, None
        if conn is not None and callback is not None:
            self._release(conn, callback)

    @staticmethod
    def _release(conn: Any, callback: int) -> None:
        with contextlib.suppress(Exception):
            conn.domainEventDeregisterAny(callback)
        with contextlib.suppress(Exception):
            conn.unregisterCloseCallback()
        with contextlib.suppress(Exception):
            conn.close()
