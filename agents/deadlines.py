"""Deadlines per connection, for the two HTTP servers built on ``http.server`` (the agent's,
``agents.server``, and the coordinator's, ``orchestrator.coordinator.api``): neither imports
the other's implementation for it.
"""

from __future__ import annotations

import contextlib
import socket
import threading

__all__ = ["Deadlines"]


class Deadlines:
    """Connections that must finish a phase by a monotonic time. The serving loop
    (``service_actions`` of either server) shuts late ones down: the blocked read then sees
    EOF, whatever per-read timeout a trickling client keeps resetting."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._due: dict[socket.socket, float] = {}
        self._cut: set[socket.socket] = set()

    def arm(self, sock: socket.socket, due: float) -> None:
        with self._lock:
            self._due[sock] = due

    def disarm(self, sock: socket.socket) -> bool:
        """Lift ``sock``'s deadline; False when it had passed (the connection was cut)."""
        with self._lock:
            self._due.pop(sock, None)
            if sock in self._cut:
                self._cut.discard(sock)
                return False
            return True

    def cut_late(self, now: float) -> int:
        """Shut down every connection past its deadline; how many."""
        with self._lock:
            late = [s for s, due in self._due.items() if due <= now]
            for sock in late:
                del self._due[sock]
                self._cut.add(sock)
        for sock in late:
            # the plain socket's shutdown, also for TLS: SSLSocket.shutdown would drop the
            # TLS state under the thread that is reading
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
        return len(late)
