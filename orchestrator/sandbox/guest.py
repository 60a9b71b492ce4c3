"""The sandbox's guest image: a small Debian built once with debootstrap and cached.

The recipe is this module plus the files in ``guest/`` (boot scripts and their systemd
units, journald and sshd drop-ins, initramfs conf). The cache key is a hash of exactly those,
so editing the recipe rebuilds the image and nothing else does. Layout::

    /var/cache/rbdfleet/guest/
        .build.lock             flock: one builder at a time on the machine
        .build-<key>-<pid>/     work dir of the running build (removed when done)
        debs/                   debootstrap's package cache (rebuilds skip the download)
        <key>/                  finished image, appears by atomic rename only
            base.raw  vmlinuz  initrd.img  manifest.json

The guest boots the kernel directly (no bootloader) into systemd, like the Debian VMs users
run: the oneshot ``rbdfleet-guest.service`` installs its SSH host key and ``authorized_keys``
from a per-VM seed disk and takes its address from the kernel command line (``guest.ip=``)
before ``ssh.service`` starts; ``rbdfleet-ready.service`` then prints the ready marker on the
serial console. The image itself holds no key at all, so one cached image serves every
sandbox. Kept small: no recommends, the journal in memory only, and the units a sandbox VM
never needs (gettys, logind, apt and fstrim timers, first-boot prompts...) masked.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import SandboxError

__all__ = [
    "DEFAULT_CACHE_ROOT",
    "FAILED_MARKER",
    "GUEST_PACKAGES",
    "READY_MARKER",
    "SEED_SERIAL",
    "GuestImage",
    "debian_mirror",
    "ensure_guest_image",
    "kernel_cmdline",
    "recipe_key",
]

Progress = Callable[[str], None]

DEFAULT_CACHE_ROOT = Path("/var/cache/rbdfleet/guest")
RECIPE_DIR = Path(__file__).with_name("guest")
SUITE = "bookworm"
FALLBACK_MIRROR = "http://deb.debian.org/debian"
GUEST_PACKAGES = (
    "linux-image-amd64",
    "python3",
    "openssh-server",
    "util-linux",
    "iproute2",
    "kmod",
    "procps",
    "systemd-sysv",  # systemd as PID 1 (no recommends: debootstrap resolves Depends only)
    "busybox-static",  # the initramfs's shell (initramfs.conf BUSYBOX=auto)
    "zstd",  # mkinitramfs needs it in the chroot for COMPRESS=zstd
    # What a coordinator host needs from Debian (`rbdfleet coordinator install` checks for
    # them and installs only the rbdfleet package): the Ceph and libvirt bindings.
    "python3-rados",
    "python3-rbd",
    "python3-libvirt",
)
IMAGE_SIZE = "2G"
IMAGE_LABEL = "rbdfleet-root"
READY_MARKER = "RBDFLEET-GUEST-READY"
FAILED_MARKER = "RBDFLEET-GUEST-FAILED"
SEED_SERIAL = "rbdfleet-seed"

# Module trees a virtio guest never loads (rootfs ~840 -> ~320 MiB). SCSI keeps its
# top-level modules (sd_mod, virtio_scsi) and loses only the HBA driver subdirectories.
UNNEEDED_MODULE_TREES = (
    "sound",
    "drivers/gpu", "drivers/media", "drivers/infiniband", "drivers/usb", "drivers/iio",
    "drivers/staging", "drivers/hwmon", "drivers/hid", "drivers/platform",
    "drivers/net/wireless", "drivers/net/ethernet", "drivers/net/can", "drivers/bluetooth",
    "drivers/input", "drivers/isdn", "drivers/mmc", "drivers/mtd", "drivers/nfc",
    "drivers/video", "drivers/misc", "drivers/thunderbolt", "drivers/firewire",
    "drivers/pinctrl", "drivers/power", "drivers/leds", "drivers/w1", "drivers/spi",
    "drivers/i2c", "drivers/mfd",
    "net/bluetooth", "net/nfc", "net/mac80211", "net/wireless", "net/netfilter",
    "net/ipv4/netfilter", "net/ipv6/netfilter", "net/bridge/netfilter",
)
UNNEEDED_ROOTFS_PATHS = (
    "usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale",
    "usr/share/lintian", "var/cache/apt", "var/lib/apt/lists",
)
# Where each recipe file goes in the guest, and its mode.
RECIPE_INSTALL = {
    "boot": ("etc/rbdfleet/boot", 0o755),
    "ready": ("etc/rbdfleet/ready", 0o755),
    "rbdfleet-guest.service": ("etc/systemd/system/rbdfleet-guest.service", 0o644),
    "rbdfleet-ready.service": ("etc/systemd/system/rbdfleet-ready.service", 0o644),
    "journald.conf": ("etc/systemd/journald.conf.d/rbdfleet.conf", 0o644),
    "seed": ("etc/rbdfleet/seed", 0o755),
    "network": ("etc/rbdfleet/network", 0o755),
    "sshd_config": ("etc/ssh/sshd_config.d/rbdfleet.conf", 0o644),
    "initramfs.conf": ("etc/initramfs-tools/initramfs.conf", 0o644),
    "initramfs-modules": ("etc/initramfs-tools/modules", 0o644),
    "fstab": ("etc/fstab", 0o644),
}
ENABLED_UNITS = ("rbdfleet-guest.service", "rbdfleet-ready.service")
# Units that cost boot time under TCG and do nothing for a sandbox VM. systemd-firstboot
# would prompt on the console; the ConditionNeedsUpdate ones (hwdb, ldconfig, catalog...)
# would rebuild caches at the first boot of every overlay.
MASKED_UNITS = (
    "systemd-firstboot.service", "getty@.service", "serial-getty@.service",
    "getty-static.service", "systemd-logind.service", "systemd-hwdb-update.service",
    "ldconfig.service",
    "systemd-journal-catalog-update.service", "systemd-update-done.service",
    "systemd-sysusers.service", "systemd-update-utmp.service",
    "systemd-update-utmp-runlevel.service", "systemd-pstore.service",
    "systemd-binfmt.service", "proc-sys-fs-binfmt_misc.automount",
    "sys-kernel-debug.mount", "sys-kernel-tracing.mount", "sys-kernel-config.mount",
    "sys-fs-fuse-connections.mount", "dev-hugepages.mount", "dev-mqueue.mount",
    "systemd-ask-password-console.path", "systemd-ask-password-wall.path",
    "apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer",
    "e2scrub_all.timer", "e2scrub_reap.service", "fstrim.timer",
)


@dataclass(frozen=True)
class GuestImage:
    """A finished, cached guest image: boot ``kernel`` + ``initrd`` with ``base`` as vda."""

    directory: Path
    base: Path
    kernel: Path
    initrd: Path
    kernel_version: str
    key: str


def kernel_cmdline(address_cidr: str, hostname: str, gateway: str | None = None) -> str:
    """The guest kernel command line for a VM at ``address_cidr`` (e.g. ``10.87.0.11/24``).

    The ``guest.*`` parameters are read by the image's network script; the tweaks
    (``mitigations=off`` ...) cut ~15 % of the boot CPU under TCG. No ``init=``: the
    image's ``/sbin/init`` is systemd.
    """
    parts = [
        "console=ttyS0", "root=/dev/vda", "rw", "quiet", "fsck.mode=skip",
        "mitigations=off", "cryptomgr.notests", "no_timer_check", "tsc=reliable",
        f"guest.ip={address_cidr}", f"guest.hostname={hostname}",
    ]
    if gateway:
        parts.append(f"guest.gw={gateway}")
    return " ".join(parts)


def recipe_key() -> str:
    """Hash of the recipe (the ``guest/`` files and this module): the cache directory's name."""
    digest = hashlib.sha256()
    sources = [*sorted(RECIPE_DIR.iterdir()), Path(__file__)]
    for path in sources:
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


