"""``ParamikoShell``: run commands and write files on hosts over SSH with pinned host keys.

The only module that imports paramiko. What it guarantees and what it does not:

- **Commands are values.** A :class:`RemoteCommand` names an allowlisted :class:`Executable`
  and its arguments; it is quoted in one place (:meth:`RemoteCommand.render`) and compares
  by value, so callers and tests reason about commands, not strings.
- **Host keys are pinned.** Only keys in the configured ``known_hosts`` are accepted
  (paramiko's ``RejectPolicy``); an address with no pinned key is refused before connecting,
  a changed key raises :class:`~orchestrator.errors.HostKeyMismatch`.
- **Targets are guarded.** Before every connection the address must be loopback or inside a
  subnet routed to a local bridge (``ip route get``), so test traffic never leaves the
  machine; production callers pass ``target_guard=allow_any_target`` explicitly.
- **Every wait has a bound**: connect, banner and auth timeouts, keepalive on the transport,
  and a deadline per command. A command that outlives its deadline is reported as
  :class:`~orchestrator.errors.HostUnreachable`; it may still be running on the host.
- **Errors are translated once** (:func:`translate_ssh_errors`) into ``orchestrator.errors``;
  callers never see a paramiko or socket exception.
- Connections are reused per address; a cached connection found dead when opening a channel
  is replaced once (nothing has run on it yet), never after a command started.
- File writes are atomic on the host: a temporary name (mode 0600 before any byte is
  written), chmod, then ``posix-rename`` over the target.

:class:`RemoteForwards` is the other use of SSH: ports on a host's loopback carried back to
sockets of this machine (``ssh -R``), kept across the host's reboots.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import secrets
import select
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agents.errors import BindingUnavailable
from orchestrator.config import SshConfig
from orchestrator.core.remote import (
    RemoteCommand,
    RemoteResult,
    SshHost,
    command_result,
    start_detached,
)
from orchestrator.errors import (
    ConfigError,
    HostKeyMismatch,
    HostUnreachable,
    RemoteCommandFailed,
    RemoteError,
    UnsafeTarget,
)

try:
    import paramiko
except ImportError:  # reported as BindingUnavailable when a shell is made
    paramiko = None

__all__ = [
    "Opener",
    "ParamikoShell",
    "RemoteForwards",
    "allow_any_target",
    "require_local_target",
    "translate_ssh_errors",
]

# errno values an SFTP server reports about the file itself (not the connection).
_FILE_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR,
                errno.EEXIST, errno.ENOSPC, errno.EROFS, errno.ENOTEMPTY}


# --- target guard ----------------------------------------------------------------------------


def allow_any_target(address: str) -> None:
    """Guard for production fleets whose VMs sit behind routers: accept every address."""


def require_local_target(address: str) -> None:
    """Refuse an address unless it is loopback or routed to a local bridge (notes pitfall 8).

    An unreachable guard route, a default gateway, a public address or a hostname (resolve it
    yourself, on purpose) are all refused with :class:`UnsafeTarget`.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError as exc:
        raise UnsafeTarget(address, "not an IP address; refusing to resolve names") from exc
    if ip.is_loopback:
        return
    if not ip.is_private:
        raise UnsafeTarget(address, "not a private address; refusing to connect")
    proc = subprocess.run(["ip", "-j", "route", "get", str(ip)], capture_output=True, text=True,
                          timeout=10, check=False)
    if proc.returncode != 0:
        raise UnsafeTarget(address, f"no route: {proc.stderr.strip()}")
    route = json.loads(proc.stdout)[0]
    if route.get("type") == "local":
        return
    dev = str(route.get("dev", ""))
    if "gateway" in route or not dev or not Path("/sys/class/net", dev, "bridge").is_dir():
        via = route.get("gateway", "") or dev
        raise UnsafeTarget(address, f"routed via {via}, not a local bridge; refusing to connect")


# --- error translation -----------------------------------------------------------------------


