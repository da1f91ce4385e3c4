"""Resume an exported snapshot of the farm's machine under a plain Unicorn, run one input.

Standalone on purpose: the race's competitors run this with their own interpreter and their
own Unicorn (another version, in another virtualenv), so it imports nothing but the standard
library and `unicorn`. What it knows of the kernel comes from the export (`machine.json` and
the page files beside it, written by `fuzzfarm/race_export.py`):

* memory: per RAM bank its base, size and non-zero pages;
* the CPU: general registers, RIP, RFLAGS, CR0/CR2/CR3/CR4, EFER and the other MSRs (FS/GS
  base, ...), GDTR/IDTR, segment selectors, XMM registers and MXCSR;
* the input: per guest range written for an input, the bytes before the input (a template),
  the length fields patched into it (value = input length + addend) and where the input's
  own bytes go; the largest input that fits;
* stops: the success point (the kernel's `iretq` into ring 3), the panic handler, the
  exception handlers the guest's IDT names; and the instruction budget of a run.

An outcome is one of:

* ``user``  -- the kernel reached the success point (it loaded the input and enters ring 3);
* ``halt``  -- it stopped on `hlt` without reaching the panic handler (a clean rejection);
* ``panic`` -- it reached the panic handler;
* ``fault`` -- a CPU exception: Unicorn refused to go on (an exception the guest raised, an
  unmapped or protected access, an invalid instruction), or a handler the IDT names was
  reached;
* ``hang``  -- the budget of instructions ran out first.

``panic``, ``fault`` and ``hang`` are crashes for the competitors; ``user`` and ``halt`` are
not (a competitor sees nothing of what the kernel did wrong on the way to ring 3).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unicorn import Uc, UcError
from unicorn import x86_const as X
from unicorn.unicorn_const import UC_ARCH_X86, UC_HOOK_BLOCK, UC_MODE_64, UC_PROT_ALL

PAGE = 0x1000
CRASHES = ("panic", "fault", "hang")
GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11",
        "r12", "r13", "r14", "r15")
CONTROL = ("cr0", "cr2", "cr3", "cr4")
SELECTORS = ("cs", "ss", "ds", "es", "fs", "gs")
EFER = 0xC000_0080


def reg_id(name: str) -> int:
    return int(getattr(X, f"UC_X86_REG_{name.upper()}"))


@dataclass(frozen=True)
class Outcome:
    kind: str  # user | halt | panic | fault | hang
    pc: int
    detail: str = ""

    @property
    def crash(self) -> bool:
        return self.kind in CRASHES


class Field:
    __slots__ = ("addend", "offset", "size")

    def __init__(self, offset: int, size: int, addend: int) -> None:
        self.offset, self.size, self.addend = offset, size, addend


class InputRange:
    """One guest range an input is written to."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.address = int(spec["address"])
        self.template = bytes.fromhex(spec["template"])
        self.fields = [Field(*f) for f in spec["fields"]]
        self.data_offset = spec["data_offset"]  # None: the input's bytes do not go here

    def encode(self, data: bytes) -> bytes:
        out = bytearray(self.template)
        for f in self.fields:
            value = (len(data) + f.addend) & ((1 << (8 * f.size)) - 1)
            out[f.offset:f.offset + f.size] = value.to_bytes(f.size, "little")
        if self.data_offset is not None:
            out[self.data_offset:] = data
        return bytes(out)


