"""The sandbox's state file: every resource is recorded *before* it is relied on.

``down`` (and a crashed ``up``) undoes exactly what this file lists, in reverse order
of creation, by pid and by name, never by pattern. Writes are atomic (temp + rename)
so a crash mid-write leaves the previous state.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

STATE_VERSION = 1


class StateFile:
    """Append-only list of ``{"kind": ..., **fields}`` resources, plus free-form facts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        if path.exists():
            data = json.loads(path.read_text())
            if data.get("version") != STATE_VERSION:
                raise ValueError(f"{path}: unsupported state version {data.get('version')!r}")
            self._data: dict[str, Any] = data
        else:
            self._data = {"version": STATE_VERSION, "resources": [], "facts": {}}

    @property
    def resources(self) -> list[dict[str, Any]]:
        return list(self._data["resources"])

    @property
    def facts(self) -> dict[str, Any]:
        return dict(self._data["facts"])

    def record(self, kind: str, **fields: Any) -> None:
        """Note a resource that now exists (or is about to: record first, then create)."""
        with self._lock:
            self._data["resources"].append({"kind": kind, **fields})
            self._save()

    def forget(self, kind: str, **match: Any) -> None:
        """Drop resources of ``kind`` whose fields equal ``match`` (after removing them)."""
        with self._lock:
            self._data["resources"] = [
                r for r in self._data["resources"]
                if not (r["kind"] == kind and all(r.get(k) == v for k, v in match.items()))
            ]
            self._save()

    def set_fact(self, key: str, value: Any) -> None:
        with self._lock:
            self._data["facts"][key] = value
            self._save()

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._data, indent=2, sort_keys=True))
        os.replace(tmp, self.path)