@contextmanager
def translate_ssh_errors(host: str) -> Iterator[None]:
    """Turn every paramiko/socket error into the project's tree, cause chained."""
    try:
        yield
    except RemoteError:
        raise
    except TimeoutError as exc:
        raise HostUnreachable(host, "timed out") from exc
    except OSError as exc:
        if exc.errno in _FILE_ERRNOS and not isinstance(exc, ConnectionError):
            raise RemoteCommandFailed(host, f"file operation failed: {exc.strerror or exc}",
                                      rc=-exc.errno) from exc
        raise HostUnreachable(host, str(exc) or type(exc).__name__) from exc
    except EOFError as exc:
        raise HostUnreachable(host, "connection closed") from exc
    except Exception as exc:
        if paramiko is None:
            raise
        if isinstance(exc, paramiko.BadHostKeyException):
            raise HostKeyMismatch(host, "host key differs from the pinned one "
                                        f"(got {exc.key.get_name()} {exc.key.fingerprint}, "
                                        f"pinned {exc.expected_key.fingerprint})") from exc
        if isinstance(exc, paramiko.AuthenticationException):
            raise RemoteError(host, f"authentication failed: {exc}") from exc
        if isinstance(exc, paramiko.SSHException):
            raise HostUnreachable(host, f"ssh: {exc}") from exc
        raise


# --- the shell -------------------------------------------------------------------------------


@dataclass
class _Connection:
    lock: threading.Lock = field(default_factory=threading.Lock)
    client: Any = None  # paramiko.SSHClient, reused while its transport is active


