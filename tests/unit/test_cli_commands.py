"""The commands through typer's CliRunner, over fakes of the fleet client and the provisioner:
stdout carries only the result (one JSON object with --json), stdin/stdout streaming, tables
sized to content, errors as one stderr line with the mapped exit code."""

from __future__ import annotations

import contextlib
import io
import json
import os
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import click
import pytest
import typer
from typer.testing import CliRunner

from agents.errors import NotFound
from orchestrator import config
from orchestrator.cli import files, provision, reference, sandbox, status
from orchestrator.cli._output import PROGRESS_MIN, table
from orchestrator.cli.app import app
from orchestrator.client import FleetClient, WriteResult
from orchestrator.config import FleetConfig
from orchestrator.core.placement import Plan
from tests.unit.test_cli_help import flat

pytestmark = pytest.mark.unit

RUNNER = CliRunner()
CONFIG_TOML = """\
[ceph]
conf = "/etc/ceph/ceph.conf"
keyring = "/etc/ceph/keyring"
[ssh]
key = "/k/id"
known_hosts = "/k/known_hosts"
[fleet]
name = "demo"
image = "rbdfleet-demo"
size = "1GiB"
writer = "vm1"
secret_file = "/k/fleet.secret"
[[vm]]
name = "vm1"
domain = "d1"
address = "10.0.0.1"
"""


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "rbdfleet.toml"
    path.write_text(CONFIG_TOML)
    return path


@pytest.fixture
def cfg(config_file: Path) -> FleetConfig:
    return config.load(config_file, env={})


class FakeCoordinator:
    def __init__(self, fleets: list[dict[str, Any]]) -> None:
        self.fleets = fleets

    def status(self) -> dict[str, Any]:
        return {"fleets": self.fleets}


class FakeFleet:
    """The part of FleetClient the file commands use, over a dict of files."""

    def __init__(self, fleets: list[dict[str, Any]] | None = None) -> None:
        self.files: dict[str, bytes] = {}
        self.coordinator = FakeCoordinator(fleets or [])
        self.pages_asked: list[tuple[int | None, str | None]] = []

    def put(
        self, source: IO[bytes], remote: str, size: int, *,
        progress: Callable[[int], None] | None = None,
    ) -> WriteResult:
        data = b""
        while len(data) < size:
            chunk = source.read(min(1 << 20, size - len(data)))
            assert chunk, "source ended before the announced size"
            data += chunk
            if progress:
                progress(len(chunk))
        self.files[remote] = data
        return WriteResult("vm1", 3, len(self.files), {"seq": len(self.files), "epoch": 3})

    def _write(self, remote: str, sink: Any, progress: Callable[[int], None] | None) -> int:
        if remote not in self.files:
            raise NotFound(f"{remote} does not exist")
        data = self.files[remote]
        for i in range(0, len(data), 1 << 20):
            sink.write(data[i : i + (1 << 20)])
            if progress:
                progress(len(data[i : i + (1 << 20)]))
        return len(data)

    def get(self, remote: str, sink: IO[bytes], *,
            progress: Callable[[int], None] | None = None) -> int:
        sink.tell()  # the real one needs a seekable sink
        return self._write(remote, sink, progress)

    def get_stream(self, remote: str, sink: Any, *,
                   progress: Callable[[int], None] | None = None) -> int:
        return self._write(remote, sink, progress)

    def stat(self, remote: str) -> dict[str, Any]:
        return {"path": remote, "kind": "file", "size": len(self.files[remote])}

    def ls(self, remote: str = "/", *, limit: int | None = None,
           after: str | None = None) -> dict[str, Any]:
        """A page as an agent answers it (names after ``after``, ``next`` when more follow)."""
        self.pages_asked.append((limit, after))
        entries = [{"path": p, "kind": "file", "size": len(d)} for p, d in self.files.items()]
        entries = sorted([*entries, {"path": "/d", "kind": "dir", "size": 0}],
                         key=lambda e: e["path"])
        entries = [e for e in entries if after is None or e["path"][1:] > after]
        page = entries[: limit or 1000]
        more = len(entries) > len(page)
        return {"path": remote, "entries": page, "applied_seq": 7,
                "next": page[-1]["path"][1:] if more else None}

    ls_pages = FleetClient.ls_pages  # the real iterator over the fake's pages


