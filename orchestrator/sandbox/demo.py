"""`make demo`: bring up the sandbox and run the main job on it, leaving it running.

Usage: python -m orchestrator.sandbox.demo [--dir DIR] [--vms N]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

from agents.errors import RbdfleetError
from orchestrator.sandbox import lifecycle


def say(message: str) -> None:
    print(f"demo: {message}", flush=True)


def rbd_round_trip(ceph_conf: Path, workdir: Path) -> None:
    """Write 4 MiB into a fresh RBD image from the host and read it back, byte for byte."""
    env = {**os.environ, "CEPH_CONF": str(ceph_conf)}
    payload = os.urandom(4 << 20)
    source, back = workdir / "demo-in.bin", workdir / "demo-out.bin"
    source.write_bytes(payload)
    image = f"rbd/demo-smoke-{int(time.time())}"
    subprocess.run(["rbd", "import", "--no-progress", str(source), image], env=env, check=True)
    subprocess.run(["rbd", "export", "--no-progress", image, str(back)], env=env, check=True)
    subprocess.run(["rbd", "rm", "--no-progress", image], env=env, check=True)
    same = hashlib.sha256(back.read_bytes()).hexdigest() == hashlib.sha256(payload).hexdigest()
    source.unlink()
    back.unlink()
    if not same:
        raise SystemExit("demo: the RBD round trip returned different bytes")
    say(f"wrote 4 MiB to {image} from the host and read the same bytes back")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=Path, default=lifecycle.default_dir())
    parser.add_argument("--vms", type=int, default=3)
    args = parser.parse_args(argv)
    directory = args.dir.absolute()
    try:
        if lifecycle.state_path(directory).exists():
            say(f"a sandbox is already recorded in {directory}; reusing it")
            summary = lifecycle.status(directory)["summary"]
            ceph_conf = Path(summary["ceph_conf"])
        else:
            say(f"bringing up the sandbox in {directory} (Ceph + {args.vms} VMs)")
            result = lifecycle.up(directory, lifecycle.SandboxRequest(vms=args.vms),
                                  progress=say)
            ceph_conf = result.ceph_conf
        rbd_round_trip(ceph_conf, directory)
    except RbdfleetError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 1
    subprocess.run([sys.executable, "-m", "orchestrator.cli.app", "sandbox", "status", "--dir",
                    str(directory)], check=False)
    say(f"the sandbox keeps running; stop it with: make demo-down DEMO_DIR={directory}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
