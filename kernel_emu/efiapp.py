"""Runs any UEFI application on the emulated firmware: no input, no profile of its own, no
symbols needed. It runs until it returns from efi_main, halts, faults or spends its
instruction budget. The report says what it printed (ConOut and port 0xE9), which services
it called, and which ones it asked for that this machine does not provide.

This is how the emulated firmware is checked against applications others built: a harness
exception on a valid PE image is a bug of the farm's (`fuzzfarm boot --no-input`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from unicorn.unicorn_const import UC_HOOK_INTR

from kernel_emu.executor import run_guest
from kernel_emu.firmware import DEBUG_PORT, SERVICE_PORT, Firmware
from kernel_emu.image import KernelImage
from kernel_emu.machine import Machine
from kernel_emu.observations import FaultObserver
from kernel_emu.profile import load_profile
from kernel_emu.result import StopReason
from kernel_emu.tracing import PortConfig, attach_tracer

APP_BUDGET = 50_000_000
APP_LOAD_BASE = 0x10_0000
NOWHERE = (1 << 64) - 1  # an application runs until it stops by itself


@dataclass
class AppRun:
    stop: StopReason
    instructions: int
    efi_main_status: int | None
    console: str  # what it wrote through ConOut
    debug: str  # what it wrote to port 0xE9
    calls: list[str] = field(default_factory=list)  # the services it called, with the status
    unsupported: list[str] = field(default_factory=list)  # asked for, not provided
    fault: str | None = None


def run_app(path: Path, budget: int = APP_BUDGET, load_base: int = APP_LOAD_BASE) -> AppRun:
    """Load `path` at `load_base` as the firmware loads an image and run it."""
    machine_layout = load_profile("seed")  # the machine's memory layout, nothing of a kernel
    image = KernelImage(path, load_base, symbols=False)
    mem = machine_layout.memory
    m = Machine([(0, mem.ram_size), (mem.ramdisk_base, mem.ramdisk_size)])
    # No stop address at all. Given one (`until`), Unicorn walks the page of `until - 1` at
    # the end of every emu_start; a walk that fails (NOWHERE's page is never present) leaves
    # an exception "in flight" that nothing here ever delivers, so the application's next
    # fault comes as a double fault and the one after is swallowed (emu_start returns with
    # no interrupt hook called). With exit points enabled and none set it walks nothing and
    # ignores `until`.
    m.uc.ctl_exits_enabled(True)
    m.uc.ctl_set_exits([])
    fw = Firmware(m, machine_layout, image)
    fw.install()
    faults = FaultObserver(m)
    m.uc.hook_add(UC_HOOK_INTR, faults.on_interrupt)
    tracer = attach_tracer(m.uc, [(b.base, b.size) for b in m.banks], coverage=False,
                           ports=PortConfig(console=DEBUG_PORT, service=SERVICE_PORT,
                                            console_read_value=DEBUG_PORT),
                           track_writes=False)
    tracer.reset(budget)
    stop = run_guest(m, tracer, faults, fw, NOWHERE)
    fault = None
    if stop is None:
        # nothing explains the stop: not the application's doing, and said as such
        stop = StopReason.UC_ERROR
        fault = f"the emulator stopped at {m.reg('rip'):#x} for no known reason"
    if faults.fault is not None:
        f = faults.fault
        fault = f"exception {f.vector} at {f.pc:#x}" + (f", address {f.cr2:#x}"
                                                         if f.vector == 14 else "")
    elif faults.uc_error:
        fault = f"emulator stopped: {faults.uc_error}"
    return AppRun(stop, tracer.instructions, fw.state.efi_main_status,
                  "".join(fw.state.console), tracer.console().decode(errors="replace"),
                  list(fw.state.calls), list(dict.fromkeys(fw.state.unsupported)), fault)
