"""Boots a UEFI application on real firmware: QEMU (TCG, no KVM needed) with OVMF, the
application as `EFI/BOOT/BOOTX64.EFI` on a FAT drive QEMU makes from a folder, and the
kernel's debug console (port 0xE9) in a file.

This is the reference the emulated boot is compared with, never part of a fuzzing run: a farm
without QEMU simply does not run it (`missing()` says what to install).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

OVMF_CANDIDATES = (Path("/usr/share/ovmf/OVMF.fd"), Path("/usr/share/qemu/OVMF.fd"))
QEMU = "qemu-system-x86_64"
MEMORY_MIB = 256
POLL = 0.1


SHIM_IMAGE = Path(__file__).parent / "images" / "rxboot.efi"


class FirmwareBootError(Exception):
    """QEMU could not be started, or ended before the application said anything."""


@dataclass(frozen=True)
class FirmwareBoot:
    log: str  # what the application wrote to port 0xE9
    seconds: float  # from starting QEMU to the end of the boot
    ended: str  # "done" (the caller's test held), "exited" (QEMU stopped) or "timeout"


def ovmf() -> Path | None:
    named = os.environ.get("FUZZFARM_OVMF")
    if named:
        return Path(named) if Path(named).is_file() else None
    return next((p for p in OVMF_CANDIDATES if p.is_file()), None)


def missing() -> str | None:
    """Why a UEFI application cannot be booted on real firmware here (None when it can)."""
    if shutil.which(QEMU) is None:
        return f"{QEMU} not found (Debian: apt-get install qemu-system-x86)"
    if ovmf() is None:
        return "OVMF firmware not found (Debian: apt-get install ovmf; or set FUZZFARM_OVMF)"
    return None


def boot(app: Path, files: dict[str, bytes] | None = None, timeout: float = 120.0,
         done: Callable[[str], bool] = lambda _log: False,
         memory_mib: int = MEMORY_MIB) -> FirmwareBoot:
    """Boot `app` with `files` (path on the drive -> contents) beside it on a machine with
    `memory_mib` MiB of RAM, until `done(log)` holds, QEMU exits or `timeout` seconds pass;
    QEMU is always stopped."""
    reason = missing()
    if reason:
        raise FirmwareBootError(reason)
    firmware = ovmf()
    assert firmware is not None
    with tempfile.TemporaryDirectory(prefix="fuzzfarm-ovmf-") as tmp:
        drive = Path(tmp) / "esp"
        (drive / "EFI" / "BOOT").mkdir(parents=True)
        shutil.copyfile(app, drive / "EFI" / "BOOT" / "BOOTX64.EFI")
        for name, data in (files or {}).items():
            target = drive / name.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        log_path = Path(tmp) / "debugcon.log"
        log_path.touch()
        cmd = [QEMU, "-machine", "q35", "-m", str(memory_mib), "-bios", str(firmware),
               "-drive", f"format=raw,file=fat:rw:{drive}", "-debugcon", f"file:{log_path}",
               "-display", "none", "-vga", "none", "-net", "none", "-serial", "none",
               "-monitor", "none", "-no-reboot"]
        started = time.monotonic()
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            raise FirmwareBootError(f"cannot start {QEMU}: {e}") from e
        ended = "timeout"
        try:
            while time.monotonic() - started < timeout:
                log = log_path.read_bytes().decode(errors="replace")
                if done(log):
                    ended = "done"
                    break
                if proc.poll() is not None:
                    ended = "exited"
                    break
                time.sleep(POLL)
        finally:
            seconds = time.monotonic() - started
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            output = proc.communicate()[0].decode(errors="replace")
        log = log_path.read_bytes().decode(errors="replace")
        if ended == "exited" and not log:
            raise FirmwareBootError(f"{QEMU} exited with {proc.returncode}: "
                                    f"{output.strip()[-500:]}")
        return FirmwareBoot(log, seconds, ended)


def boot_kernel(kernel: bytes, ramdisk: bytes, timeout: float = 120.0,
                done: Callable[[str], bool] = lambda _log: False,
                shim: Path = SHIM_IMAGE, memory_mib: int = MEMORY_MIB) -> FirmwareBoot:
    """Boot the kernel UEFI application whose file is `kernel` with `ramdisk` handed over as
    the emulated firmware hands it over (a configuration-table entry): the boot shim
    `rxboot.efi` starts from the drive, reads `rustux/ramdisk.img`, installs the entry and
    starts `rustux/kernel.efi`."""
    if not shim.is_file():
        raise FirmwareBootError(f"the boot shim {shim} is missing (fuzzfarm build-guest)")
    return boot(shim, {"rustux/kernel.efi": kernel, "rustux/ramdisk.img": ramdisk},
                timeout, done, memory_mib)
