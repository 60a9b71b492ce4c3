"""`rbdfleet client add|list|revoke|rotate`: the fleet's client credentials (docs/security.md).

Credentials live in RADOS next to the fleet's coordinator state (RadosClientStore); the
coordinator reads them on each client request (a change counts within a few seconds). A new
secret is shown once: written to ``--out`` (mode 0600) or printed on stdout.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from orchestrator.cli._common import DEFAULT_CONFIG, ConfigOption
from orchestrator.cli._output import JsonOption, emit_json, print_table, say
from orchestrator.core.clients import SCOPES, ClientCredential, check_client_name
from orchestrator.errors import ConfigError
from orchestrator.ports import ClientStore
from orchestrator.services import open_services

app = typer.Typer(help="Client credentials of the fleet: who may read, write, administer.",
                  no_args_is_help=True)

NameArg = Annotated[str, typer.Argument(help="the client's name (letters, digits, _.-)")]
OutOption = Annotated[Path | None, typer.Option(
    "--out", help="write the secret to this file (mode 0600) instead of printing it")]
SECRET_BYTES = 32


@contextlib.contextmanager
def open_store(config_path: Path) -> Iterator[ClientStore]:
    """The ClientStore of the config's fleet (over its Ceph cluster)."""
    with open_services(config_path) as services:
        yield services.clients


def write_secret_file(path: Path, secret: bytes) -> None:
    """``secret`` as hex in ``path``, mode 0600 from its creation on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(secret.hex() + "\n")


def issue(store: ClientStore, name: str, scope: str, *, replace: bool,
          out: Path | None, as_json: bool = False) -> ClientCredential:
    """Make (or, with ``replace``, re-key) client ``name``; its secret goes to ``out`` or is
    printed (in the JSON object with ``as_json``). The stored credential is written before
    the file: a secret that was shown always works."""
    check_name(name)
    existing = store.get(name)
    if replace and existing is None:
        raise ConfigError("client", f"no client {name!r} in fleet {store.fleet}")
    if not replace and existing is not None:
        raise ConfigError("client", f"client {name!r} exists already (rotate or revoke it)")
    credential = ClientCredential(name, scope, secrets.token_bytes(SECRET_BYTES), time.time())
    store.put(credential)
    answer = {"client": name, "scope": scope}
    if out is not None:
        write_secret_file(out, credential.secret)
        say(f"client {name} ({scope}): secret written to {out}")
        answer["secret_file"] = str(out)
    else:
        say(f"client {name} ({scope}): the secret is shown once; keep it in a 0600 file")
        answer["secret"] = credential.secret.hex()
    if as_json:
        emit_json(answer)
    elif out is None:
        typer.echo(credential.secret.hex())
    return credential


def check_name(name: str) -> None:
    """ConfigError unless ``name`` is a client name."""
    try:
        check_client_name(name)
    except ValueError as exc:
        raise ConfigError("client", str(exc)) from exc


@app.command("add")
def add(
    name: NameArg,
    scope: Annotated[str, typer.Option("--scope", help="read, write or admin")] = "read",
    out: OutOption = None,
    config: ConfigOption = DEFAULT_CONFIG,
    as_json: JsonOption = False,
) -> None:
    """Create a client credential of SCOPE (read: get/list/stat; write: also put, delete,
    mkdir, rename; admin: also failover and fence)."""
    if scope not in SCOPES:
        raise ConfigError("scope", f"one of {', '.join(SCOPES)}")
    with open_store(config) as store:
        issue(store, name, scope, replace=False, out=out, as_json=as_json)


@app.command("rotate")
def rotate(name: NameArg, out: OutOption = None, config: ConfigOption = DEFAULT_CONFIG,
           as_json: JsonOption = False) -> None:
    """Give client NAME a new secret (same scope); the old one stops working within seconds."""
    with open_store(config) as store:
        existing = store.get(name)
        issue(store, name, existing.scope if existing else "read", replace=True, out=out,
              as_json=as_json)


@app.command("revoke")
def revoke(name: NameArg, config: ConfigOption = DEFAULT_CONFIG,
           as_json: JsonOption = False) -> None:
    """Delete client NAME: the coordinator refuses it within seconds."""
    with open_store(config) as store:
        if not store.remove(name):
            raise ConfigError("client", f"no client {name!r} in fleet {store.fleet}")
    say(f"client {name} revoked")
    if as_json:
        emit_json({"revoked": name})


@app.command("list")
def list_clients(config: ConfigOption = DEFAULT_CONFIG, as_json: JsonOption = False) -> None:
    """Every client of the fleet: name, scope, created (never the secrets)."""
    with open_store(config) as store:
        found = store.list()
    rows = [(c.name, c.scope, time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(c.created)))
            for c in found]
    if as_json:
        emit_json({"clients": [{"name": n, "scope": s, "created": c}
                               for n, s, c in rows]})
        return
    print_table(["CLIENT", "SCOPE", "CREATED (UTC)"], rows)


def register(root: typer.Typer) -> None:
    """Add ``client`` to the root app."""
    root.add_typer(app, name="client")