@pytest.fixture
def fleet(monkeypatch: pytest.MonkeyPatch, cfg: FleetConfig) -> FakeFleet:
    fake = FakeFleet()

    def open_client(config_path: Path, timeout: float = 30.0) -> tuple[Any, FleetConfig]:
        return fake, cfg

    monkeypatch.setattr(files, "open_client", open_client)
    monkeypatch.setattr(status, "open_client", open_client)
    return fake


def test_put_reads_stdin_and_get_streams_to_stdout(fleet: FakeFleet) -> None:
    data = bytes(range(256)) * 300  # not text: stdout must carry the bytes as they are
    put = RUNNER.invoke(app, ["put", "-", "/in.bin"], input=data)
    assert put.exit_code == 0, put.output
    assert fleet.files["/in.bin"] == data
    assert put.stdout == f"/in.bin: {len(data)} bytes, seq 1, epoch 3 (writer vm1)\n"
    got = RUNNER.invoke(app, ["get", "/in.bin", "-"])
    assert got.exit_code == 0, got.output
    assert got.stdout_bytes == data and got.stderr == ""


def test_put_of_a_missing_file_is_a_usage_error(fleet: FakeFleet, tmp_path: Path) -> None:
    result = RUNNER.invoke(app, ["put", str(tmp_path / "absent"), "/x"])
    assert result.exit_code == 2 and "is not a file" in flat(result.stderr)
    assert fleet.files == {}


def test_progress_goes_to_stderr_and_json_is_one_object(fleet: FakeFleet, tmp_path: Path) -> None:
    local = tmp_path / "big.bin"
    local.write_bytes(b"x" * PROGRESS_MIN)
    put = RUNNER.invoke(app, ["put", str(local), "/big.bin", "--json"])
    assert put.exit_code == 0, put.output
    assert len(put.stdout.splitlines()) == 1
    ack = json.loads(put.stdout)
    assert ack["path"] == "/big.bin" and ack["size"] == PROGRESS_MIN and ack["node"] == "vm1"
    assert "put /big.bin" in put.stderr  # the progress bar
    back = tmp_path / "back.bin"
    got = RUNNER.invoke(app, ["get", "/big.bin", str(back)])
    assert got.exit_code == 0 and got.stdout == ""
    assert "get /big.bin" in got.stderr
    assert back.read_bytes() == local.read_bytes()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_ls_table_fits_its_content(fleet: FakeFleet) -> None:
    fleet.files = {"/a-rather-long-file-name.bin": b"x" * 1234567, "/b": b""}
    result = RUNNER.invoke(app, ["ls"])
    assert result.stdout.splitlines() == [
        "KIND     SIZE  PATH",
        "-     1234567  /a-rather-long-file-name.bin",
        "-           0  /b",
        "d           0  /d",
    ]
    listing = json.loads(RUNNER.invoke(app, ["ls", "--json"]).stdout)
    assert [e["path"] for e in listing["entries"]] == ["/a-rather-long-file-name.bin", "/b", "/d"]


def test_ls_pages(fleet: FakeFleet) -> None:
    """By default every page is fetched and printed as one listing (as before pagination);
    --limit/--after print one page and say where the next one starts."""
    fleet.files = {f"/f{i}": b"x" * i for i in range(5)}
    every = RUNNER.invoke(app, ["ls"]).stdout.splitlines()
    assert [line.split()[-1] for line in every[1:]] == ["/d", "/f0", "/f1", "/f2", "/f3", "/f4"]

    fleet.pages_asked.clear()
    listing = json.loads(RUNNER.invoke(app, ["ls", "--json"]).stdout)
    assert len(listing["entries"]) == 6 and listing["next"] is None

    page = RUNNER.invoke(app, ["ls", "--limit", "2", "--after", "f0"])
    assert page.exit_code == 0, page.output
    assert [line.split()[-1] for line in page.stdout.splitlines()[1:]] == ["/f1", "/f2"]
    assert "next: --after f2" in page.stderr
    assert fleet.pages_asked[-1] == (2, "f0")

    last = json.loads(RUNNER.invoke(app, ["ls", "--json", "--limit", "5", "--after", "f2"]).stdout)
    assert [e["path"] for e in last["entries"]] == ["/f3", "/f4"] and last["next"] is None
    assert RUNNER.invoke(app, ["ls", "--limit", "0"]).exit_code == 2