class ParamikoShell:
    """Run :class:`RemoteCommand` values and write files on hosts, one connection per host."""

    def __init__(self, *, user: str, key_file: Path, known_hosts: Path, port: int = 22,
                 connect_timeout: float = 5.0, keepalive: int = 2,
                 target_guard: Callable[[str], None] = require_local_target) -> None:
        if paramiko is None:
            raise BindingUnavailable("paramiko", "python3-paramiko")
        self.user = user
        self.key_file = key_file
        self.known_hosts = known_hosts
        self.port = port
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive
        self.target_guard = target_guard
        self._lock = threading.Lock()
        self._connections: dict[str, _Connection] = {}

    @classmethod
    def from_config(cls, ssh: SshConfig, **options: Any) -> ParamikoShell:
        """A shell with the ``[ssh]`` table's user, key and pinned known_hosts."""
        if ssh.key is None or ssh.known_hosts is None:
            raise ConfigError("ssh.key", "ssh.key and ssh.known_hosts are required for SSH")
        return cls(user=ssh.user, key_file=ssh.key, known_hosts=ssh.known_hosts, **options)

    # public --------------------------------------------------------------------------------

    def run(self, host: SshHost, cmd: RemoteCommand, timeout: float = 30.0, *,
            check: bool = False, stdin: bytes | None = None) -> RemoteResult:
        """Run ``cmd`` on ``host``; ``check`` turns a non-zero exit into RemoteCommandFailed.

        ``timeout`` bounds the whole command; past it, HostUnreachable (the command may still
        run there).
        """
        deadline = time.monotonic() + timeout
        with translate_ssh_errors(host.name):
            chan = self._with_channel(host, lambda c: c.get_transport().open_session(
                timeout=self.connect_timeout))
            try:
                chan.exec_command(cmd.render())
                if stdin:
                    chan.sendall(stdin)
                chan.shutdown_write()
                rc, out, err = _collect(chan, deadline)
                # No exit status: the server closed the channel cleanly (EOF first) when the
                # command died of a signal (paramiko ignores "exit-signal"); without an EOF
                # the connection itself was lost.
                ended_by_signal = rc < 0 and chan.eof_received
            finally:
                chan.close()
        if rc < 0 and not ended_by_signal:
            raise HostUnreachable(host.name, f"connection lost while running {cmd.executable}")
        return command_result(host, cmd, -1 if ended_by_signal else rc, out, err, check=check)

    def put_file(self, host: SshHost, source: Path | bytes, remote_path: str,
                 mode: int = 0o644, timeout: float = 60.0) -> None:
        """Write ``source`` to ``remote_path`` atomically (temp name, chmod, rename).

        The parent directory must exist. The temp file is 0600 before any byte is written,
        so a secret is never readable by others, even for a moment.
        """
        data = source.read_bytes() if isinstance(source, Path) else source
        tmp = f"{remote_path}.rbdfleet-tmp-{secrets.token_hex(4)}"
        with translate_ssh_errors(host.name):
            sftp = self._with_channel(host, lambda c: c.open_sftp())
            try:
                sftp.get_channel().settimeout(timeout)
                try:
                    with sftp.open(tmp, "wb") as remote:
                        remote.chmod(0o600)
                        remote.set_pipelined(True)
                        remote.write(data)
                    sftp.chmod(tmp, mode)
                    sftp.posix_rename(tmp, remote_path)
                except BaseException:
                    with suppress(Exception):
                        sftp.remove(tmp)
                    raise
            finally:
                sftp.close()

    def start_background(self, host: SshHost, cmd: RemoteCommand, *, workdir: str,
                         log_path: str, env: Mapping[str, str] | None = None,
                         timeout: float = 30.0) -> int:
        """Start ``cmd`` detached on ``host`` (survives the SSH session); return its pid.

        The pid is the host's own (namespace-local on test hosts); see :func:`start_detached`.
        """
        return start_detached(self, host, cmd, workdir=workdir, log_path=log_path, env=env,
                              timeout=timeout)

    def disconnect(self, host: SshHost) -> None:
        """Close the cached connection to ``host`` (the next call reconnects)."""
        with self._lock:
            conn = self._connections.pop(host.address, None)
        if conn is not None and conn.client is not None:
            conn.client.close()

    def close(self) -> None:
        """Close every connection."""
        with self._lock:
            connections, self._connections = self._connections, {}
        for conn in connections.values():
            if conn.client is not None:
                conn.client.close()

    def __enter__(self) -> ParamikoShell:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # internals -----------------------------------------------------------------------------

    def _with_channel(self, host: SshHost, opener: Callable[[Any], Any]) -> Any:
        """``opener(client)`` on the cached client; on a dead cached one, reconnect once."""
        client, fresh = self._client(host)
        try:
            return opener(client)
        except (paramiko.SSHException, EOFError, OSError):
            if fresh:
                raise
        # The cached connection died (crash, long partition): nothing ran on it yet.
        self.disconnect(host)
        client, _ = self._client(host)
        return opener(client)

    def _client(self, host: SshHost) -> tuple[Any, bool]:
        with self._lock:
            conn = self._connections.setdefault(host.address, _Connection())
        with conn.lock:
            transport = conn.client.get_transport() if conn.client is not None else None
            if transport is not None and transport.is_active():
                return conn.client, False
            if conn.client is not None:
                conn.client.close()
                conn.client = None
            conn.client = self._connect(host)
            return conn.client, True

    def _connect(self, host: SshHost) -> Any:
        self.target_guard(host.address)
        pinned = paramiko.HostKeys()
        try:
            pinned.load(str(self.known_hosts))
        except OSError as exc:
            raise HostKeyMismatch(host.name, f"cannot read known_hosts {self.known_hosts}: "
                                             f"{exc.strerror}") from exc
        lookup = host.address if self.port == 22 else f"[{host.address}]:{self.port}"
        if pinned.lookup(lookup) is None:
            raise HostKeyMismatch(host.name, f"no pinned host key for {lookup} in "
                                             f"{self.known_hosts}; refusing to connect")
        client = paramiko.SSHClient()
        client.load_system_host_keys(str(self.known_hosts))  # read-only: never written back
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            client.connect(host.address, port=self.port, username=self.user,
                           key_filename=str(self.key_file), timeout=self.connect_timeout,
                           banner_timeout=self.connect_timeout,
                           auth_timeout=self.connect_timeout, look_for_keys=False,
                           allow_agent=False)
            client.get_transport().set_keepalive(self.keepalive)
        except BaseException:
            client.close()
            raise
        return client