Builder = Callable[[Path, Path, Progress], None]


def ensure_guest_image(
    cache_root: Path = DEFAULT_CACHE_ROOT,
    progress: Progress | None = None,
    *,
    builder: Builder | None = None,
) -> GuestImage:
    """Return the cached guest image for the current recipe, building it first if needed.

    Safe against concurrent callers (one machine-wide build lock; the result appears by
    atomic rename) and against builders that died half-way (their work dirs are removed).
    An uncached build runs debootstrap against the host's Debian mirror: ~2 min (111 s on an
    idle 2-core machine, up to ~5 min on a busy one).
    ``builder(work, debs, progress)`` must leave a complete image in ``work/out``; the
    default is the debootstrap recipe (tests of the cache protocol pass a quick one).
    """
    build = builder or _build
    say = progress or (lambda _msg: None)
    key = recipe_key()
    final = cache_root / key
    if _complete(final):
        return _load(final)
    cache_root.mkdir(parents=True, exist_ok=True)
    os.chmod(cache_root, 0o755)
    with open(cache_root / ".build.lock", "w") as lock:
        say("guest image: waiting for the build lock")
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _complete(final):  # another builder finished while we waited
            return _load(final)
        _remove_stale_builds(cache_root)
        work = cache_root / f".build-{key}-{os.getpid()}"
        try:
            build(work, cache_root / "debs", say)
            os.chmod(work / "out", 0o755)
            os.rename(work / "out", final)
        finally:
            _remove_tree(work)
    say(f"guest image ready: {final}")
    return _load(final)


