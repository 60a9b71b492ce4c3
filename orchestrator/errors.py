"""The orchestrator's errors, under :class:`agents.errors.RbdfleetError`.

::

    ConfigError(key, reason)           agents.errors.ConfigError, shared with the agents
    OrchestratorError
    ├── PkiError                       the fleet CA, a node certificate or key
    ├── SandboxError                   sandbox up/down could not proceed
    ├── StorageError                   Ceph: ImageNotFound, ImageExists, ImageBusy, LeaseLost,
    │                                  StaleMap
    ├── HypervisorError                libvirt: DomainNotFound, DeviceAttachError,
    │                                  HypervisorUnreachable(uri)
    ├── RemoteError(host)              SSH: HostUnreachable, HostKeyMismatch, UnsafeTarget,
    │                                  RemoteCommandFailed(rc)
    ├── DeployError(results)
    ├── AgentUnreachable(node, address) StreamCut, RequestOutcomeUnknown (a write may or may
    │                                  not have happened), Superseded
    ├── CoordinationError              NoEligibleWriter, FencingFailed, NotActive(fleet,
    │                                  coordinator), IllegalFleetTransition(subject, from_, to),
    │                                  RoleSwitchFailed, NoSpareProvisioner,
    │                                  UpgradeRefused, UpgradeStalled(node)
    └── ReportReplayed(node)           an agent's report sent again (core/reports.py),
                                       ReportOutOfOrder (overtaken by a newer one)

The coordinator's answers on the wire are AgentErrors (a code and an HTTP status, rebuilt
by the client with ``error_from_wire``): NotActiveError 503, RefusedTransition 409,
CoordinationFailed 503, ReplayedReport 409, StaleReport 409, LengthRequired 411,
PeerCertificateMismatch 403.
"""

from __future__ import annotations

from typing import Any

from agents.errors import AgentError, ForeignGrant, NotActiveCoordinator, RbdfleetError
from agents.errors import ConfigError as ConfigError


class OrchestratorError(RbdfleetError):
    """Root of the orchestrator's errors."""


class AdapterChosenPoorly(OrchestratorError):
    """An adapter lacks a guarantee (``Characteristics``) the use case it was given to needs."""


class PkiError(OrchestratorError):
    """A certificate or key is missing, unreadable, expired or not issued by the fleet CA."""


class SandboxError(OrchestratorError):
    """The sandbox could not be brought up or down; the message says what to do."""


class StorageError(OrchestratorError):
    """An error from Ceph, translated once in the Ceph adapter."""


class ImageNotFound(StorageError):
    pass


class ImageExists(StorageError):
    pass


class ImageBusy(StorageError):
    pass


class LeaseLost(StorageError):
    pass


class StaleMap(StorageError):
    """A guarded write found another revision stored than the one expected (nothing written)."""

    def __init__(self, message: str, expected: int | None, found: int | None) -> None:
        super().__init__(message)
        self.expected = expected
        self.found = found


class HypervisorError(OrchestratorError):
    """An error from libvirt, translated once in the libvirt adapter."""


class DomainNotFound(HypervisorError):
    pass


class HypervisorUnreachable(HypervisorError):
    """No connection to the hypervisor at ``uri`` (shown without credentials): it refused or
    never answered, its host key or our key was refused, or the connection broke."""

    def __init__(self, uri: str, message: str) -> None:
        super().__init__(f"hypervisor {uri} unreachable: {message}")
        self.uri = uri


class DeviceAttachError(HypervisorError):
    pass


class DetachPending(DeviceAttachError):
    """The disk left the domain's persistent config, but the running (or paused) guest has
    not released it yet: a live detach is an unplug request only a running guest completes."""

    def __init__(self, message: str, domain: str) -> None:
        super().__init__(message)
        self.domain = domain


class RemoteError(OrchestratorError):
    def __init__(self, host: str, message: str) -> None:
        super().__init__(f"{host}: {message}")
        self.host = host


class HostUnreachable(RemoteError):
    pass


class HostKeyMismatch(RemoteError):
    pass


class UnsafeTarget(RemoteError):
    """The address is neither loopback nor behind a local bridge: we refuse to connect."""


class RemoteCommandFailed(RemoteError):
    def __init__(self, host: str, message: str, rc: int) -> None:
        super().__init__(host, message)
        self.rc = rc


class DeployError(OrchestratorError):
    def __init__(self, message: str, results: dict[str, Any]) -> None:
        super().__init__(message)
        self.results = results


