"""Client library: the patent's flow over HTTP, following the fleet map transparently.

* :class:`CoordinatorClient` asks the (active) coordinator for targets and grants, watches the
  map (long poll), reports failures and carries operator requests. Standbys answer 503
  ``not_active`` naming the active coordinator; the client follows them.
* :class:`FleetClient` puts (streamed, never fully buffered) to the writer with the readers'
  addresses, reads from the in-sync readers (then the writer), and lists, stats, deletes,
  renames and makes directories. A 409 (stale epoch, not the writer), an expired grant, a 503
  or an unreachable node makes it fetch the newer map and retry, within ``RetryPolicy.timeout``.
  Failures it sees at a node are reported to the coordinator (client-side detection).

Both talk HTTP through :class:`orchestrator.transport.Transport`, which the coordinator's
AgentControl adapter (:class:`orchestrator.adapters.agent_control.HttpAgentControl`) rides
too.

A write whose request may have reached the writer before the connection broke is never
resent blindly: it raises :class:`RequestOutcomeUnknown`. One that was refused before being
sent (connection refused) or answered with an error is safe to retry and is.
"""

from __future__ import annotations

import http.client
import io
import itertools
import json
import logging
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

from agents.core.protocol import (
    AUTH_HEADER,
    BEARER,
    READERS_HEADER,
    SEQ_HEADER,
    MkdirRequest,
    PutRequest,
    ReaderAddress,
    RenameRequest,
    format_readers,
)
from agents.errors import (
    AgentError,
    CatchingUp,
    Conflict,
    GrantRejected,
    NotFound,
    RbdfleetError,
)
from orchestrator.core.clients import client_token
from orchestrator.core.fleetmap import Target
from orchestrator.errors import (
    AgentUnreachable,
    CoordinationFailed,
    NotActiveError,
    RequestOutcomeUnknown,
    StreamCut,
    Superseded,
)
from orchestrator.transport import CHUNK, Cancel, Response, Transport

LOG = logging.getLogger(__name__)


class Writable(Protocol):
    """Where a streamed get writes (a file, a pipe)."""

    def write(self, data: bytes, /) -> int: ...


