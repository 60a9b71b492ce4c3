"""Client credentials (pure): scopes, what each allows, and the token a client presents.

A client of a fleet has a name, a scope and its own random secret; the coordinator stores them
(ClientStore port) and checks each request's token, a grant of purpose ``client`` for the
audience ``coordinator`` whose subject is the client's name, MACed with the client's secret
(docs/security.md). No clock is read here: times are inputs.

=======  ============================================================================
scope    allows
=======  ============================================================================
read     read targets (grants to get/list/stat), failure reports (the node turns SUSPECT)
write    the above, and write targets (grants to put/delete/mkdir/rename)
admin    the above, and failover and fence
=======  ============================================================================
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final

from agents.core.grants import CLIENT, COORDINATOR, Grant, sign

READ_SCOPE: Final = "read"
WRITE_SCOPE: Final = "write"
ADMIN_SCOPE: Final = "admin"
SCOPES: Final = (READ_SCOPE, WRITE_SCOPE, ADMIN_SCOPE)  # each includes the ones before it
# the coordinator's client routes and the scope each needs
ROUTE_SCOPE: Final = {"read": READ_SCOPE, "report": READ_SCOPE, "write": WRITE_SCOPE,
                      "failover": ADMIN_SCOPE, "fence": ADMIN_SCOPE}
CLIENT_TOKEN_TTL: Final = 30.0
_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")


def check_client_name(name: str) -> str:
    """``name`` if it is a client name (lower-case letters, digits, ``_.-``, at most 63)."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"client name {name!r}: lower-case letters, digits and _.- "
                         "(first a letter or digit), at most 63")
    return name


@dataclass(frozen=True)
class ClientCredential:
    """One client of a fleet: ``secret`` is what it MACs its tokens with."""

    name: str
    scope: str
    secret: bytes = field(repr=False)
    created: float = 0.0

    def __post_init__(self) -> None:
        check_client_name(self.name)
        if self.scope not in SCOPES:
            raise ValueError(f"client scope must be one of {', '.join(SCOPES)}, "
                             f"not {self.scope!r}")
        if len(self.secret) < 16:
            raise ValueError("a client secret has at least 16 bytes")


def allows(scope: str, route: str) -> bool:
    """Whether a client of ``scope`` may call the coordinator's ``route``."""
    needed = ROUTE_SCOPE.get(route)
    return needed is not None and SCOPES.index(scope) >= SCOPES.index(needed)


def client_token(fleet: str, name: str, secret: bytes, now: float,
                 ttl: float = CLIENT_TOKEN_TTL) -> str:
    """The token client ``name`` presents to the coordinator of ``fleet`` until ``now + ttl``."""
    return sign(Grant(fleet, COORDINATOR, CLIENT, 0, now + ttl, subject=name), secret)


__all__ = ["ADMIN_SCOPE", "CLIENT_TOKEN_TTL", "READ_SCOPE", "ROUTE_SCOPE", "SCOPES",
           "WRITE_SCOPE", "ClientCredential", "allows", "check_client_name", "client_token"]
