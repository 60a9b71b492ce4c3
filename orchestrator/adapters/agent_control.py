"""The coordinator's AgentControl port over HTTP: health probes, promote, demote, reader set.

It rides :class:`orchestrator.transport.Transport`, the connection layer the client library
uses too (TLS against the fleet CA, the coordinator's certificate presented for the agents'
node-only routes, errors mapped once), but is no part of the client library: only the
coordinator, and the rollout's health checks, control agents. ``orchestrator.services``
builds it from the fleet's config.
"""

from __future__ import annotations

from agents.core.protocol import (
    AUTH_HEADER,
    BEARER,
    DemoteRequest,
    Health,
    PromoteRequest,
    ReaderSet,
)
from orchestrator.transport import Transport

__all__ = ["HttpAgentControl"]


class HttpAgentControl:
    """AgentControl over HTTP (health probes, promote, demote, reader set)."""

    def __init__(self, transport: Transport | None = None, control_timeout: float = 30.0) -> None:
        self.transport = transport or Transport()
        self.control_timeout = control_timeout

    def health(self, address: str, timeout: float) -> Health:
        """GET /v1/health."""
        resp = self.transport.request(address, address, "GET", "/v1/health", timeout=timeout)
        return Health.from_json(resp.body)

    def _post(self, address: str, path: str, payload: bytes, grant: str) -> None:
        headers = {"Content-Type": "application/json", AUTH_HEADER: BEARER + grant}
        self.transport.request(
            address,
            address,
            "POST",
            path,
            headers=headers,
            body=payload,
            timeout=self.control_timeout,
        )

    def promote(self, address: str, request: PromoteRequest, grant: str) -> None:
        """POST /v1/promote (returns once the agent accepts writes)."""
        self._post(address, "/v1/promote", request.encode(), grant)

    def demote(self, address: str, request: DemoteRequest, grant: str) -> None:
        """POST /v1/demote."""
        self._post(address, "/v1/demote", request.encode(), grant)

    def send_reader_set(self, address: str, request: ReaderSet, grant: str) -> None:
        """POST /v1/readers."""
        self._post(address, "/v1/readers", request.encode(), grant)
