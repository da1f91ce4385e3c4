"""Crosscheck: every example input on both UEFI builds gives the same kernel log in the
emulator and on real firmware (QEMU + OVMF)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kernel_emu import qemu
from kernel_emu.crosscheck import crosscheck, normalise
from kernel_emu.profile import load_profile

ROOT = Path(__file__).parents[2]
EXAMPLES = sorted((ROOT / "fuzzfarm" / "examples").glob("*.elf"))


def test_what_differs_by_machine_is_normalised() -> None:
    log = ("[rxboot] ramdisk at 0x000000000dec0000, starting the kernel\n"
           "[boot] Rustux efi_main image_handle=0xf00e698 system_table=0xf5ec018\n"
           "[boot] boot services exited, memory map has 119 entries\n"
           "[boot] mem 0x000000000-0x0000a0000 type 7\n"
           "[mm] kstack base=0xfe9b000 top=0xfedb000\n"
           "[elf] bin/init at 0xdec0050, 8968 bytes\n"
           "[elf] seg 0 vaddr=0x300028 memsz=0x3 filesz=0x4 offset=0x400120 flags=0x3000f0\n"
           "[user] enter rip=0x400120 rsp=0x7fffffffefc0 cr3=0xfe5a000\n")
    assert normalise(log) == [
        "[boot] Rustux efi_main image_handle=… system_table=…",
        "[boot] boot services exited, memory map has … entries",
        "[mm] kstack base=… top=…",
        "[elf] bin/init at …, 8968 bytes",
        # the loaded segments and the entry point are never normalised
        "[elf] seg 0 vaddr=0x300028 memsz=0x3 filesz=0x4 offset=0x400120 flags=0x3000f0",
        "[user] enter rip=0x400120 rsp=0x7fffffffefc0 cr3=…",
    ]


def _qemu() -> None:
    missing = qemu.missing()
    if missing:
        pytest.skip(missing)


@pytest.mark.parametrize("kernel", ["seed", "fixed"])
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_the_emulated_boot_is_the_real_one(kernel: str, example: Path) -> None:
    _qemu()
    check = crosscheck(load_profile(kernel), example.read_bytes())
    print(f"\n{kernel} {example.name}: {len(check.emulated)} lines, emulator "
          f"{check.seconds_emulated:.2f} s, QEMU + OVMF {check.seconds_real:.1f} s")
    assert check.same, check.differences
    assert len(check.emulated) >= 10 and check.real == check.emulated
    segments = [line for line in check.real if line.startswith("[elf] seg 0 ")]
    assert len(segments) == 1
    if kernel == "seed" and example.name == "vaddr-0x300028.elf":
        assert " vaddr=0x300028 " in segments[0]  # the bug, on real firmware
        assert check.result.verdict == "crash"
    else:
        assert " vaddr=0x400000 " in segments[0]


def test_the_crosscheck_command(tmp_path: Path) -> None:
    _qemu()
    run = subprocess.run([sys.executable, "-m", "fuzzfarm.cli", "crosscheck", "--kernel",
                          "seed", str(ROOT / "fuzzfarm" / "examples" / "vaddr-0x300028.elf")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "  = [elf] seg 0 vaddr=0x300028 " in run.stdout
    assert "same kernel log on real firmware" in run.stdout


def test_crosscheck_wants_a_uefi_build() -> None:
    run = subprocess.run([sys.executable, "-m", "fuzzfarm.cli", "crosscheck", "--kernel",
                          "seed-elf", str(EXAMPLES[0])], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and "not a UEFI application" in run.stderr


def test_upstream_on_real_firmware_with_the_input_built_in(tmp_path: Path) -> None:
    """The upstream build reads bin/init from its own image: the crosscheck builds the input
    into the image file (the blob the emulator writes it over), and real firmware shows the
    same corrupted segment table for a plain gcc-built static program."""
    _qemu()
    from tests.elfs import ToolMissingError, build_static_program

    try:
        program = build_static_program(tmp_path).read_bytes()
    except ToolMissingError as e:
        pytest.skip(str(e))
    check = crosscheck(load_profile("upstream"), program)
    assert check.same, check.differences
    assert f"[elf] bin/init at …, {len(program)} bytes" in check.real
    assert any(line.startswith("[elf] seg 0 vaddr=0x300028 ") for line in check.real)
    assert check.real[-1] == "rejected: segment address not page-aligned"