class AgentUnreachable(OrchestratorError):
    def __init__(self, node: str, address: str, reason: str = "") -> None:
        super().__init__(f"agent {node} at {address} unreachable{': ' + reason if reason else ''}")
        self.node = node
        self.address = address


class StreamCut(AgentUnreachable):
    """A reader failed mid-body while streaming into an output that cannot be rewound
    (orchestrator.client)."""


class RequestOutcomeUnknown(AgentUnreachable):
    """The connection broke after a write request was sent: it may or may not have happened."""


class Superseded(RequestOutcomeUnknown):
    """A write in flight was abandoned because the map named another writer meanwhile (the
    one it went to is being fenced): it may or may not have happened, and is resent."""


class CoordinationError(OrchestratorError):
    pass


class IllegalFleetTransition(CoordinationError):
    """A role or phase change the fleet's laws forbid; names the (from, to) pair. (Not the
    agents' :class:`agents.errors.IllegalTransition`: that one is an agent's own role machine.)"""

    def __init__(self, subject: str, from_: str, to: str, reason: str = "") -> None:
        detail = f": {reason}" if reason else ""
        super().__init__(f"illegal transition of {subject}: {from_} -> {to}{detail}")
        self.subject = subject
        self.from_ = from_
        self.to = to


class NotActive(CoordinationError):
    """This coordinator is a standby for the fleet; ``coordinator`` names the active one."""

    def __init__(self, fleet: str, coordinator: str | None) -> None:
        where = f" (active: {coordinator})" if coordinator else ""
        super().__init__(f"not the active coordinator of fleet {fleet}{where}")
        self.fleet = fleet
        self.coordinator = coordinator


class RoleSwitchFailed(CoordinationError):
    """The hypervisor side of a role change failed (not the agent's answer)."""


class NoSpareProvisioner(CoordinationError):
    """A spare must be attached but the coordinator was started without a provisioner."""


class NoEligibleWriter(CoordinationError):
    pass


class FencingFailed(CoordinationError):
    pass


class UpgradeRefused(CoordinationError):
    """The fleet is not in a state a rolling upgrade may start or go on from (no writer, a
    failover under way, readers out of sync, nobody upgraded to hand the writer role to)."""


class UpgradeStalled(CoordinationError):
    """A node of a rolling upgrade did not come back (``node``, the message says why); the
    upgrade stopped there and left the rest of the fleet as it was."""

    def __init__(self, node: str, reason: str) -> None:
        super().__init__(f"upgrade stopped at {node}: {reason}")
        self.node = node


class ReportReplayed(OrchestratorError):
    """An agent's report the coordinator admitted already (or may have: signed before it was
    watching) came again: refused, it changes nothing."""

    def __init__(self, message: str, node: str) -> None:
        super().__init__(message)
        self.node = node


class ReportOutOfOrder(ReportReplayed):
    """An agent's report about itself signed before one of its reports the coordinator
    admitted already (held back by the network): refused, it would roll the node back."""


# The coordinator's HTTP API (orchestrator.coordinator.api): wire forms.


class PeerCertificateMismatch(ForeignGrant):
    """A report whose connection presented a fleet certificate of another node than the one
    its grant names (403)."""

    code = "peer_cert_mismatch"
    status = 403


class NotActiveError(NotActiveCoordinator):
    """Wire form of :class:`NotActive`: 503 with the active coordinator's URL (the agents'
    :class:`~agents.errors.NotActiveCoordinator`, the same code)."""


class RefusedTransition(AgentError):
    """Wire form of an IllegalFleetTransition the election refused (409)."""

    code = "refused_transition"
    status = 409


class CoordinationFailed(AgentError):
    """Wire form of a CoordinationError (a fence or promotion that failed): 503."""

    code = "coordination_failed"
    status = 503


class ReplayedReport(AgentError):
    """Wire form of :class:`ReportReplayed`: 409, the report changed nothing."""

    code = "replayed_report"
    status = 409


class StaleReport(AgentError):
    """Wire form of :class:`ReportOutOfOrder`: 409, the report changed nothing."""

    code = "stale_report"
    status = 409


class LengthRequired(AgentError):
    """A request with ``Transfer-Encoding`` (411): bodies need a Content-Length. The
    connection is closed: the body's framing is unknown, it must never be read as the next
    request. (Not the agents' 501 ``unsupported_transfer_encoding``: a client's fault is a
    4xx here.)"""

    code = "length_required"
    status = 411
