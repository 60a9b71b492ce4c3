"""The error tree shared by agents and orchestrator (the bottom of the import graph).

::

    RbdfleetError
    ├── BindingUnavailable(module, package)   a Python binding (rados, rbd, libvirt) is missing
    ├── ConfigError(key, reason)              a setting is wrong (the agent's or rbdfleet.toml)
    ├── JsonLimit                             bounded JSON refused (each caller translates it)
    └── AgentError                            carries a wire code and an HTTP status
        ├── BadRequest          400           DecodeError, UnsupportedVersion, BadPath,
        │                                     BadHttp (the HTTP layer's own status),
        │                                     UnsupportedTransferEncoding (501)
        ├── GrantRejected       401/403       BadSignature, GrantExpired, ForeignGrant
        ├── Conflict            409           StaleEpoch, NotWriter
        ├── NotFound            404
        ├── TooLarge            413
        ├── CatchingUp          503
        ├── LagNotReported      503           a write not acknowledged: a dropped reader
        │                                     is not out of the map yet (outcome unknown)
        ├── TooBusy             503           every connection slot of the agent is taken
        ├── NotActiveCoordinator 503          a standby coordinator (``coordinator``: the
        │                                     active one's URL)
        ├── FormatError         500           BadMagic, UnsupportedFormat, ChecksumMismatch,
        │                                     TornRecord, CorruptMetadata
        └── DeviceError(op, errno)  500       EIO / EPERM: where a fenced writer stops

Agent errors cross the wire as JSON ``{"error": code, "message": ..., **fields}``;
:func:`error_from_wire` turns such a body back into the same class.
"""

from __future__ import annotations

from typing import Any, ClassVar


class RbdfleetError(Exception):
    """Root of every error rbdfleet raises on purpose."""


class BindingUnavailable(RbdfleetError):
    """A Python binding that comes from a Debian package is not importable."""

    def __init__(self, module: str, package: str) -> None:
        super().__init__(
            f"Python module {module!r} is not importable: install the Debian package "
            f"{package!r} (apt-get install {package}) and use a venv made with "
            f"--system-site-packages"
        )
        self.module = module
        self.package = package


class ConfigError(RbdfleetError):
    """A setting is wrong: ``key`` names it, ``reason`` says why. One class for the agent's
    config and the orchestrator's (``orchestrator.errors`` re-exports it)."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"config {key}: {reason}")
        self.key = key
        self.reason = reason


class JsonLimit(RbdfleetError, ValueError):
    """The text is not JSON, or is JSON beyond the bounds (agents.core.boundedjson). Never sent
    as is: each caller turns it into its own error (DecodeError for a request, a FormatError for
    an image); a ValueError too, like what ``json.loads`` raises."""


_REGISTRY: dict[str, type[AgentError]] = {}


class AgentError(RbdfleetError):
    """An error with a wire code and an HTTP status; ``fields`` travel with it."""

    code: ClassVar[str] = "agent_error"
    status: ClassVar[int] = 500

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _REGISTRY[cls.code] = cls

    def to_wire(self) -> dict[str, Any]:
        """The JSON body sent for this error."""
        return {"error": self.code, "message": self.message, **self.fields}


_REGISTRY[AgentError.code] = AgentError


def error_from_wire(body: dict[str, Any], status: int = 500) -> AgentError:
    """Rebuild the error an agent or coordinator sent; unknown codes become AgentError."""
    fields = {k: v for k, v in body.items() if k not in ("error", "message")}
    cls = _REGISTRY.get(str(body.get("error")), AgentError)
    err = cls.__new__(cls)
    AgentError.__init__(err, str(body.get("message", "")), **fields)
    if cls is AgentError:
        err.fields.setdefault("status", status)
    return err


class BadRequest(AgentError):
    code = "bad_request"
    status = 400


class DecodeError(BadRequest):
    code = "decode_error"


class UnsupportedVersion(BadRequest):
    code = "unsupported_version"


class BadPath(BadRequest):
    code = "bad_path"


class GrantRejected(AgentError):
    code = "grant_rejected"
    status = 403


class BadSignature(GrantRejected):
    code = "bad_signature"
    status = 401


class GrantExpired(GrantRejected):
    code = "grant_expired"
    status = 401


class ForeignGrant(GrantRejected):
    """A valid grant for another fleet, node or role."""

    code = "foreign_grant"
    status = 403


class Conflict(AgentError):
    code = "conflict"
    status = 409


class StaleEpoch(Conflict):
    code = "stale_epoch"


class NotWriter(Conflict):
    code = "not_writer"


class AlreadyExists(Conflict):
    code = "already_exists"


class NotFound(AgentError):
    code = "not_found"
    status = 404


class TooLarge(AgentError):
    code = "too_large"
    status = 413


class NoSpace(AgentError):
    code = "no_space"
    status = 507


class CatchingUp(AgentError):
    code = "catching_up"
    status = 503


class LagNotReported(AgentError):
    """The writer dropped a reader it could not reach, but could not yet get the coordinator to
    stop handing that reader out: the write is durable, yet acknowledging it could send
    another client to a reader without it (outcome unknown)."""

    code = "lag_not_reported"
    status = 503


class FormatError(AgentError):
    code = "format_error"
    status = 500


class BadMagic(FormatError):
    code = "bad_magic"


class UnsupportedFormat(FormatError):
    code = "unsupported_format"


class ChecksumMismatch(FormatError):
    code = "checksum_mismatch"


class TornRecord(FormatError):
    code = "torn_record"


class DeviceError(AgentError):
    """An I/O error from the backend: EIO after a fence, EPERM/EROFS on a read-only disk."""

    code = "device_error"
    status = 500


class IllegalTransition(Conflict):
    """A role change the agent's state machine refuses (names the state and the event)."""

    code = "illegal_transition"