def _collect(chan: Any, deadline: float) -> tuple[int, bytes, bytes]:
    """Read stdout and stderr until the command ends; -1 if the connection dropped first."""
    out, err = bytearray(), bytearray()
    fileno = chan.fileno()  # readable when either stream has data, or at EOF/close
    while True:
        while chan.recv_ready():
            out += chan.recv(65536)
        while chan.recv_stderr_ready():
            err += chan.recv_stderr(65536)
        remaining = deadline - time.monotonic()
        if chan.exit_status_ready() and (chan.eof_received or chan.closed):
            return chan.recv_exit_status(), bytes(out), bytes(err)
        if chan.closed:
            return -1, bytes(out), bytes(err)
        if remaining <= 0:
            raise TimeoutError("command deadline passed")
        if chan.eof_received:
            # The pipe stays readable after EOF: wait for the exit status itself.
            chan.status_event.wait(min(remaining, 1.0))
            if not chan.exit_status_ready() and not chan.get_transport().is_active():
                return -1, bytes(out), bytes(err)
        else:
            select.select([fileno], [], [], min(remaining, 1.0))


Opener = Callable[[], Any]  # a connected socket.socket


class RemoteForwards:
    """Ports on ``address``'s 127.0.0.1 whose connections are carried to sockets of this
    machine (``ssh -R``): ``forwards()`` maps each port to what opens its socket here, and
    is asked again at every connection. The SSH connection (pinned host key, key login, the
    target guard) is kept: when it drops it is made again every second until the host
    answers, and the forwards asked for again. :attr:`connected` is set while they are in
    place; :attr:`connections` counts how often they were set up."""

    def __init__(self, address: str, user: str, key: Path, known_hosts: Path,
                 forwards: Callable[[], Mapping[int, Opener]], *,
                 target_guard: Callable[[str], None] = require_local_target) -> None:
        if paramiko is None:
            raise BindingUnavailable("paramiko", "pip install paramiko")
        self.address = address
        self._user, self._key, self._known_hosts = user, key, known_hosts
        self._forwards, self._guard = forwards, target_guard
        self._stop = threading.Event()
        self.connected = threading.Event()
        self.connections = 0
        self._thread = threading.Thread(target=self._keep, name=f"forwards-{address}",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _keep(self) -> None:
        while not self._stop.is_set():
            with suppress(OSError, paramiko.SSHException, RemoteError, UnsafeTarget):
                self._serve_once()
            self.connected.clear()
            self._stop.wait(1.0)

    def _serve_once(self) -> None:
        self._guard(self.address)
        client = paramiko.SSHClient()
        client.load_host_keys(str(self._known_hosts))
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            client.connect(self.address, username=self._user, key_filename=str(self._key),
                           timeout=5, banner_timeout=10, auth_timeout=10,
                           look_for_keys=False, allow_agent=False)
            transport = client.get_transport()
            if transport is None:
                return
            transport.set_keepalive(2)
            openers = dict(self._forwards())
            for port in openers:
                # paramiko keeps one handler per connection (the last one given), told which
                # forwarded port each channel came in on
                transport.request_port_forward("127.0.0.1", port, handler=_forwarder(openers))
            self.connections += 1
            self.connected.set()
            while transport.is_active() and not self._stop.wait(0.5):
                pass
        finally:
            client.close()


def _forwarder(openers: Mapping[int, Opener]) -> Callable[..., None]:
    """paramiko's handler of the forwarded ports: each connection pumped to the socket of its
    port (``server``: the address and port it came in on) in a thread of its own (the
    handler runs on the transport's thread and must not block)."""
    def accept(channel: Any, origin: Any, server: tuple[str, int]) -> None:
        opener = openers.get(server[1])
        if opener is None:
            channel.close()
            return
        threading.Thread(target=_pump, args=(channel, opener), daemon=True).start()

    return accept


def _pump(channel: Any, opener: Opener) -> None:
    """Copy bytes both ways between a forwarded channel and a new socket until either side
    closes."""
    try:
        sock = opener()
    except OSError:
        channel.close()
        return
    try:
        while not channel.closed:
            readable, _, _ = select.select([channel, sock], [], [], 5.0)
            if channel in readable:
                data = channel.recv(_FORWARD_CHUNK)
                if not data:
                    break
                sock.sendall(data)
            if sock in readable:
                data = sock.recv(_FORWARD_CHUNK)
                if not data:
                    break
                channel.sendall(data)
    except OSError:
        pass
    finally:
        sock.close()
        channel.close()


_FORWARD_CHUNK = 65536