class Export:
    """An exported snapshot, read from its directory."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory)
        self.spec: dict[str, Any] = json.loads((self.dir / "machine.json").read_text())
        s = self.spec
        self.success = int(s["stops"]["success"])
        self.panic = {int(a) for a in s["stops"]["panic"]}
        self.handlers = {int(a) for a in s["stops"]["fault_handlers"]}
        self.budget = int(s["budget"])
        self.inputs = [InputRange(r) for r in s["input"]["ranges"]]
        self.max_input = int(s["input"]["max_size"])
        self.entry = int(s["registers"]["rip"])
        self.stopped_at = 0  # the handler a hook stopped the last run at

    def pages(self, bank: dict[str, Any]) -> list[tuple[int, bytes]]:
        raw = (self.dir / bank["file"]).read_bytes()
        return [(int(index), raw[i * PAGE:(i + 1) * PAGE])
                for i, index in enumerate(bank["pages"])]

    def machine(self) -> Uc:
        """A new Unicorn holding the snapshot's memory and CPU state, ready to run."""
        s = self.spec
        uc = Uc(UC_ARCH_X86, UC_MODE_64)
        # the farm's CPU model (Unicorns differ in their default: without NX, say, EFER.NXE
        # would not stick and every NX page table entry would fault)
        uc.ctl_set_cpu_model(int(getattr(X, f"UC_CPU_X86_{s['cpu_model']}")))
        for bank in s["banks"]:
            base = int(bank["base"])
            uc.mem_map(base, int(bank["size"]), UC_PROT_ALL)
            for index, page in self.pages(bank):
                uc.mem_write(base + index * PAGE, page)
        regs = s["registers"]
        # paging and long mode first: loading a selector reads its descriptor from the GDT
        uc.msr_write(EFER, int(s["msrs"][str(EFER)]))
        uc.reg_write(reg_id("cr3"), int(regs["cr3"]))
        uc.reg_write(reg_id("cr4"), int(regs["cr4"]))
        uc.reg_write(reg_id("cr0"), int(regs["cr0"]))
        uc.reg_write(reg_id("cr2"), int(regs["cr2"]))
        for table in ("gdtr", "idtr"):
            base, limit = s["tables"][table]
            uc.reg_write(reg_id(table), (0, int(base), int(limit), 0))
        for name in SELECTORS:
            uc.reg_write(reg_id(name), int(s["selectors"][name]))
        for msr, value in s["msrs"].items():
            if int(msr) != EFER:
                uc.msr_write(int(msr), int(value))
        for name in GPRS:
            uc.reg_write(reg_id(name), int(regs[name]))
        for name, value in s["vector"].items():
            uc.reg_write(reg_id(name), int(value))
        uc.reg_write(reg_id("rflags"), int(regs["rflags"]))
        uc.reg_write(reg_id("rip"), int(regs["rip"]))
        # the panic handler and the exception handlers stop the run where they start (a hook
        # on each address alone: no other instruction pays for it). Unicorn's multiple exits
        # would do, but an exit on the first byte of a page makes it raise a page fault there
        self.stopped_at = 0
        for address in sorted({*self.panic, *self.handlers}):
            uc.hook_add(UC_HOOK_BLOCK, self._stop_here, None, address, address)
        return uc

    def _stop_here(self, uc: Uc, address: int, _size: int, _user: Any) -> None:
        self.stopped_at = address
        uc.emu_stop()

    # one input -------------------------------------------------------------------------
    def fits(self, data: bytes) -> bool:
        return len(data) <= self.max_input

    def place(self, uc: Uc, data: bytes) -> None:
        for r in self.inputs:
            uc.mem_write(r.address, r.encode(data))

    def start(self, uc: Uc) -> UcError | None:
        """Run from the snapshot's RIP to a stop or the budget; the emulator's error, if any."""
        self.stopped_at = 0
        try:
            uc.emu_start(self.entry, self.success, 0, self.budget)
        except UcError as e:
            return e
        return None

    def outcome(self, uc: Uc, error: Any = None) -> Outcome:
        """What the run that just ended did; `error`: the emulator's error (a UcError or an
        error code), if it raised one."""
        pc = int(uc.reg_read(reg_id("rip")))
        if error:
            return Outcome("fault", pc, str(error))
        if pc == self.success:
            return Outcome("user", pc)
        if self.stopped_at in self.panic:
            return Outcome("panic", pc)
        if self.stopped_at in self.handlers:
            return Outcome("fault", pc, "exception handler reached")
        if uc.mem_read(pc - 1, 1) == b"\xf4":
            return Outcome("halt", pc)
        return Outcome("hang", pc, f"{self.budget} instructions")

    def run(self, uc: Uc, data: bytes) -> Outcome:
        self.place(uc, data)
        return self.outcome(uc, self.start(uc))