# Storage engine (agents.follower, agents.committer, agents.volume): additive, owned by the
# storage engine.


class NotEmpty(Conflict):
    """A directory that still has entries cannot be deleted or replaced."""

    code = "not_empty"


class WrongKind(Conflict):
    """The path exists but is a directory where a file is needed, or the reverse."""

    code = "wrong_kind"


class SequenceGap(CatchingUp):
    """A pushed record does not follow the last applied one (fields: applied, got)."""

    code = "sequence_gap"


class JournalWrapped(CatchingUp):
    """The records asked for were overwritten by the circular journal: reload the checkpoint."""

    code = "journal_wrapped"


# Agent HTTP layer (agents.server): additive.


class MethodNotAllowed(BadRequest):
    """The route exists but not for this HTTP method."""

    code = "method_not_allowed"
    status = 405


class RangeNotSatisfiable(BadRequest):
    """A Range header outside the file (fields: size)."""

    code = "range_not_satisfiable"
    status = 416


class BadHttp(BadRequest):
    """A request the HTTP layer could not parse (request line, header block); answered with
    the status the HTTP layer chose (400, 414, 431, 501, 505)."""

    code = "bad_http"


class UnsupportedTransferEncoding(BadRequest):
    """A request with ``Transfer-Encoding``: bodies need a Content-Length; the connection is
    closed (the body's framing is unknown, it must never be read as the next request)."""

    code = "unsupported_transfer_encoding"
    status = 501


class TooBusy(AgentError):
    """Every connection slot is taken (fields: limit); retry later."""

    code = "too_busy"
    status = 503


# On-disk codecs (agents.core): additive.


class CorruptMetadata(FormatError):
    """A structure on the image decodes to nonsense although its checksum matches (or has
    none to match): lengths past the device or region, bad geometry, wrong types, a body that
    inflates beyond its bound. The image is refused, never half-trusted."""

    code = "corrupt_metadata"


class OverlappingExtents(FormatError):
    """Two live structures claim the same bytes (found while rebuilding the allocator)."""

    code = "overlapping_extents"


# B-tree transactions (agents.core.btree): additive.


class TxnStateError(Conflict):
    """A transaction used after its commit, or changed while one of its ranges iterates."""

    code = "txn_state"


# Agent HTTP layer (agents.server), continued.


class PeerCertificateRequired(GrantRejected):
    """A node-only route (push, promote, demote, readers) reached without a fleet
    certificate: mutual TLS proves the caller is a node of the fleet, the grant what for."""

    code = "peer_cert_required"
    status = 403


class InternalError(AgentError):
    """A bug: logged with its traceback, answered 500 without details."""

    code = "internal_error"
    status = 500


# Agent peers (agents.peers).


class NotActiveCoordinator(AgentError):
    """A standby coordinator's answer: ``coordinator`` names the active one's URL."""

    code = "not_active"
    status = 503


class PeerUnreachable(AgentError):
    """A peer (reader, coordinator) did not answer: refused, reset, timed out, bad TLS."""

    code = "peer_unreachable"
    status = 502
