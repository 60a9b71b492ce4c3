"""``rbdfleet-agent``: the agent daemon's command line (config file + flags, signals, logs).

Subcommands:
- ``serve --config FILE [flags]``: run the agent until SIGTERM/SIGINT (graceful: stop
  accepting, stop writes, close the device, exit 0). See docs/agent.md for the config.
- ``format --backend SPEC --fleet NAME``: write an empty volume (provisioning, tests).
- ``fsck IMAGE [...]``: :func:`agents.fsck.main`.

Logs: one line per event on stderr, ``key=value`` pairs; secrets never appear (the node's own
key is read from its 0600 file and only ever handed to the grant functions).
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import FrameType
from typing import Any

from agents.agent import Agent, AgentSettings
from agents.core.sizes import parse_size
from agents.device import BlockDevice
from agents.errors import (
    AgentError,
    ConfigError,
    DeviceError,
    FormatError,
    NotFound,
    RbdfleetError,
)
from agents.keyfile import read_key_lines
from agents.peers import reload_client_contexts
from agents.server import AgentServer, serve
from agents.tlsreload import TlsFiles, client_context, default_crl, server_context

__all__ = ["AgentConfig", "load_config", "main", "open_backend"]

LOG = logging.getLogger("agents.daemon")

# How long a `device:SERIAL` backend waits for its disk to appear in the guest (hot-plug).
DEVICE_WAIT_S = 15.0

@dataclass(frozen=True)
class AgentConfig:
    """Every setting of ``serve`` (docs/agent.md); flags override the file."""

    node: str
    fleet: str
    backend: str
    secret_file: str
    listen: str = "0.0.0.0:7480"
    advertise: str | None = None
    role: str = "reader"
    epoch: int = 1
    coordinator: tuple[str, ...] = ()  # the active coordinator and its standbys, any order
    readers: dict[str, str] = field(default_factory=dict)
    push_grants: dict[str, str] = field(default_factory=dict)
    ceph_conf: str | None = None
    ceph_user: str = "admin"
    ceph_keyring: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    tls_crl: str | None = None
    insecure_plaintext: bool = False
    max_body: int = 64 << 30
    ack_timeout: float = 2.0
    retry_interval: float = 0.5
    tail_interval: float = 0.5
    heartbeat_interval: float = 1.0
    selftest_interval: float = 10.0
    idle_checkpoint: float = 5.0
    log_level: str = "info"
    ready_file: str | None = None


def _flatten(raw: dict[str, Any]) -> dict[str, Any]:
    """``[ceph] conf = ...`` → ``ceph_conf``; ``[timing]`` keys go to the top level."""
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if key in ("ceph", "tls") and isinstance(value, dict):
            flat.update({k if k == "insecure_plaintext" else f"{key}_{k}": v
                         for k, v in value.items()})
        elif key == "timing" and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def load_config(path: str | None, overrides: dict[str, Any]) -> AgentConfig:
    """Read a TOML (``.toml``) or JSON config file, apply ``overrides``, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError("config", f"cannot read {path}: {exc.strerror}") from exc
        import tomllib  # only TOML configs pay for it (~1 MiB of the idle footprint)

        try:
            raw = json.loads(text) if not path.endswith(".toml") else tomllib.loads(text)
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError("config", f"{path} does not parse: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError("config", "top level must be a table/object")
    values = {**_flatten(raw), **{k: v for k, v in overrides.items() if v is not None}}
    known = {f.name: f for f in fields(AgentConfig)}
    for key in values:
        if key not in known:
            raise ConfigError(key, "unknown setting")
    for key in ("node", "fleet", "backend", "secret_file"):
        if not isinstance(values.get(key), str) or not values[key]:
            raise ConfigError(key, "required (a non-empty string)")
    if "max_body" in values:
        values["max_body"] = parse_size(values["max_body"], "max_body")
    for key in ("ack_timeout", "retry_interval", "tail_interval", "heartbeat_interval",
                "selftest_interval", "idle_checkpoint"):
        if key in values:
            value = values[key]
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ConfigError(key, "must be a positive number of seconds")
            values[key] = float(value)
    epoch = values.get("epoch", 1)
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
        raise ConfigError("epoch", "must be an integer >= 1")
    if values.get("role", "reader") not in ("reader", "writer", "spare"):
        raise ConfigError("role", "must be 'reader', 'writer' or 'spare'")
    readers = values.get("readers", {})
    if not isinstance(readers, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in readers.items()):
        raise ConfigError("readers", "must map node names to host:port addresses")
    push_grants = values.get("push_grants", {})
    if not isinstance(push_grants, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in push_grants.items()):
        raise ConfigError("push_grants", "must map reader names to push grant tokens")
    if bool(values.get("tls_cert")) != bool(values.get("tls_key")):
        raise ConfigError("tls", "cert and key go together")
    if not isinstance(values.get("insecure_plaintext", False), bool):
        raise ConfigError("insecure_plaintext", "must be true or false")
    if values.get("insecure_plaintext") and values.get("tls_cert"):
        raise ConfigError("insecure_plaintext", "set together with tls.cert: choose one")
    if "coordinator" in values:
        values["coordinator"] = _coordinators(values["coordinator"],
                                              bool(values.get("insecure_plaintext")))
    if values.get("log_level", "info").upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError("log_level", "one of debug, info, warning, error")
    _split_address("listen", values.get("listen", AgentConfig.listen))
    return AgentConfig(**values)


def _coordinators(value: Any, plaintext: bool) -> tuple[str, ...]:
    """The ``coordinator`` setting: one URL, or a list of them (an active coordinator and its
    standbys); an empty string or list means none."""
    urls = [value] if isinstance(value, str) else value
    if not isinstance(urls, list) or not all(isinstance(url, str) for url in urls):
        raise ConfigError("coordinator", "must be a URL (https://HOST:PORT) or host:port, "
                                         "or a list of them")
    for url in urls:
        if url.strip().lower().startswith("http://") and not plaintext:
            # reports would cross the network in the clear, and without this node's certificate
            raise ConfigError("coordinator", f"{url!r} is plaintext http:// but TLS is on: "
                                             "write https://HOST:PORT (or host:port), or set "
                                             "insecure_plaintext = true")
    return tuple(url for url in urls if url)


def _split_address(key: str, address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError(key, f"{address!r} is not host:port")
    return host.strip("[]") or "0.0.0.0", int(port)


def read_keys(path: str) -> tuple[bytes, ...]:
    """This node's own key(s) (:func:`agents.keyfile.read_key_lines`: private, current key
    first, a second line the previous key during a rotation), hex-decoded."""
    lines = read_key_lines(path, "secret_file")
    try:
        return tuple(bytes.fromhex(line.decode("ascii")) for line in lines)
    except ValueError as exc:  # UnicodeDecodeError too
        raise ConfigError("secret_file", f"{path}: a line is not a hex key") from exc


def open_backend(spec: str, *, read_only: bool, ceph_conf: str | None = None,
                 ceph_user: str = "admin", ceph_keyring: str | None = None) -> BlockDevice:
    """Open the device named by ``spec``: ``file:PATH``, ``device:SERIAL``,
    ``device-path:/dev/X`` or ``rbd:POOL/IMAGE`` (with the ceph settings)."""
    scheme, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise ConfigError("backend", f"{spec!r} is not SCHEME:TARGET")
    if scheme == "file":
        from agents.backends.file import FileDevice

        return FileDevice(rest, read_only=read_only)
    if scheme in ("device", "device-path"):
        from agents.backends.direct import DirectDevice, find_device_by_serial

        path = find_device_by_serial(rest) if scheme == "device" else Path(rest)
        return DirectDevice(path, read_only=read_only)
    if scheme == "rbd":
        pool, _, image = rest.partition("/")
        if not pool or not image:
            raise ConfigError("backend", "rbd backends are rbd:POOL/IMAGE")
        if not ceph_conf:
            raise ConfigError("ceph.conf", "required for an rbd backend")
        from agents.backends.librbd import RbdDevice

        return RbdDevice(ceph_conf, pool, image, ceph_user, keyring=ceph_keyring,
                         read_only=read_only)
    raise ConfigError("backend", f"unknown scheme {scheme!r} (file, device, device-path, "
                                      "rbd)")


def setup_logging(level: str) -> None:
    """One structured line per event on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        "ts=%(asctime)s level=%(levelname)s logger=%(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _write_ready(path: str, address: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    Path(tmp).write_text(address + "\n")
    os.replace(tmp, path)


def tls_material(config: AgentConfig) -> TlsFiles | None:
    """The certificate, key, fleet CA (bundle) and CRL to serve with; None only with
    ``insecure_plaintext``.

    TLS is on by default: an agent without its certificate, key and the fleet CA refuses to
    start (ConfigError), and the files must load. The certificate is presented on the
    agent's own connections too (pushes, reports: mutual TLS). The files are read again when
    they change or on SIGHUP (agents.tlsreload)."""
    if config.insecure_plaintext:
        LOG.warning("event=insecure_plaintext node=%s tls=off reason=\"insecure_plaintext = "
                    "true: grants, data and control travel in the clear; node-only routes "
                    "check no certificate\"", config.node)
        return None
    if not (config.tls_cert and config.tls_key and config.tls_ca):
        raise ConfigError("tls", "TLS is on by default: set tls.cert, tls.key and tls.ca "
                                      "(this node's certificate and key and the fleet CA, "
                                      "installed by `rbdfleet deploy` or the Ansible role), or "
                                      "insecure_plaintext = true")
    # tls.crl, else crl.pem beside the CA once `rbdfleet cert revoke` installs one
    files = TlsFiles(config.tls_ca, config.tls_cert, config.tls_key,
                     config.tls_crl or default_crl(config.tls_ca),
                     crl_required=config.tls_crl is not None)
    try:  # fail at start, not at the first connection
        server_context(files)
        client_context(files)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise ConfigError("tls", f"the certificate, key, CA or CRL does not load: {exc}") from exc
    return files


def run(config: AgentConfig) -> int:
    """Serve until SIGTERM/SIGINT; the exit code."""
    keys = read_keys(config.secret_file)
    material = tls_material(config)
    host, port = _split_address("listen", config.listen)

    def open_device(read_only: bool) -> BlockDevice:
        # A promotion re-attaches the VM's disk read-write: the guest sees it ~1 s after
        # libvirt's attach returns, so a `device:SERIAL` backend waits for it (bounded).
        deadline = time.monotonic() + DEVICE_WAIT_S
        while True:
            try:
                return open_backend(config.backend, read_only=read_only,
                                    ceph_conf=config.ceph_conf, ceph_user=config.ceph_user,
                                    ceph_keyring=config.ceph_keyring)
            except (NotFound, DeviceError) as exc:
                # udev gives a hot-plugged node its group (disk) a moment after sysfs shows
                # it: until then the agent's account may not open it (EACCES)
                pending = isinstance(exc, NotFound) or exc.fields.get("errno") == errno.EACCES
                if not pending or not config.backend.startswith("device:") \
                        or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        LOG.info("event=signal signal=%s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # Bind first: the advertised address may need the port the OS picked.
    server = AgentServer((host, port), max_body=config.max_body, tls=material)

    def on_hangup(signum: int, frame: FrameType | None) -> None:
        # rotated certificates or a new CRL: taken now rather than within CHECK_INTERVAL
        # (the reload runs outside the handler: it takes locks the interrupted code may hold)
        threading.Thread(target=_reload_tls, args=(server,), name="sighup", daemon=True).start()

    signal.signal(signal.SIGHUP, on_hangup)
    bound = int(server.server_address[1])
    local = f"{host if host != '0.0.0.0' else '127.0.0.1'}:{bound}"
    settings = AgentSettings(
        node=config.node, fleet=config.fleet, keys=keys,
        advertise=config.advertise or local, readers=dict(config.readers),
        push_grants=dict(config.push_grants),
        coordinators=config.coordinator, tls=material is not None, ca_file=config.tls_ca,
        cert_file=material.cert if material else None,
        key_file=material.key if material else None,
        crl_file=material.crl if material else None,
        ack_timeout=config.ack_timeout, retry_interval=config.retry_interval,
        tail_interval=config.tail_interval, heartbeat_interval=config.heartbeat_interval,
        selftest_interval=config.selftest_interval, idle_checkpoint=config.idle_checkpoint)
    agent = Agent(settings, open_device)
    server.agent = agent
    failed: list[RbdfleetError] = []

    def start_failed(exc: RbdfleetError) -> None:
        code = exc.code if isinstance(exc, AgentError) else type(exc).__name__
        LOG.error("event=start_failed node=%s code=%s error=%s", config.node, code, exc)
        agent.report_start_failure(exc)

    def late_start_failed(exc: RbdfleetError) -> None:  # a spare, once its disk came
        start_failed(exc)
        failed.append(exc)
        stop.set()

    try:
        agent.start(become_writer_at=config.epoch if config.role == "writer" else None,
                    on_late_failure=late_start_failed if config.role == "spare" else None)
    except RbdfleetError as exc:
        start_failed(exc)
        server.server_close()
        agent.stop()
        return 1
    thread = threading.Thread(target=serve, args=(server,), name="http", daemon=True)
    thread.start()
    LOG.info("event=serving node=%s fleet=%s role=%s epoch=%d listen=%s:%d advertise=%s tls=%s",
             config.node, config.fleet, agent.state.role, agent.state.epoch, host, bound,
             settings.advertise, "plaintext" if material is None else "mutual")
    if config.ready_file:
        _write_ready(config.ready_file, local)
    stop.wait()
    LOG.info("event=stopping node=%s", config.node)
    server.shutdown()
    agent.stop()
    server.server_close()
    LOG.info("event=stopped node=%s", config.node)
    return 1 if failed else 0


def _reload_tls(server: AgentServer) -> None:
    LOG.info("event=tls_reload_requested signal=SIGHUP")
    if server.tls_source is not None:
        server.tls_source.reload()
    reload_client_contexts()


def _is_blank(device: BlockDevice, fleet: str) -> bool:
    """True for an all-zero superblock area; False for a volume of ``fleet``.

    Anything else (another fleet's volume, foreign or damaged data) is refused: ``format
    --if-blank`` never overwrites data it does not recognise as blank.
    """
    from agents.core.superblock import SLOTS, choose
    from agents.device import ALIGN

    head = device.read_at(0, 2 * ALIGN)
    if not any(head):
        return True
    try:
        found = choose([head[s : s + ALIGN] for s in SLOTS]).fleet
    except FormatError as exc:
        raise ConfigError("backend", f"not blank and not a volume ({exc}): "
                                          "refusing to format") from exc
    if found != fleet:
        raise ConfigError("backend", f"holds a volume of fleet {found!r}, not {fleet!r}: "
                                          "refusing to format")
    return False


def _serve_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the agent")
    p.add_argument("--config", help="TOML (.toml) or JSON config file")
    p.add_argument("--coordinator", action="append", metavar="URL",
                   help="a coordinator of the fleet (repeatable: the active one and its "
                        "standbys; replaces the file's)")
    for name in ("node", "fleet", "backend", "secret-file", "listen", "advertise", "role",
                 "ceph-conf", "ceph-user", "ceph-keyring", "tls-cert", "tls-key",
                 "tls-ca", "tls-crl", "max-body", "log-level", "ready-file"):
        p.add_argument(f"--{name}", dest=name.replace("-", "_"))
    p.add_argument("--epoch", type=int)
    p.add_argument("--insecure-plaintext", action="store_true", default=None,
                   help="serve without TLS (logged as a warning; TLS is on by default)")
    for name in ("ack-timeout", "retry-interval", "tail-interval", "heartbeat-interval",
                 "selftest-interval", "idle-checkpoint"):
        p.add_argument(f"--{name}", dest=name.replace("-", "_"), type=float)
    p.add_argument("--reader", action="append", default=[], metavar="NODE=ADDRESS",
                   help="a reader the writer pushes to (repeatable; replaces the file's)")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``rbdfleet-agent`` / ``python -m agents``; returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["fsck"]:
        from agents.fsck import main as fsck_main

        return fsck_main(args_list[1:])
    parser = argparse.ArgumentParser(prog="rbdfleet-agent", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    fmt = sub.add_parser("format", help="write an empty volume on a device")
    fmt.add_argument("--backend", required=True)
    fmt.add_argument("--fleet", required=True)
    fmt.add_argument("--journal-bytes", type=int)
    fmt.add_argument("--if-blank", action="store_true",
                     help="format only a blank (all-zero) head; keep a volume of this fleet")
    fmt.add_argument("--ceph-conf")
    fmt.add_argument("--ceph-user", default="admin")
    fmt.add_argument("--ceph-keyring")
    sub.add_parser("fsck", help="check an image read-only (see: rbdfleet-agent fsck -h)")
    args = parser.parse_args(args_list)
    try:
        if args.command == "format":
            from agents.volume import Volume

            device = open_backend(args.backend, read_only=False, ceph_conf=args.ceph_conf,
                                  ceph_user=args.ceph_user, ceph_keyring=args.ceph_keyring)
            try:
                if args.if_blank and not _is_blank(device, args.fleet):
                    print(f"{args.backend} already holds a volume of fleet {args.fleet}")
                    return 0
                Volume.format(device, fleet=args.fleet, journal_bytes=args.journal_bytes)
            finally:
                device.close()
            print(f"formatted {args.backend} for fleet {args.fleet}")
            return 0
        overrides = {k: v for k, v in vars(args).items()
                     if k not in ("command", "config", "reader")}
        if args.reader:
            readers = {}
            for item in args.reader:
                node, sep, address = item.partition("=")
                if not sep:
                    raise ConfigError("reader", f"{item!r} is not NODE=ADDRESS")
                readers[node] = address
            overrides["readers"] = readers
        config = load_config(args.config, overrides)
        setup_logging(config.log_level)
        return run(config)
    except RbdfleetError as exc:
        print(f"rbdfleet-agent: {exc}", file=sys.stderr)
        return 2