def test_ls_pages_iterates_until_next_is_none(fleet: FakeFleet) -> None:
    fleet.files = {f"/f{i}": b"" for i in range(7)}
    pages = list(fleet.ls_pages("/", limit=3))
    assert [len(p["entries"]) for p in pages] == [3, 3, 2]
    assert fleet.pages_asked == [(3, None), (3, "f1"), (3, "f4")]
    assert [e["path"] for p in pages for e in p["entries"]] == [
        "/d", *[f"/f{i}" for i in range(7)]]


def test_table_columns_are_as_wide_as_their_widest_cell() -> None:
    assert table(("A", "NUMBER", "Z"), [("long-cell", 5, "z"), ("b", 123456789, "")],
                 right={1}) == [
        "A             NUMBER  Z",
        "long-cell          5  z",
        "b          123456789",
    ]


FLEET_STATUS: dict[str, Any] = {
    "fleet": "demo", "coordinator": "http://c:7470", "active": True,
    "map": {"epoch": 4, "revision": 9, "phase": "stable", "members": [
        {"name": "vm1", "role": "writer", "in_sync": True, "applied_seq": 120,
         "address": "10.0.0.1:7480"},
        {"name": "reader-with-a-long-name", "role": "reader", "in_sync": False,
         "applied_seq": 7, "address": "10.0.0.22:7480"},
    ]},
    "liveness": {"vm1": "alive", "reader-with-a-long-name": "suspect"},
}


def test_status_table_and_json(fleet: FakeFleet) -> None:
    fleet.coordinator.fleets = [{"fleet": "other"}, FLEET_STATUS]
    text = RUNNER.invoke(app, ["status"])
    assert text.exit_code == 0, text.output
    assert text.stdout.splitlines()[1:] == [
        "NODE                     ROLE    SYNC         SEQ  LIVENESS  ADDRESS",
        "vm1                      writer  in-sync      120  alive     10.0.0.1:7480",
        "reader-with-a-long-name  reader  catching-up    7  suspect   10.0.0.22:7480",
    ]
    as_json = RUNNER.invoke(app, ["status", "--json"])
    assert json.loads(as_json.stdout) == FLEET_STATUS
    assert len(as_json.stdout.splitlines()) == 1


def test_status_of_a_fleet_the_coordinator_does_not_serve_is_an_error(fleet: FakeFleet) -> None:
    fleet.coordinator.fleets = [{"fleet": "other"}]
    for args in (["status"], ["status", "--json"]):
        result = RUNNER.invoke(app, args)
        assert result.exit_code == 10  # NotFound, as docs/cli.md's exit codes say
        assert result.stdout == ""
        assert result.stderr == (
            "rbdfleet: error: the coordinator does not serve fleet 'demo' (it serves: other)\n"
        )


def test_a_config_typo_is_one_error_line_with_exit_code_2(config_file: Path) -> None:
    config_file.write_text(CONFIG_TOML.replace("[ssh]", "create_pol = true\n[ssh]"))
    result = RUNNER.invoke(app, ["provision", "-c", str(config_file)])
    assert result.exit_code == 2
    assert result.stderr == (
        "rbdfleet: error: config ceph.create_pol: unknown key (did you mean ceph.create_pool?)\n"
    )


class FakeProvisioner:
    def __init__(self) -> None:
        self.calls: list[dict[str, bool]] = []

    def deprovision(self, delete_image: bool, dry_run: bool) -> tuple[Plan, list[Any]]:
        self.calls.append({"delete_image": delete_image, "dry_run": dry_run})
        return Plan(), []


