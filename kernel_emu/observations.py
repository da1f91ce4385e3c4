"""What one run leaves for the oracles (`RunObservations`), and the observer of CPU faults.

The other observers are the tracer (guest coverage, compares, the debug console, other port
accesses, the allocator's calls as watch events, the recent blocks; kernel_emu/tracing.py),
the dirty-page observer (kernel_emu/dirtypages.py) and the allocator-call replay
(kernel_emu/allocations.py). The machine itself, stopped where the run ended, is part of the
observations: the oracles read its registers and memory, and change nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kernel_emu.allocations import Allocation
from kernel_emu.klog import KernelLog
from kernel_emu.machine import Machine
from kernel_emu.result import Finding, StopReason


@dataclass(frozen=True)
class Fault:
    vector: int  # -1: the emulator's own error, not a CPU exception
    pc: int
    cr2: int
    rsp: int
    rbp: int


class FaultObserver:
    """The first CPU exception of a run (Unicorn reports them as interrupts; the guest's IDT
    is never used) or the emulator's refusal to go on; either ends the run."""

    def __init__(self, m: Machine) -> None:
        self.m = m
        self.fault: Fault | None = None
        self.uc_error = ""

    def reset(self) -> None:
        self.fault = None
        self.uc_error = ""

    def on_interrupt(self, uc: Any, vector: int, _user: Any) -> None:
        m = self.m
        if self.fault is None:
            self.fault = Fault(vector, m.reg("rip"), m.reg("cr2") if vector == 14 else 0,
                               m.reg("rsp"), m.reg("rbp"))
        uc.emu_stop()

    def on_emulator_error(self, error: Exception) -> None:
        m = self.m
        if self.fault is None:
            self.fault = Fault(-1, m.reg("rip"), 0, m.reg("rsp"), m.reg("rbp"))
            self.uc_error = str(error)


# slots, and not frozen: made once a run, where a frozen dataclass's __init__ (a call of
# object.__setattr__ per field) took three times as long; nothing writes it after the run
@dataclass(slots=True)
class RunObservations:
    """Everything the oracles judge one run by."""

    machine: Machine  # stopped where the run ended
    stop: StopReason
    instructions: int  # since the boot began, snapshot part included
    fault: Fault | None
    uc_error: str
    events: list[Finding]  # anomalies seen while the guest ran (allocator calls), in order
    console: bytes  # the debug console since the boot began
    ports: list[tuple[str, int, int, int]]  # other port accesses: (kind, port, size, value)
    recent_blocks: Callable[[], list[int]]  # the last blocks entered (asked for hangs only)
    stalled_at: int  # the watchdog's stop, or 0
    budget: int
    efi_main_status: int | None  # set if efi_main returned to the firmware
    firmware_console: list[str]  # text output through the firmware's console service
    # watched ranges (by start address) -> frames of the last write into each, when the run
    # was made again watching what a first run found damaged
    writers: dict[int, list[str]] = field(default_factory=dict)
    # allocations this run made and did not free, in the order they were made
    live: list[Allocation] = field(default_factory=list)
    # allocations this run made and freed, in the order they were freed
    freed: list[Allocation] = field(default_factory=list)
    # the allocator's events that did not fit in the tracer's log: with any, `live` and
    # `freed` are what the first events say, not the whole run
    events_dropped: int = 0
    # the input file (the ELF), as the kernel was given it
    file: bytes = b""
    # what the console said up to the snapshot (klog.parse_log's `base`)
    log_base: KernelLog | None = None
