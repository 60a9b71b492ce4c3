"""Shipped fake of the ClientStore port: client credentials in a dict (one fleet)."""

from __future__ import annotations

import threading

from orchestrator.core.clients import ClientCredential


class MemoryClientStore:
    """ClientStore in a dict; thread-safe like the RADOS one."""

    def __init__(self, fleet: str, *credentials: ClientCredential) -> None:
        self.fleet = fleet
        self._lock = threading.Lock()
        self._by_name = {c.name: c for c in credentials}

    def get(self, name: str) -> ClientCredential | None:
        """The credential, or None."""
        with self._lock:
            return self._by_name.get(name)

    def list(self) -> list[ClientCredential]:
        """Every credential, by name."""
        with self._lock:
            return [self._by_name[n] for n in sorted(self._by_name)]

    def put(self, credential: ClientCredential) -> None:
        """Create or replace."""
        with self._lock:
            self._by_name[credential.name] = credential

    def remove(self, name: str) -> bool:
        """Delete; False when absent."""
        with self._lock:
            return self._by_name.pop(name, None) is not None


__all__ = ["MemoryClientStore"]