@pytest.fixture
def provisioner(monkeypatch: pytest.MonkeyPatch, cfg: FleetConfig) -> FakeProvisioner:
    fake = FakeProvisioner()

    @contextlib.contextmanager
    def open_services(config_path: Path, **_: Any) -> Iterator[Any]:
        yield types.SimpleNamespace(provisioner=fake, config=cfg)

    monkeypatch.setattr(provision, "open_services", open_services)
    return fake


@pytest.mark.parametrize(("flags", "refusal"), [
    ([], "pass --fleet-name demo (or --yes-i-really-mean-it)"),
    (["--fleet-name", "prod"], "'prod' is not the configured fleet"),
])
def test_delete_image_needs_the_fleet_name(
    provisioner: FakeProvisioner, config_file: Path, flags: list[str], refusal: str
) -> None:
    result = RUNNER.invoke(
        app, ["deprovision", "-c", str(config_file), "--delete-image", *flags]
    )
    assert result.exit_code == 2
    assert refusal in flat(result.stderr)
    assert provisioner.calls == []  # refused before anything was touched


@pytest.mark.parametrize("flags", [
    ["--delete-image", "--fleet-name", "demo"],
    ["--delete-image", "--yes-i-really-mean-it"],
    ["--delete-image", "--dry-run"],
    [],
])
def test_deprovision_goes_on_when_confirmed_or_harmless(
    provisioner: FakeProvisioner, config_file: Path, flags: list[str]
) -> None:
    result = RUNNER.invoke(app, ["deprovision", "-c", str(config_file), *flags, "--json"])
    assert result.exit_code == 0, result.output
    assert provisioner.calls == [
        {"delete_image": "--delete-image" in flags, "dry_run": "--dry-run" in flags}
    ]
    assert json.loads(result.stdout)["changed"] is False


# Commands whose stdout stays empty (their result is a file, or nothing): no --json needed.
SILENT = {"get", "rm", "mv", "mkdir", "sandbox down", "coordinator run"}


def test_every_command_that_prints_offers_json() -> None:
    root = typer.main.get_command(app)
    leaves = {
        " ".join(ctx.command_path.split()[1:]): command
        for command, ctx in reference.commands(root, click.Context(root, info_name="rbdfleet"))
        if not isinstance(command, click.Group)
    }
    assert set(leaves) >= SILENT
    for name, command in leaves.items():
        has_json = any("--json" in p.opts for p in command.params)
        assert has_json != (name in SILENT), name


def test_stdin_source_regular_file_is_used_in_place_and_a_pipe_is_spooled(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    local = tmp_path / "in.bin"
    local.write_bytes(b"0123456789")
    with local.open("rb") as regular:
        regular.read(3)  # `put - … < file` after something consumed the start
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(regular))
        with files._sized_source("-") as (source, size):
            assert (size, source.read()) == (7, b"3456789")
    read_end, write_end = os.pipe()
    os.write(write_end, b"piped bytes")
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(pipe))
        with files._sized_source("-") as (source, size):
            assert (size, source.read(), source.seekable()) == (11, b"piped bytes", True)


def test_sandbox_status_reads_its_directory_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    asked: list[Path] = []

    def fake_status(directory: Path) -> dict[str, Any]:
        asked.append(directory)
        return {"dir": str(directory), "running": True, "health": "HEALTH_OK", "resources": [
            {"kind": "ceph.daemon", "name": "mon.a", "alive": True},
            {"kind": "vm.domain", "name": "rbdfleet-1a2b-vm1", "alive": False},
        ]}

    monkeypatch.setattr(sandbox.lifecycle, "status", fake_status)
    result = RUNNER.invoke(app, ["sandbox", "status"], env={"RBDFLEET_SANDBOX_DIR": str(tmp_path)})
    assert result.exit_code == 0, result.output
    assert asked == [tmp_path]
    assert result.stdout.splitlines() == [
        f"sandbox {tmp_path}: running",
        "KIND         WHAT               STATE",
        "ceph.daemon  mon.a              alive",
        "vm.domain    rbdfleet-1a2b-vm1  gone",
        "ceph health  HEALTH_OK",
    ]
    as_json = RUNNER.invoke(app, ["sandbox", "status", "--json", "--dir", str(tmp_path / "x")])
    assert json.loads(as_json.stdout)["dir"] == str(tmp_path / "x")
