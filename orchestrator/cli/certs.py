"""`rbdfleet cert rotate|revoke|rotate-ca`: the fleet's TLS certificates after `provision`
(docs/security.md, "TLS").

Each command changes the PKI directory (``[tls] dir``, :class:`~orchestrator.pki.FleetPki`) on
this admin host, then, unless ``--no-deploy``, installs the changed files on the VMs over SSH
with the deployer's file copy (:meth:`~orchestrator.deploy.AgentDeployer.put_files`, the
paths of :data:`~orchestrator.rollout.GUEST_TLS`; the CRL beside the CA). Running agents and
coordinators read changed files within seconds (agents.tlsreload): nothing restarts. A
coordinator reads the PKI directory it was started with.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Annotated, Any

import typer

from agents.errors import RbdfleetError
from agents.tlsreload import default_crl
from orchestrator import config as fleet_config
from orchestrator.cli._common import DEFAULT_CONFIG, ConfigOption, coordinator_hosts
from orchestrator.cli._output import JsonOption, emit_json, print_table, say, say_step
from orchestrator.errors import ConfigError, DeployError
from orchestrator.pki import COORDINATOR, CertInfo, FleetPki, node_names
from orchestrator.rollout import GUEST_TLS
from orchestrator.services import open_rollout

app = typer.Typer(help="The fleet's TLS certificates: rotate, revoke, change the CA.",
                  no_args_is_help=True)

NodeOption = Annotated[list[str] | None, typer.Option(
    "--node", help="a VM (or coordinator) to give a new certificate; repeatable")]
AllOption = Annotated[bool, typer.Option(
    "--all", help="every VM and the coordinators")]
DeployOption = Annotated[bool, typer.Option(
    "--deploy/--no-deploy", help="install the changed files on the VMs over SSH")]
NodeArg = Annotated[str, typer.Argument(help="the VM (or coordinator) whose certificate "
                                             "to revoke")]
FinishOption = Annotated[bool, typer.Option(
    "--finish", help="end the rotation: trust the new CA alone")]

GUEST_CRL = default_crl(GUEST_TLS["ca"])  # where agents look for their CA's CRL

Files = list[tuple[bytes, str, int]]


def _pki(config: Path) -> tuple[FleetPki, dict[str, list[str]]]:
    cfg = fleet_config.load(config)
    if cfg.tls.insecure_plaintext:
        raise ConfigError("tls.insecure_plaintext", "the fleet runs without TLS: no "
                                                    "certificates to rotate or revoke")
    return (FleetPki(cfg.pki_dir, cfg.fleet.name),
            node_names(cfg, coordinator_hosts(config)))


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _trust(pki: FleetPki) -> Files:
    return [(pki.ca_file.read_bytes(), GUEST_TLS["ca"], 0o644),
            (pki.crl_file.read_bytes(), GUEST_CRL, 0o644)]


def _identity(pki: FleetPki, vm: str) -> Files:
    # the key first: an agent that looks in between finds a pair that does not load and
    # keeps serving with the old one (agents.tlsreload)
    return [(pki.key_file(vm).read_bytes(), GUEST_TLS["key"], 0o600),
            (pki.cert_file(vm).read_bytes(), GUEST_TLS["cert"], 0o644)]


def _install(config: Path, vms: Collection[str] | None,
             files: Callable[[str], Files]) -> list[str]:
    """``files(vm)`` on each deployed VM (``vms`` None: all); the VMs done. DeployError naming
    each VM that could not be reached or written (the others are done)."""
    done: list[str] = []
    failed: dict[str, str] = {}
    with open_rollout(config, progress=say_step) as rollout:
        for target in rollout.targets():
            name = target.host.name
            if vms is not None and name not in vms:
                continue
            try:
                rollout.deployer.put_files(target, files(name))
            except RbdfleetError as exc:
                failed[name] = str(exc)
                continue
            done.append(name)
            say(f"  {name}: installed")
    if failed:
        raise DeployError("; ".join(f"{n}: {e}" for n, e in sorted(failed.items())),
                          {n: {"error": e} for n, e in failed.items()})
    return done


def _row(info: CertInfo) -> dict[str, Any]:
    return {"name": info.name, "serial": f"{info.serial:x}",
            "not_after": info.not_after.isoformat()}


@app.command("rotate")
def rotate(node: NodeOption = None, all_: AllOption = False, deploy: DeployOption = True,
           config: ConfigOption = DEFAULT_CONFIG, as_json: JsonOption = False) -> None:
    """Issue new keys and certificates from the fleet CA and install them: agents and
    coordinators serve with them within seconds, without a restart. The old certificates
    stay valid until they expire (revoke one that leaked)."""
    pki, names = _pki(config)
    chosen = sorted(names) if all_ else sorted(set(node or ()))
    if not chosen or (all_ and node):
        raise ConfigError("cert rotate", "name --node NAME (repeatable) or --all")
    unknown = [n for n in chosen if n not in names]
    if unknown:
        raise ConfigError("cert rotate", f"not a VM of the fleet nor `{COORDINATOR}`: "
                                         f"{', '.join(unknown)}")
    now = _now()
    pki.ensure_ca(now)
    issued = [pki.reissue(name, names[name], now) for name in chosen]
    for info in issued:
        say(f"certificate {pki.cert_file(info.name)} issued (serial {info.serial:x})")
    vms = [n for n in chosen if n != COORDINATOR]
    installed: list[str] = []
    if deploy and vms:
        # the CA and CRL everywhere first: during a CA rotation every node must trust the new
        # CA before any presents a certificate of it
        _install(config, None, lambda _: _trust(pki))
        installed = _install(config, vms, lambda vm: _identity(pki, vm))
    if as_json:
        emit_json({"issued": [_row(i) for i in issued], "installed": installed})
        return
    print_table(("NAME", "SERIAL", "NOT AFTER", "INSTALLED"),
                [(i.name, f"{i.serial:x}", f"{i.not_after:%Y-%m-%d}",
                  "yes" if i.name in installed else "-") for i in issued])


@app.command("revoke")
def revoke(node: NodeArg, deploy: DeployOption = True, config: ConfigOption = DEFAULT_CONFIG,
           as_json: JsonOption = False) -> None:
    """Revoke a node's certificate: its serial joins the fleet CA's CRL, which is installed
    on every VM (agents and coordinators refuse the certificate at the handshake within
    seconds). The node keeps its files until `cert rotate --node NODE` gives it new ones."""
    pki, names = _pki(config)
    if node not in names:
        raise ConfigError("cert revoke", f"{node!r} is not a VM of the fleet nor "
                                         f"`{COORDINATOR}`")
    info = pki.revoke(node, _now())
    say(f"certificate of {node} (serial {info.serial:x}) revoked: {pki.crl_file}")
    installed = _install(config, None, lambda _: _trust(pki)) if deploy else []
    if as_json:
        emit_json({"revoked": _row(info), "installed": installed})
        return
    typer.echo(f"revoked {node} serial {info.serial:x}; CRL installed on "
               f"{', '.join(installed) or 'no VM'}")


@app.command("rotate-ca")
def rotate_ca(finish: FinishOption = False, deploy: DeployOption = True,
              config: ConfigOption = DEFAULT_CONFIG, as_json: JsonOption = False) -> None:
    """Change the fleet CA in three steps without downtime: `rotate-ca` (a new CA signs;
    every node trusts the old and the new), `cert rotate --all` (every node gets a
    certificate of the new CA), `rotate-ca --finish` (the old CA is trusted no more)."""
    pki, _ = _pki(config)
    if finish:
        pki.finish_ca_rotation()
        say(f"{pki.ca_file}: the new CA alone")
        new: dict[str, Any] = {}
    else:
        info = pki.begin_ca_rotation(_now())
        say(f"{pki.ca_file}: new CA {info.name!r} first, the old one after it")
        new = {"ca": info.name, "not_after": info.not_after.isoformat()}
    installed = _install(config, None, lambda _: _trust(pki)) if deploy else []
    if as_json:
        emit_json({**new, "finished": finish, "installed": installed})
        return
    typer.echo(f"CA {'rotation finished' if finish else 'rotation begun'}; CA and CRL "
               f"installed on {', '.join(installed) or 'no VM'}"
               + ("" if finish else "; next: rbdfleet cert rotate --all"))


def register(root: typer.Typer) -> None:
    """Add ``cert`` to the root app."""
    root.add_typer(app, name="cert")