def _complete(directory: Path) -> bool:
    return (directory / "manifest.json").is_file()


def _load(directory: Path) -> GuestImage:
    manifest = json.loads((directory / "manifest.json").read_text())
    return GuestImage(
        directory=directory,
        base=directory / "base.raw",
        kernel=directory / "vmlinuz",
        initrd=directory / "initrd.img",
        kernel_version=str(manifest["kernel_version"]),
        key=directory.name,
    )


def debian_mirror(sources: Path = Path("/etc/apt/sources.list.d/debian.sources")) -> str:
    """The first ``URIs:`` of the host's deb822 Debian sources, else deb.debian.org."""
    try:
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:") and line.split()[1:]:
                return line.split()[1]
    except OSError:
        pass
    return FALLBACK_MIRROR


def _build(work: Path, debs: Path, say: Progress) -> None:
    started = time.monotonic()
    rootfs, out = work / "rootfs", work / "out"
    rootfs.mkdir(parents=True)
    out.mkdir()
    debs.mkdir(exist_ok=True)
    mirror = debian_mirror()
    say(f"guest image: debootstrap {SUITE} from {mirror} (uncached build, ~2 min)")
    _run_streaming(
        [
            "debootstrap", "--variant=minbase", f"--include={','.join(GUEST_PACKAGES)}",
            f"--cache-dir={debs}", SUITE, str(rootfs), mirror,
        ],
        say,
    )
    say("guest image: installing the recipe")
    kernel_version = _customise(rootfs)
    say(f"guest image: small initramfs for {kernel_version}")
    _run(["chroot", str(rootfs), "mkinitramfs", "-o", f"/boot/initrd.img-{kernel_version}",
          kernel_version])
    shutil.copyfile(rootfs / "boot" / f"vmlinuz-{kernel_version}", out / "vmlinuz")
    shutil.copyfile(rootfs / "boot" / f"initrd.img-{kernel_version}", out / "initrd.img")
    for booted in (rootfs / "boot").iterdir():  # booted from outside the image, never from it
        if booted.is_file() and booted.name.startswith(("vmlinuz-", "initrd.img-")):
            booted.unlink()
    say("guest image: mkfs.ext4 base.raw")
    _run(["mkfs.ext4", "-q", "-F", "-L", IMAGE_LABEL, "-E", "lazy_itable_init=1",
          "-d", str(rootfs), str(out / "base.raw"), IMAGE_SIZE])
    for artifact in out.iterdir():
        os.chmod(artifact, 0o644)
    manifest = {
        "kernel_version": kernel_version,
        "suite": SUITE,
        "mirror": mirror,
        "packages": list(GUEST_PACKAGES),
        "build_seconds": round(time.monotonic() - started, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    say(f"guest image: built in {manifest['build_seconds']} s")


def _customise(rootfs: Path) -> str:
    """Install the recipe files, strip keys and bulk; return the kernel version."""
    for name, (target, mode) in RECIPE_INSTALL.items():
        dest = rootfs / target
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(RECIPE_DIR / name, dest)
        os.chmod(dest, mode)
    units = rootfs / "etc/systemd/system"
    wants = units / "multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    for unit in ENABLED_UNITS:
        (wants / unit).unlink(missing_ok=True)
        (wants / unit).symlink_to(f"/etc/systemd/system/{unit}")
    default = units / "default.target"  # not graphical.target
    default.unlink(missing_ok=True)
    default.symlink_to("/lib/systemd/system/multi-user.target")
    for unit in MASKED_UNITS:
        (units / unit).unlink(missing_ok=True)
        (units / unit).symlink_to("/dev/null")
    # A set machine-id: an empty one would make every boot a "first boot" (presets applied).
    machine_id = rootfs / "etc/machine-id"
    if not machine_id.exists() or not machine_id.read_text().strip():
        machine_id.write_text(uuid.uuid4().hex + "\n")
    # No key of any kind in the shared image: each VM gets its own from its seed disk.
    for host_key in (rootfs / "etc/ssh").glob("ssh_host_*"):
        host_key.unlink()
    shutil.rmtree(rootfs / "root/.ssh", ignore_errors=True)
    for rel in UNNEEDED_ROOTFS_PATHS:
        path = rootfs / rel
        if path.is_dir():
            shutil.rmtree(path)
            path.mkdir()
        elif path.exists():
            path.unlink()
    versions = sorted(p.name for p in (rootfs / "lib/modules").iterdir())
    if len(versions) != 1:
        raise SandboxError(f"guest image: expected one kernel in the rootfs, found {versions}")
    kernel_version = versions[0]
    modules = rootfs / "lib/modules" / kernel_version / "kernel"
    for rel in UNNEEDED_MODULE_TREES:
        shutil.rmtree(modules / rel, ignore_errors=True)
    for hba in (modules / "drivers/scsi").iterdir():
        if hba.is_dir():
            shutil.rmtree(hba)
    _run(["chroot", str(rootfs), "depmod", "-a", kernel_version])
    return kernel_version


def _run(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        detail = result.stderr.strip()[-2000:]
        raise SandboxError(f"guest image: {argv[0]} failed (rc {result.returncode}): {detail}")


def _run_streaming(argv: list[str], say: Progress) -> None:
    """Run ``argv``, passing each output line to ``say`` (debootstrap's own progress)."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C")
    tail: list[str] = []
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            tail = [*tail[-30:], line]
            if line.startswith(("I:", "W:", "E:")):
                say(f"guest image: {line}")
    if proc.returncode != 0:
        raise SandboxError(
            f"guest image: {argv[0]} failed (rc {proc.returncode}):\n" + "\n".join(tail)
        )


def _remove_stale_builds(cache_root: Path) -> None:
    """Work dirs left by builders that died; we hold the lock, so none is live."""
    for stale in cache_root.glob(".build-*"):
        if stale.is_dir():
            _remove_tree(stale)


def _remove_tree(path: Path) -> None:
    """Remove a build dir, unmounting first what a killed debootstrap left mounted in it."""
    if not path.exists():
        return
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mounts") as mounts:
        mounted = [line.split()[1] for line in mounts]
    for point in sorted((m for m in mounted if m.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    shutil.rmtree(path)