class _SinkFailed(Exception):
    """Writing to a get's sink failed (disk full, closed pipe): carried past the transport's
    network-error mapping, then re-raised as the OSError it is."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


# -- coordinator client -----------------------------------------------------------------------


@dataclass(frozen=True)
class Targets:
    """An answer to a write or read request: epoch, revision and the ordered targets."""

    epoch: int
    revision: int
    ordered: tuple[Target, ...]

    @property
    def readers(self) -> tuple[Target, ...]:
        """The reader-labelled targets."""
        return tuple(t for t in self.ordered if t.role == "reader")


class CoordinatorClient:
    """Talks to whichever of ``urls`` is the fleet's active coordinator."""

    def __init__(
        self,
        urls: list[str],
        fleet: str,
        secret: bytes | None,
        *,
        client: str = "admin",
        transport: Transport | None = None,
        timeout: float = 5.0,
        wall: Callable[[], float] = time.time,
    ) -> None:
        """``client``/``secret``: this client's credential (``rbdfleet client add``); None
        when only the unauthenticated map is asked for (deploy, inventory)."""
        if not urls:
            raise ValueError("at least one coordinator URL is needed")
        self.urls = list(urls)
        self.fleet = fleet
        self.client = client
        self._secret = secret
        self.transport = transport or Transport()
        self.timeout = timeout
        self.wall = wall

    def call(
        self,
        method: str,
        route: str,
        payload: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """One request to the active coordinator, following ``not_active`` answers."""
        errors: dict[str, str] = {}  # url -> why it did not answer
        tried: set[str] = set()
        queue = list(self.urls)
        while queue:
            url = queue.pop(0)
            if url in tried:
                continue
            tried.add(url)
            headers = {"Content-Type": "application/json"}
            if self._secret is not None:
                headers[AUTH_HEADER] = BEARER + client_token(
                    self.fleet, self.client, self._secret, self.wall())
            body = None if payload is None else json.dumps(payload).encode()
            try:
                resp = self.transport.request(
                    "coordinator",
                    url,
                    method,
                    route,
                    headers=headers,
                    body=body,
                    timeout=timeout or self.timeout,
                )
            except NotActiveError as exc:
                active = exc.fields.get("coordinator")
                errors[url] = "standby"
                if isinstance(active, str) and active not in tried:
                    queue.insert(0, active)
                continue
            except RequestOutcomeUnknown:
                raise
            except AgentUnreachable as exc:
                # the cause alone: the error raised below names the coordinator already
                errors[url] = str(exc.__cause__ or exc)
                continue
            if url != self.urls[0]:
                self.urls.remove(url) if url in self.urls else None
                self.urls.insert(0, url)
            return resp.body
        why = "; ".join(f"{url}: {reason}" for url, reason in errors.items())
        if len(errors) == 1:
            why = next(iter(errors.values()))
        raise AgentUnreachable("coordinator", ",".join(self.urls), why)

    def targets(self, kind: str, path: str) -> Targets:
        """Grants and addresses for a ``write`` or a ``read`` of ``path``."""
        body = self.call("POST", f"/v1/fleets/{self.fleet}/{kind}", {"path": path})
        return Targets(
            int(body["epoch"]),
            int(body["revision"]),
            tuple(Target.from_json(t) for t in body["ordered"]),
        )

    def map(self, after: int = -1, wait: float = 0.0) -> dict[str, Any]:
        """The fleet map as JSON; with ``wait``, once its revision exceeds ``after``."""
        route = f"/v1/fleets/{self.fleet}/map?after={after}&wait={wait}"
        body = self.call("GET", route, None, timeout=self.timeout + wait)
        return dict(body["map"])

    def report(self, node: str, reason: str) -> None:
        """Tell the coordinator a node failed a request (best effort)."""
        try:
            self.call(
                "POST",
                f"/v1/fleets/{self.fleet}/report",
                {"node": node, "reason": reason[:500], "reporter": "client"},
            )
        except RbdfleetError as exc:
            LOG.warning("event=report_failed node=%s reason=%s", node, exc)

    def failover(self, to: str | None) -> dict[str, Any]:
        """Operator: move the write grant (fence first); returns the new map."""
        return dict(
            self.call("POST", f"/v1/fleets/{self.fleet}/failover", {"to": to}, timeout=60)["map"]
        )

    def fence(self, node: str) -> dict[str, Any]:
        """Operator: fence ``node``; returns the new map."""
        return dict(
            self.call("POST", f"/v1/fleets/{self.fleet}/fence", {"node": node}, timeout=60)["map"]
        )

    def status(self) -> dict[str, Any]:
        """``/v1/status`` of the active coordinator (all its fleets)."""
        return dict(self.call("GET", "/v1/status"))


# -- fleet client -----------------------------------------------------------------------------


@dataclass
class RetryPolicy:
    """Retry follows the map until ``timeout``; ``sleep`` and ``clock`` are injectable."""

    timeout: float = 30.0
    backoff: float = 0.05
    max_backoff: float = 0.5
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    retryable: tuple[type[BaseException], ...] = field(
        default=(
            Conflict,
            GrantRejected,
            CatchingUp,
            AgentUnreachable,
            NotActiveError,
            CoordinationFailed,
        )
    )

    def attempts(self, wait: Callable[[float], None] | None = None) -> Iterator[int]:
        """Yields attempt numbers, waiting between them, until the timeout passes.

        ``wait(delay)`` replaces the sleep: a client waits on the map instead (it returns as
        soon as a newer map is published).
        """
        deadline = self.clock() + self.timeout
        delay = self.backoff
        n = 0
        while True:
            yield n
            n += 1
            if self.clock() + delay > deadline:
                return
            (wait or self.sleep)(delay)
            delay = min(delay * 2, self.max_backoff)


@dataclass(frozen=True)
class WriteResult:
    """What the writer acknowledged."""

    node: str
    epoch: int
    seq: int
    body: dict[str, Any]


def _quote(path: str) -> str:
    return urllib.parse.quote(path.lstrip("/"), safe="/")


def _writer_headers(writer: Target, readers: tuple[ReaderAddress, ...]) -> dict[str, str]:
    """The grant, and the readers the writer must push to (when there are any)."""
    headers = {AUTH_HEADER: BEARER + writer.grant}
    if readers:
        headers[READERS_HEADER] = format_readers(readers)
    return headers


SendWrite = Callable[[Target, tuple[ReaderAddress, ...], Cancel], Response]


@dataclass
class _Flight:
    """One write in flight, as the :class:`_WriterWatch` follows it."""

    epoch: int
    revision: int
    writer: str
    cancel: Cancel
    started: float


class _WriterWatch:
    """One thread per client: while some write has been in flight for ``after`` seconds, it
    long-polls the coordinator's map and abandons the writes whose writer the map no longer
    names (a new epoch, or a failover under way: the writer they went to is being fenced), so
    the client resends them at once instead of waiting out its I/O timeout on a silent writer.
    """

    def __init__(self, coordinator: CoordinatorClient, after: float, clock: Callable[[], float],
                 poll: float = 2.0) -> None:
        self._coordinator = coordinator
        self._after = after
        self._clock = clock
        self._poll = poll
        self._cond = threading.Condition()
        self._flights: dict[int, _Flight] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    def start(self, targets: Targets, writer: Target) -> tuple[int, Cancel]:
        """Follow a write sent to ``writer`` under ``targets``' map; (key, its Cancel)."""
        flight = _Flight(targets.epoch, targets.revision, writer.node, Cancel(), self._clock())
        with self._cond:
            key = next(self._ids)
            self._flights[key] = flight
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="writer-watch",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()
        return key, flight.cancel

    def done(self, key: int) -> None:
        """The write ended (whatever its outcome)."""
        with self._cond:
            self._flights.pop(key, None)

    def _run(self) -> None:
        while True:
            with self._cond:
                now = self._clock()
                due = [f for f in self._flights.values() if now - f.started >= self._after]
                if not due:
                    waits = [f.started + self._after - now for f in self._flights.values()]
                    self._cond.wait(min(waits, default=self._poll))
                    continue
                revision = min(f.revision for f in due)
            try:
                m = self._coordinator.map(after=revision, wait=self._poll)
            except RbdfleetError:
                time.sleep(0.2)
                continue
            epoch, writer, revision = int(m["epoch"]), m.get("writer"), int(m["revision"])
            with self._cond:
                for f in self._flights.values():
                    if revision <= f.revision:
                        continue
                    if epoch > f.epoch or writer != f.writer or m.get("phase") == "failover":
                        f.cancel.cancel(f"the map moved on (epoch {epoch}, writer {writer})")
                    else:
                        f.revision = revision


class FleetClient:
    """put/get/ls/stat/rm/mv/mkdir through the fleet, following the map.

    ``abandon_after``: a write still in flight after that many seconds is watched, and
    abandoned as soon as the map names another writer (None: wait for ``io_timeout``).
    """

    def __init__(
        self,
        coordinator: CoordinatorClient,
        *,
        retry: RetryPolicy | None = None,
        transport: Transport | None = None,
        io_timeout: float = 30.0,
        abandon_after: float | None = 0.5,
    ) -> None:
        self.coordinator = coordinator
        self.retry = retry or RetryPolicy()
        self.transport = transport or coordinator.transport
        self.io_timeout = io_timeout
        self._watch = (None if abandon_after is None
                       else _WriterWatch(coordinator, abandon_after, self.retry.clock))

    # -- writes ----------------------------------------------------------------------------

    def _write(self, path: str, send: SendWrite) -> WriteResult:
        last: BaseException | None = None
        seen = [-1]  # revision of the map the last attempt used
        # An attempt whose outcome is unknown (the writer lost its device, was demoted mid-wait,
        # could not get a lagging reader out of the map, or was abandoned as superseded): the
        # write is resent at the new writer, but if that does not succeed the caller must hear
        # "unknown", not the later attempt's definite-sounding refusal (a resent delete's 404).
        unknown: list[str] = []
        moved = [False]  # the watch abandoned the last attempt: it saw a newer map already

        def unknown_outcome(exc: BaseException, node: str, address: str) -> BaseException:
            if not unknown or isinstance(exc, RequestOutcomeUnknown):
                return exc
            return RequestOutcomeUnknown(node, address, f"an earlier attempt's outcome is "
                                         f"unknown ({unknown[0]}); then: {exc}")

        def wait_for_newer_map(delay: float) -> None:
            if moved[0]:  # no wait, no long poll: the new writer's targets at once
                moved[0] = False
                return
            if seen[0] < 0:
                self.retry.sleep(delay)
                return
            try:
                self.coordinator.map(after=seen[0], wait=delay)
            except RbdfleetError:
                self.retry.sleep(delay)

        for _ in self.retry.attempts(wait_for_newer_map):
            try:
                targets = self.coordinator.targets("write", path)
            except self.retry.retryable as exc:
                last = exc
                continue
            seen[0] = targets.revision
            writer = targets.ordered[0]
            readers = tuple(ReaderAddress(t.node, t.address) for t in targets.readers)
            key, cancel = self._watch.start(targets, writer) if self._watch else (-1, Cancel())
            try:
                resp = send(writer, readers, cancel)
            except Superseded as exc:
                unknown.append(str(exc))
                last = exc  # resent at the writer the new map names
                moved[0] = True
                continue
            except RequestOutcomeUnknown as exc:
                self.coordinator.report(writer.node, str(exc))
                raise
            except AgentUnreachable as exc:
                self.coordinator.report(writer.node, str(exc))
                last = exc
                continue
            except self.retry.retryable as exc:
                if isinstance(exc, AgentError) and exc.fields.get("outcome") == "unknown":
                    unknown.append(f"{exc.code}: {exc.message}")
                last = exc  # 409 / 401 / 503: the map moved on; fetch it again
                continue
            except AgentError as exc:
                if exc.fields.get("outcome") == "unknown":
                    unknown.append(f"{exc.code}: {exc.message}")
                raise unknown_outcome(exc, writer.node, writer.address) from exc
            finally:
                if self._watch is not None:
                    self._watch.done(key)
            body = resp.body if isinstance(resp.body, dict) else {}
            return WriteResult(
                writer.node, int(body.get("epoch", targets.epoch)), int(body.get("seq", -1)), body
            )
        assert last is not None
        if isinstance(last, Superseded):  # the timeout ran out resending it
            raise RequestOutcomeUnknown(last.node, last.address, str(last)) from last
        raise unknown_outcome(last, "-", "-") from last

    def put(
        self,
        source: IO[bytes],
        remote: str,
        size: int,
        *,
        progress: Callable[[int], None] | None = None,
    ) -> WriteResult:
        """Stream ``size`` bytes from ``source`` (seekable) to ``remote`` on the writer."""
        start = source.tell()

        def send(writer: Target, readers: tuple[ReaderAddress, ...], cancel: Cancel) -> Response:
            source.seek(start)
            headers = PutRequest(grant=writer.grant, size=size, readers=readers).to_headers()
            body = _Progress(source, progress) if progress else source
            return self.transport.request(
                writer.node,
                writer.address,
                "PUT",
                f"/v1/files/{_quote(remote)}",
                headers=headers,
                body=body,
                timeout=self.io_timeout,
                cancel=cancel,
            )

        return self._write(remote, send)

    def put_bytes(self, data: bytes, remote: str) -> WriteResult:
        """Put a small in-memory value."""
        return self.put(io.BytesIO(data), remote, len(data))

    def delete(self, remote: str) -> WriteResult:
        """Remove a file or an empty directory."""

        def send(writer: Target, readers: tuple[ReaderAddress, ...], cancel: Cancel) -> Response:
            return self.transport.request(
                writer.node,
                writer.address,
                "DELETE",
                f"/v1/files/{_quote(remote)}",
                headers=_writer_headers(writer, readers),
                timeout=self.io_timeout,
                cancel=cancel,
            )

        return self._write(remote, send)

    def _post_json(self, route: str, payload: bytes) -> SendWrite:
        def send(writer: Target, readers: tuple[ReaderAddress, ...], cancel: Cancel) -> Response:
            headers = {**_writer_headers(writer, readers), "Content-Type": "application/json"}
            return self.transport.request(
                writer.node,
                writer.address,
                "POST",
                route,
                headers=headers,
                body=payload,
                timeout=self.io_timeout,
                cancel=cancel,
            )

        return send

    def mkdir(self, remote: str, parents: bool = False) -> WriteResult:
        """Make a directory."""
        return self._write(
            remote, self._post_json("/v1/mkdir", MkdirRequest(remote, parents).encode())
        )

    def rename(self, src: str, dst: str) -> WriteResult:
        """Rename ``src`` to ``dst``."""
        return self._write(src, self._post_json("/v1/rename", RenameRequest(src, dst).encode()))

    # -- reads -----------------------------------------------------------------------------

    def _agent_get(
        self,
        target: Target,
        route: str,
        consume: Callable[[http.client.HTTPResponse], None] | None = None,
    ) -> Response:
        """GET ``route`` from ``target`` with its grant; ``consume`` streams the body."""
        return self.transport.request(
            target.node,
            target.address,
            "GET",
            route,
            headers={AUTH_HEADER: BEARER + target.grant},
            timeout=self.io_timeout,
            sink=consume,
        )

    def _read(self, path: str, call: Callable[[Target], Any]) -> Any:
        last: BaseException | None = None
        for _ in self.retry.attempts():
            try:
                targets = self.coordinator.targets("read", path)
            except self.retry.retryable as exc:
                last = exc
                continue
            for target in targets.ordered:
                try:
                    return call(target)
                except (NotFound, StreamCut):
                    raise
                except AgentUnreachable as exc:
                    self.coordinator.report(target.node, str(exc))
                    last = exc
                except (AgentError, RbdfleetError) as exc:
                    if not isinstance(exc, self.retry.retryable):
                        if isinstance(exc, AgentError) and exc.status < 500:
                            raise
                        self.coordinator.report(target.node, str(exc))
                    last = exc
            if last is None:
                last = CoordinationFailed(f"no reader for fleet {self.coordinator.fleet}")
        assert last is not None
        raise last

    def get(
        self, remote: str, sink: IO[bytes], *, progress: Callable[[int], None] | None = None
    ) -> int:
        """Stream ``remote`` into ``sink`` (seekable: a retry rewrites it); returns the size."""
        start = sink.tell()

        def restart(failed: Target | None, written: int) -> None:
            sink.seek(start)
            sink.truncate()

        return self._stream(remote, sink, restart, progress)

    def get_stream(
        self, remote: str, sink: Writable, *, progress: Callable[[int], None] | None = None
    ) -> int:
        """Stream ``remote`` into a ``sink`` that cannot rewind (a pipe, stdout); returns the
        size. Another reader is tried only while nothing has been written: a reader failing
        mid-body raises :class:`StreamCut` (what was written is incomplete)."""

        def restart(failed: Target | None, written: int) -> None:
            if written and failed is not None:
                raise StreamCut(
                    failed.node,
                    failed.address,
                    f"failed after {written} bytes of {remote} were written to an output "
                    "that cannot be rewound: the output is incomplete",
                )

        return self._stream(remote, sink, restart, progress)

    def _stream(
        self,
        remote: str,
        sink: Writable,
        restart: Callable[[Target | None, int], None],
        progress: Callable[[int], None] | None,
    ) -> int:
        """One read of ``remote`` into ``sink``; ``restart(failed target, bytes written)`` runs
        before every attempt to undo a failed one's partial output (or refuse to)."""
        last: list[Target | None] = [None]
        got = [0]

        def call(target: Target) -> int:
            restart(last[0], got[0])
            last[0] = target
            got[0] = 0

            def consume(resp: http.client.HTTPResponse) -> None:
                while True:
                    chunk = resp.read(CHUNK)
                    if not chunk:
                        break
                    try:
                        sink.write(chunk)
                    except OSError as exc:  # not the reader's fault: neither report nor retry
                        raise _SinkFailed(exc) from exc
                    got[0] += len(chunk)
                    if progress:
                        progress(len(chunk))
                expected = resp.getheader("Content-Length")
                if expected is not None and int(expected) != got[0]:
                    raise AgentUnreachable(target.node, target.address, "body cut short")

            self._agent_get(target, f"/v1/files/{_quote(remote)}", consume)
            return got[0]

        try:
            return int(self._read(remote, call))
        except _SinkFailed as exc:
            raise exc.error from None

    def get_bytes(self, remote: str) -> bytes:
        """A whole (small) file in memory."""
        buf = io.BytesIO()
        self.get(remote, buf)
        return buf.getvalue()

    def get_with_version(self, remote: str) -> tuple[bytes, int, str]:
        """(content, version, node that served it) of a small file."""
        def call(target: Target) -> tuple[bytes, int, str]:
            buf = io.BytesIO()
            version = [-1]

            def consume(resp: http.client.HTTPResponse) -> None:
                buf.write(resp.read())
                version[0] = int(resp.getheader(SEQ_HEADER) or -1)

            self._agent_get(target, f"/v1/files/{_quote(remote)}", consume)
            return buf.getvalue(), version[0], target.node

        result: tuple[bytes, int, str] = self._read(remote, call)
        return result

    def _get_json(self, route: str, path: str) -> Any:
        def call(target: Target) -> Any:
            return self._agent_get(target, route).body

        return self._read(path, call)

    def ls(self, remote: str = "/", *, limit: int | None = None,
           after: str | None = None) -> dict[str, Any]:
        """One page of the directory listing (``ListResponse`` JSON): up to ``limit`` entries
        (the agent's default page when None) whose names sort after ``after``; its ``next``
        is the ``after`` of the following page (None on the last)."""
        route = "/v1/list" if remote.strip("/") == "" else f"/v1/list/{_quote(remote)}"
        query = {k: str(v) for k, v in (("limit", limit), ("after", after)) if v is not None}
        if query:
            route += "?" + urllib.parse.urlencode(query, quote_via=urllib.parse.quote)
        return dict(self._get_json(route, remote))

    def ls_pages(self, remote: str = "/", *, limit: int | None = None,
                 after: str | None = None) -> Iterator[dict[str, Any]]:
        """Every page of the listing from ``after`` on, in order (each may come from another
        reader: the cursor is a name, so no entry repeats and none that existed throughout
        is skipped)."""
        while True:
            page = self.ls(remote, limit=limit, after=after)
            yield page
            after = page.get("next")
            if after is None:
                return

    def stat(self, remote: str) -> dict[str, Any]:
        """One entry (``EntryInfo`` JSON)."""
        return dict(self._get_json(f"/v1/stat/{_quote(remote)}", remote))


class _Progress:
    """A file wrapper that reports how many bytes were read (for progress bars)."""

    def __init__(self, source: IO[bytes], progress: Callable[[int], None]) -> None:
        self.source = source
        self.progress = progress

    def read(self, n: int = -1) -> bytes:
        data = self.source.read(n)
        if data:
            self.progress(len(data))
        return data


__all__ = [
    "CoordinatorClient",
    "FleetClient",
    "RetryPolicy",
    "Target",
    "Targets",
    "WriteResult",
]
