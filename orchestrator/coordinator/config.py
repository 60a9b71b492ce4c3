"""The ``[coordinator]`` table of rbdfleet.toml (docs/config.md, docs/coordinator.md), with
``RBDFLEET_COORDINATOR_<KEY>`` overrides; the rest of the file is the shared fleet config
(:mod:`orchestrator.config`)."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator import config as fleet_config
from orchestrator.core.liveness import LivenessConfig
from orchestrator.errors import ConfigError

__all__ = ["CoordinatorConfig", "coordinator_config"]

ENV_PREFIX = "RBDFLEET_COORDINATOR_"


@dataclass(frozen=True)
class CoordinatorConfig:
    """The ``[coordinator]`` table (every key optional)."""

    urls: tuple[str, ...] = ("https://127.0.0.1:7470",)
    listen: str = "127.0.0.1:7470"
    lease_seconds: float = 2.0
    probe_interval: float = 0.2
    probe_timeout: float = 0.3
    suspect_after: float = 0.5
    dead_after: float = 1.2
    confirm_failures: int = 3
    retry_delay: float = 0.3
    grant_ttl: float = 60.0
    tls_cert: str | None = None  # default: coordinator.pem in the fleet's PKI directory
    tls_key: str | None = None
    insecure_plaintext: bool = False

    def liveness(self) -> LivenessConfig:
        """The failure detector's timings."""
        return LivenessConfig(
            probe_interval=self.probe_interval,
            probe_timeout=self.probe_timeout,
            suspect_after=self.suspect_after,
            dead_after=self.dead_after,
            confirm_failures=self.confirm_failures,
        )


_FLOATS = (
    "lease_seconds",
    "probe_interval",
    "probe_timeout",
    "suspect_after",
    "dead_after",
    "retry_delay",
    "grant_ttl",
)


def coordinator_config(path: Path, env: Mapping[str, str] = os.environ) -> CoordinatorConfig:
    """Read ``[coordinator]`` from ``path`` plus ``RBDFLEET_COORDINATOR_*`` overrides."""
    try:
        table = dict(tomllib.loads(path.read_text()).get("coordinator") or {})
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError("path", f"{path}: {exc}") from exc
    fleet_config.check_names({"coordinator": table}, env)  # typos: refused, with a suggestion
    for var, value in env.items():
        if var.startswith(ENV_PREFIX):
            table[var[len(ENV_PREFIX) :].lower()] = value
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        where = f"coordinator.{key}"
        if key == "urls":
            urls = value.split(",") if isinstance(value, str) else value
            if not isinstance(urls, list) or not all(isinstance(u, str) and u for u in urls):
                raise ConfigError(where, "must be a list of URLs")
            kwargs["urls"] = tuple(u.strip() for u in urls)
        elif key in _FLOATS:
            try:
                kwargs[key] = float(value)
            except (TypeError, ValueError):
                raise ConfigError(where, "must be a number") from None
        elif key == "insecure_plaintext":
            if not isinstance(value, bool) and str(value).lower() not in ("true", "false"):
                raise ConfigError(where, "must be true or false")
            kwargs[key] = value if isinstance(value, bool) else str(value).lower() == "true"
        elif key == "confirm_failures":
            try:
                kwargs[key] = int(value)
            except (TypeError, ValueError):
                raise ConfigError(where, "must be an integer") from None
        else:  # listen, tls_cert, tls_key: check_names refused any other key
            kwargs[key] = str(value)
    result = CoordinatorConfig(**kwargs)
    result.liveness()  # validates the timings
    return result
