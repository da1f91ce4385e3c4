"""UEFI applications run by the emulated firmware with no input: what they print, what they
ask for that the machine lacks, never a harness exception."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kernel_emu.efiapp import run_app
from kernel_emu.result import StopReason

ROOT = Path(__file__).parents[2]
IMAGES = ROOT / "kernel_emu" / "images"
# installed by `make test` as root (fuzzfarm/system_deps.py)
THIRD_PARTY = [Path("/boot/memtest86+x64.efi"),
               Path("/usr/lib/systemd/boot/efi/systemd-bootx64.efi")]


def test_the_boot_shim_says_the_machine_has_no_file_system() -> None:
    run = run_app(IMAGES / "rxboot.efi")
    assert run.stop == StopReason.HALT and run.fault is None
    assert "[rxboot] SimpleFileSystem failed: 0x8000000000000003" in run.debug
    assert run.calls[0] == "BootServices.HandleProtocol -> 0x0"  # its loaded image


def test_the_kernel_without_a_ramdisk_panics_as_it_should() -> None:
    run = run_app(IMAGES / "seed.efi")
    assert run.stop == StopReason.HALT
    assert "ExitBootServices -> 0x0" in run.calls
    assert "[PANIC] ramdisk descriptor has bad magic" in run.debug


@pytest.mark.parametrize("app", THIRD_PARTY, ids=lambda p: p.name)
def test_an_application_others_built_runs_until_it_says_what_it_lacks(app: Path) -> None:
    if not app.is_file():
        pytest.skip(f"{app} not installed (Debian: memtest86+, systemd-boot-efi)")
    run = run_app(app, budget=5_000_000)
    print(f"\n{app.name}: {run.stop}, {run.instructions:,} instructions, "
          f"{len(run.calls)} service calls, unsupported {run.unsupported}, fault {run.fault}, "
          f"console {run.console[:80]!r}")
    assert run.calls, "it never reached the firmware"
    # it printed, or it asked for something the machine lacks, or its fault is reported
    assert run.console.strip() or run.unsupported or run.fault


def test_the_command_line(tmp_path: Path) -> None:
    def fuzzfarm(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "fuzzfarm.cli", "boot", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)

    run = fuzzfarm("--kernel", str(IMAGES / "rxboot.efi"), "--no-input")
    assert run.returncode == 0, run.stderr
    assert "stopped: halt" in run.stdout and "SimpleFileSystem failed" in run.stdout
    (tmp_path / "x.efi").write_bytes(b"not a PE")
    for args, message in ((("--kernel", str(tmp_path / "x.efi"), "--no-input"),
                           "not a UEFI application"),
                          (("--kernel", str(IMAGES / "rxboot.efi"), "--no-input", "x.elf"),
                           "give no ELF"),
                          (("--kernel", "seed"), "needs an ELF input")):
        run = fuzzfarm(*args)
        assert run.returncode == 2 and message in run.stderr, run.stderr
        assert "Traceback" not in run.stderr
