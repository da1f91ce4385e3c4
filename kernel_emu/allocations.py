"""The allocator observer: replays the allocator's entries and returns, recorded natively by
the tracer's watchpoints, and reports allocations that overlap a live one and frees of
pointers that are not live."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from kernel_emu.result import CrashClass, Finding


class WatchEvent(Protocol):
    """What is read of the tracer's watch events (kernel_emu.tracing.WatchEvent): the
    oracles, which read allocations, depend on no part of the tracer."""

    @property
    def address(self) -> int: ...
    @property
    def rip(self) -> int: ...
    @property
    def rsp(self) -> int: ...
    @property
    def rax(self) -> int: ...
    @property
    def rdx(self) -> int: ...
    @property
    def rsi(self) -> int: ...
    @property
    def frames(self) -> tuple[int, ...]: ...


@dataclass(frozen=True)
class AllocatorSites:
    """Watched addresses: allocate's first instruction, its `ret`s, deallocate's first."""

    alloc_entry: int
    alloc_returns: tuple[int, ...]
    dealloc_entry: int
    # how the allocator takes (&self, size, align) and (&self, ptr): "sysv64" (rdi, rsi, rdx)
    # or "win64" (rcx, rdx, r8), as the kernel's target passes arguments
    convention: str = "sysv64"

    @property
    def addresses(self) -> list[int]:
        return [self.alloc_entry, *self.alloc_returns, self.dealloc_entry]


class Allocation(NamedTuple):
    seq: int
    ptr: int
    size: int
    returned: WatchEvent | None = None  # allocate's return: where it was called from


def replay(events: Sequence[WatchEvent], sites: AllocatorSites,
           describe: Callable[[int, bool], str]) -> tuple[list[Finding], list[Allocation]]:
    """Findings in the order they happened, and the allocations still live at the end.

    Entry and return are paired by the stack pointer: at allocate's `ret` it is back where it
    was on entry. `describe(address, is_return_address)` symbolizes frames."""
    returns = set(sites.alloc_returns)
    pending: list[tuple[int, int]] = []  # (rsp, size)
    live: dict[int, Allocation] = {}
    starts: list[int] = []  # sorted keys of `live`, to find a neighbour that overlaps
    findings: list[Finding] = []
    seq = 0
    # the last free seen, which is what let a first-fit allocator hand out a block twice:
    # (pointer, the allocation it ended or None, the free's event)
    last_free: tuple[int, Allocation | None, WatchEvent] | None = None
    # the argument after &self: the size to allocate, or the pointer to free
    second: Callable[[WatchEvent], int] = (lambda ev: ev.rdx) if sites.convention == "win64" \
        else (lambda ev: ev.rsi)
    for ev in events:
        if ev.address == sites.alloc_entry:
            pending.append((ev.rsp, second(ev)))
        elif ev.address in returns:
            match = next((i for i in range(len(pending) - 1, -1, -1)
                          if pending[i][0] == ev.rsp), None)
            if match is None:
                continue
            _, size = pending.pop(match)
            seq += 1
            ptr = ev.rax
            if not ptr:
                continue
            other = _overlapping(live, starts, ptr, max(size, 1))
            if other is not None:
                evidence = [f"allocation #{seq} of {size:#x} bytes returned {ptr:#x}, which "
                            f"overlaps live allocation #{other.seq} at {other.ptr:#x} "
                            f"({other.size:#x} bytes)"]
                if last_free is not None:
                    evidence.append(_free_evidence(*last_free, describe))
                frames = event_frames(ev, describe)
                # an allocator that hands out a live block is wrong in itself, whoever asked:
                # the allocator names the bucket
                findings.append(Finding(
                    CrashClass.HEAP_CORRUPTION, evidence, frames=frames,
                    field="allocation.overlap", pc=ev.rip, site=frames[0].rsplit("+0x", 1)[0]))
            if ptr not in live:
                bisect.insort(starts, ptr)
            live[ptr] = Allocation(seq, ptr, size, ev)
        elif ev.address == sites.dealloc_entry:
            ptr = second(ev)
            if not ptr:
                continue
            ended = live.pop(ptr, None)
            last_free = (ptr, ended, ev)
            if ended is None:
                findings.append(Finding(
                    CrashClass.HEAP_CORRUPTION,
                    [f"free of {ptr:#x}, which is not a live allocation"],
                    frames=event_frames(ev, describe), field="free.unknown", pc=ev.rip))
            else:
                del starts[bisect.bisect_left(starts, ptr)]
    return findings, list(live.values())


def _overlapping(live: dict[int, Allocation], starts: list[int], ptr: int,
                 size: int) -> Allocation | None:
    """A live allocation sharing a byte with [ptr, ptr + size): the one starting at or before
    ptr, or the first starting inside the range."""
    i = bisect.bisect_right(starts, ptr)
    if i:
        before = live[starts[i - 1]]
        if ptr < before.ptr + max(before.size, 1):
            return before
    if i < len(starts) and starts[i] < ptr + size:
        return live[starts[i]]
    return None


def _free_evidence(ptr: int, ended: Allocation | None, ev: WatchEvent,
                   describe: Callable[[int, bool], str]) -> str:
    what = f"allocation #{ended.seq}, {ended.size:#x} bytes" if ended else "not live"
    return (f"the free before it: {ptr:#x} ({what}), from "
            + " < ".join(event_frames(ev, describe)[:6]))


def event_frames(ev: WatchEvent, describe: Callable[[int, bool], str]) -> list[str]:
    """The symbolized frames of a watch event: where it happened, then its callers."""
    return [describe(ev.rip, False)] + [describe(f, True) for f in ev.frames]
