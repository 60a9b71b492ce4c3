"""`rbdfleet upgrade`: a rolling upgrade of the fleet's agents (:mod:`orchestrator.upgrade`).

The package is the one `rbdfleet deploy` ships (this tree's agents); the nodes are reached
the way `rbdfleet deploy` reaches them (:func:`orchestrator.services.open_rollout`), each
node's config made for the map of the moment (its role and epoch), and the handover is asked
of the active coordinator with the config's client credential (admin scope).
"""

from __future__ import annotations

import copy
from typing import Annotated

import typer

from orchestrator.cli._common import DEFAULT_CONFIG, ConfigOption, FleetArg, check_fleet
from orchestrator.cli._output import JsonOption, emit_json, print_table, say_step
from orchestrator.core.fleetmap import FleetMap
from orchestrator.deploy import DeployTarget
from orchestrator.provision import SystemClock
from orchestrator.services import open_client, open_rollout
from orchestrator.upgrade import FleetUpgrade

DryRunOption = Annotated[
    bool, typer.Option("--dry-run", help="print the steps it would take and change nothing")]
NodeWaitOption = Annotated[float, typer.Option(
    "--node-wait", min=1.0, help="seconds a restarted node may take to be an in-sync reader "
    "again before the upgrade stops there")]


def upgrade(
    fleet: FleetArg,
    dry_run: DryRunOption = False,
    node_wait: NodeWaitOption = 120.0,
    config: ConfigOption = DEFAULT_CONFIG,
    as_json: JsonOption = False,
) -> None:
    """Upgrade the fleet's agents to this release, one node at a time (disruptive for writes
    only during the handover): each reader is restarted on the new package and waited for
    until it is an in-sync reader again; then the writer role is handed over to an upgraded
    reader (planned failover: the old writer is fenced); then the old writer is upgraded and
    rejoins as a reader. Refuses a fleet without a writer or with a reader out of sync; stops
    at the first node that does not come back, naming it (the rest keep serving). Running it
    again continues where it stopped."""
    client, cfg = open_client(config)
    check_fleet(cfg, fleet)
    with open_rollout(config, progress=say_step) as rollout:
        health = rollout.health
        assert health is not None  # open_rollout always gives the agents' health probe

        def targets(fleet_map: FleetMap) -> dict[str, DeployTarget]:
            at = copy.copy(rollout)  # the same VMs and keys, with this map's writer and epoch
            at.writer, at.epoch = fleet_map.writer, fleet_map.epoch
            return {t.host.name: t for t in at.targets()}

        use = FleetUpgrade(client.coordinator, rollout.deployer, targets, health, SystemClock(),
                           node_wait=node_wait, progress=say_step)
        if dry_run:
            steps = [str(s) for s in use.plan()]
            if as_json:
                emit_json({"version": use.version, "plan": steps})
                return
            typer.echo(f"upgrade to {use.version}: "
                       + ("nothing to do" if not steps else f"{len(steps)} steps"))
            for i, step in enumerate(steps, 1):
                typer.echo(f"  {i}. {step}")
            return
        report = use.run()
    if as_json:
        emit_json(report.to_json())
        return
    print_table(("STEP", "SECONDS", "DONE"),
                [(s.step, f"{s.seconds:.2f}", s.detail) for s in report.steps], right={1})
    handover = ("" if report.handover_seconds is None
                else f"; handover {report.handover_seconds:.2f} s (writes refused meanwhile)")
    typer.echo(f"every agent runs {report.version}"
               + (" (nothing to do)" if not report.steps else "") + handover)


def register(root: typer.Typer) -> None:
    """Add ``upgrade`` to the root app."""
    root.command("upgrade")(upgrade)
