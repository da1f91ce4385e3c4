"""UEFI applications run by the emulated firmware with no input: what they print, what they
ask for that the machine lacks, never a harness exception."""

from __future__ import annotations

import struct
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


# a fault is the application's, however often it called the firmware before ---------------

def _stalls_then_null_read(stalls: int) -> bytes:
    """A PE32+ EFI application, preferred base 0x100000: BootServices->Stall(1) `stalls`
    times (each one a stop of the emulator, for the firmware's service), then `mov rax, [8]`."""
    code = b"\x53\x48\x83\xec\x20\x48\x8b\x5a\x60"  # push rbx; sub rsp,32; mov rbx,[rdx+0x60]
    code += b"\xb9\x01\x00\x00\x00\xff\x93\xf8\x00\x00\x00" * stalls  # mov ecx,1; call [rbx+248]
    code += b"\x48\x8b\x04\x25\x08\x00\x00\x00\xf4"  # mov rax, [8]; hlt
    coff = struct.pack("<HHIIIHH", 0x8664, 1, 0, 0, 0, 240, 0x22)
    optional = struct.pack("<HBBIIIIIQIIHHHHHHIIIIHHQQQQII", 0x20B, 0, 0, 0x200, 0, 0,
                           0x1000, 0x1000, 0x10_0000, 0x1000, 0x200, 0, 0, 0, 0, 0, 0, 0,
                           0x2000, 0x200, 0, 10, 0, 0x10000, 0x1000, 0x10000, 0x1000, 0, 16)
    optional += bytes(16 * 8)
    section = struct.pack("<8sIIIIIIHHI", b".text", 0x200, 0x1000, 0x200, 0x200, 0, 0, 0, 0,
                          0x6000_0020)
    headers = (b"MZ".ljust(0x3C, b"\0") + struct.pack("<I", 0x40) + b"PE\0\0" + coff
               + optional + section)
    return headers.ljust(0x200, b"\0") + code.ljust(0x200, b"\xcc")


@pytest.mark.parametrize("stalls", [0, 1, 2, 3])
def test_a_fault_after_service_calls_is_reported_as_the_application_s(
        tmp_path: Path, stalls: int) -> None:
    """Unicorn keeps an exception it believes in flight after a failed page walk of its own;
    left so, the second fault of a run came as a double fault and the third not at all."""
    app = tmp_path / "null.efi"
    app.write_bytes(_stalls_then_null_read(stalls))
    run = run_app(app, budget=10_000)
    assert run.stop == StopReason.FAULT
    assert run.fault == f"exception 14 at {0x10_1009 + 11 * stalls:#x}, address 0x8"
    assert run.calls == ["BootServices.Stall -> 0x0"] * stalls


SYSTEMD_BOOT = Path("/usr/lib/systemd/boot/efi/systemd-bootx64.efi")


@pytest.mark.skipif(not SYSTEMD_BOOT.is_file(), reason="systemd-boot-efi is not installed")
def test_systemd_boot_without_a_console_mode_faults_as_itself(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With ConOut's Mode pointer NULL, systemd-boot reads Mode->MaxMode (address 8) after
    nine service calls: a page fault of its own, reported as such."""
    from kernel_emu import firmware

    monkeypatch.setattr(firmware, "CON_OUT_MODE", 0)
    run = run_app(SYSTEMD_BOOT, budget=100_000)
    assert run.stop == StopReason.FAULT and run.fault is not None
    assert run.fault.startswith("exception 14 at ") and run.fault.endswith(", address 0x8")
