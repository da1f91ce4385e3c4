"""Oracle of leaked kernel memory, in the manner of LeakSanitizer: when the kernel stops in a
settled state (about to enter user mode, or halted after refusing the input), every allocation
this run made and did not free must still be reachable from the kernel's roots.

Roots are the kernel image's writable parts (its globals), the registers and, for a kernel
that halted, the live part of its stack (from the stop's stack pointer to the stack's top); a
kernel about to enter user mode leaves its stack behind, so there the caller passes none. An
allocation is reached when a reached region holds, at an 8-byte aligned offset, a word equal
to its payload address, which is what a Rust Box, Vec or String keeps; the allocations reached
are scanned in turn.
Scanning is conservative: a word that merely looks like a pointer keeps a leak hidden, never
invents one. Allocations made before the snapshot belong to the boot and are not judged.
"""

from __future__ import annotations

import heapq
import struct
from collections.abc import Callable, Sequence

from kernel_emu.allocations import Allocation, event_frames
from kernel_emu.image import KernelImage
from kernel_emu.machine import Machine
from kernel_emu.result import CrashClass, Finding

try:
    from kernel_emu._walk import held_words, leaks_reached
except ImportError:  # not built: the scan below, in Python
    held_words = None  # type: ignore[assignment]
    leaks_reached = None  # type: ignore[assignment]

PF_W = 2
# a block larger than this is scanned only up to it (a loaded segment's bytes, not a table)
SCAN_LIMIT = 1 << 20
# regions up to this size are read as a set of words (faster than a search per allocation)
WORDS_AT_ONCE = 1 << 16
# live allocations the native check judges at most (more: the scan below, as ever)
NATIVE_MAX_LIVE = 1 << 16
REGISTERS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12",
             "r13", "r14", "r15")


def leak_findings(m: Machine, image: KernelImage, live: Sequence[Allocation],
                  stack: tuple[int, int] | None,
                  describe: Callable[[int, bool], str],
                  registers: dict[str, int] | None = None) -> list[Finding]:
    """The first allocation of `live` nothing reachable points at (one finding at most).
    `stack`: the kernel stack's [base, top), when known; `registers`: the machine's, when
    the caller has read them already."""
    if not live:
        return []
    if registers is None:
        registers = m.registers()
    roots: list[tuple[int, int]] = [(s.vaddr, s.memsz) for s in image.segments
                                    if s.flags & PF_W]
    if stack is not None:
        rsp = registers["rsp"]
        low = rsp if stack[0] <= rsp < stack[1] else stack[0]
        roots.append((low, stack[1] - low))
    if leaks_reached is not None:
        # nothing leaked, as is nearly always so, is told natively; anything else is found
        # below, which gives the finding
        low_bank = m.banks[0]
        if leaks_reached(low_bank.buffer, low_bank.base, live, roots,
                         [registers[r] for r in REGISTERS], SCAN_LIMIT, NATIVE_MAX_LIVE):
            return []
    return leak_findings_python(live, roots, registers, m, describe)


def leak_findings_python(live: Sequence[Allocation], roots: list[tuple[int, int]],
                         registers: dict[str, int], m: Machine,
                         describe: Callable[[int, bool], str]) -> list[Finding]:
    """The whole oracle in Python: the reference, and the judge of any leak. `roots`: the
    regions scanned before any allocation (the writable segments, the live stack)."""
    pending = {a.ptr: a for a in live}
    values = {registers[r] for r in REGISTERS}
    in_registers = [pending.pop(ptr) for ptr in [p for p in pending if p in values]]
    regions = roots + [(a.ptr, min(max(a.size, 1), SCAN_LIMIT)) for a in in_registers]
    # what is reached does not depend on the order regions are scanned in, so the smallest
    # go first and the scan ends once nothing is left to find: the tables that point at a
    # loaded segment's buffer are read, the megabytes of the buffer itself seldom are
    queue = [(size, start) for start, size in regions]
    heapq.heapify(queue)
    while queue and pending:
        size, start = heapq.heappop(queue)
        data = _read(m, start, size)
        if data is None:
            continue
        for ptr in _held(data, start, pending):
            a = pending.pop(ptr)
            heapq.heappush(queue, (min(max(a.size, 1), SCAN_LIMIT), a.ptr))
    if not pending:
        return []
    first = min(pending.values(), key=lambda a: a.seq)
    frames = event_frames(first.returned, describe) if first.returned is not None else []
    return [Finding(CrashClass.MEMORY_LEAK,
                    [f"allocation #{first.seq} of {first.size:#x} bytes at {first.ptr:#x} is "
                     f"still live, but no pointer to it is left in the kernel's globals, its "
                     f"stack or what they reach ({len(pending)} such allocation"
                     f"{'s' if len(pending) > 1 else ''})"],
                    frames=frames, field="allocation.leak", pc=first.ptr)]


def _read(m: Machine, start: int, size: int) -> memoryview | None:
    """The RAM at [start, start + size), not copied (the scan only reads it)."""
    bank = m.bank_for(start, size) if size > 0 else None
    if bank is None:
        return None
    return bank.view[start - bank.base:start - bank.base + size]


def _held(data: bytes | memoryview, start: int, wanted: dict[int, Allocation]) -> list[int]:
    """The keys of `wanted` that `data` (at address `start`) holds at 8-aligned addresses:
    natively one pass over the words; in Python a small region is read as a set of words
    once, a large one searched for each key."""
    if held_words is not None:
        return held_words(data, start, list(wanted))
    return _held_python(data, start, wanted)


def _held_python(data: bytes | memoryview, start: int,
                 wanted: dict[int, Allocation]) -> list[int]:
    if len(data) <= WORDS_AT_ONCE:
        skip = -start % 8
        usable = (len(data) - skip) // 8 * 8
        if usable <= 0:
            return []
        words = set(memoryview(data)[skip:skip + usable].cast("Q"))
        return [ptr for ptr in wanted if ptr in words]
    found = bytes(data)  # searched with bytes.find
    return [ptr for ptr in wanted if _holds_word(found, start, ptr)]


def _holds_word(data: bytes, start: int, value: int) -> bool:
    """Whether `data` (at address `start`) holds `value` at an 8-aligned address."""
    needle = struct.pack("<Q", value)
    at = data.find(needle)
    while at >= 0:
        if (start + at) % 8 == 0:
            return True
        at = data.find(needle, at + 1)
    return False
