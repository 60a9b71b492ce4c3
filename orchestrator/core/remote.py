"""What a remote shell runs and returns: commands as allowlisted values, quoted in one place.

Shared by the :class:`~orchestrator.ports.RemoteShell` port, its adapters (SSH, the local
shell of the test kit) and the use cases that build commands (deploy, rollout, the demo), so
none of them has to import another's implementation.
"""

from __future__ import annotations

import enum
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from orchestrator.errors import RemoteCommandFailed

__all__ = [
    "Executable",
    "RemoteCommand",
    "RemoteResult",
    "SshHost",
    "shell_script",
    "start_detached",
]


class Executable(enum.StrEnum):
    """The programs rbdfleet may run on a host. Anything else cannot be expressed."""

    SH = "/bin/sh"
    PYTHON3 = "/usr/bin/python3"  # absolute: PATH over SSH is root's dotfiles' (pitfall 14)
    MKDIR = "mkdir"
    MV = "mv"
    RM = "rm"
    LN = "ln"
    CHMOD = "chmod"
    TAR = "tar"
    CAT = "cat"
    READLINK = "readlink"
    KILL = "kill"
    TEST = "test"
    TRUE = "true"
    HOSTNAME = "hostname"
    START_STOP_DAEMON = "start-stop-daemon"
    SYSTEMCTL = "systemctl"


@dataclass(frozen=True)
class RemoteCommand:
    """One program and its arguments, quoted only by :meth:`render`."""

    executable: Executable
    args: tuple[str, ...] = ()

    def __init__(self, executable: Executable, args: Iterable[str] = ()) -> None:
        if not isinstance(executable, Executable):
            raise ValueError(f"executable {executable!r} is not in the allowlist (Executable)")
        checked = tuple(args)
        for arg in checked:
            if not isinstance(arg, str) or "\0" in arg:
                raise ValueError(f"argument {arg!r} of {executable.value} is not a plain string")
        object.__setattr__(self, "executable", executable)
        object.__setattr__(self, "args", checked)

    def render(self) -> str:
        """The command line for the remote shell, every word quoted."""
        return shlex.join([self.executable.value, *self.args])

    def __str__(self) -> str:
        return self.render()


def shell_script(script: str) -> RemoteCommand:
    """A ``/bin/sh -c SCRIPT`` command, for the few jobs that need shell syntax."""
    return RemoteCommand(Executable.SH, ("-c", script))


class _Runs(Protocol):
    def run(self, host: SshHost, cmd: RemoteCommand, timeout: float = 30.0, *,
            check: bool = False, stdin: bytes | None = None) -> RemoteResult: ...


def start_detached(shell: _Runs, host: SshHost, cmd: RemoteCommand, *, workdir: str,
                   log_path: str, env: Mapping[str, str] | None, timeout: float) -> int:
    """``start_background`` over any shell's ``run``: ``cmd`` detached from the session in
    ``workdir``, its output appended to ``log_path``; the host-local pid.

    Shaped after pitfall 4: ``cd X || exit 1;`` (never ``&&``, which backgrounds a subshell
    that holds the channel) and every standard stream redirected. The log is appended to,
    never truncated: a restarted agent's log must keep what its killed predecessor said.
    """
    assignments = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items()
                           if k.isidentifier())
    script = (f"cd {shlex.quote(workdir)} || exit 1; {assignments} setsid nohup "
              f"{cmd.render()} >>{shlex.quote(log_path)} 2>&1 </dev/null & echo $!")
    result = shell.run(host, shell_script(script), timeout, check=True)
    pid = result.stdout.strip().splitlines()[-1:] or [""]
    if not pid[0].isdigit():
        raise RemoteCommandFailed(host.name, f"start of {cmd.executable.value} printed "
                                             f"no pid: {result.stdout!r}", rc=result.rc)
    return int(pid[0])


@dataclass(frozen=True)
class RemoteResult:
    """Exit status and decoded output of one remote command (rc -1: killed by a signal)."""

    rc: int
    stdout: str
    stderr: str


class SshHost(Protocol):
    """Anything with a name (for messages) and an address (to connect to)."""

    @property
    def name(self) -> str: ...

    @property
    def address(self) -> str: ...


def command_result(host: SshHost, cmd: RemoteCommand, rc: int, stdout: bytes, stderr: bytes, *,
                   check: bool) -> RemoteResult:
    """What every RemoteShell's ``run`` returns for a finished command (rc -1: killed by a
    signal): output decoded; with ``check`` a non-zero rc raises RemoteCommandFailed quoting the
    tail of stderr."""
    result = RemoteResult(rc, stdout.decode(errors="replace"), stderr.decode(errors="replace"))
    if check and rc != 0:
        how = "was killed by a signal" if rc == -1 else f"exited {rc}"
        raise RemoteCommandFailed(
            host.name, f"{cmd.executable.value} {how}: {result.stderr.strip()[-300:]}", rc=rc)
    return result
