"""The allocator observer: replays the allocator's entries and returns, recorded natively by
the tracer's watchpoints, and reports allocations that overlap a live one and frees of
pointers that are not live."""

from __future__ import annotations

import bisect
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from operator import attrgetter
from typing import NamedTuple, Protocol

from kernel_emu import redzones
from kernel_emu.redzones import GuardHit
from kernel_emu.result import CrashClass, Finding

try:
    from kernel_emu import _walk as native_walker
except ImportError:  # not built: the replay below gives the same answer, slower
    native_walker = None  # type: ignore[assignment]

# the site of heap damage that no allocation of the run explains
HEAP = "heap"


class WatchEvent(Protocol):
    """What is read of the tracer's watch events (kernel_emu.tracing.WatchEvent): the
    oracles, which read allocations, depend on no part of the tracer."""

    @property
    def address(self) -> int: ...
    @property
    def instructions(self) -> int: ...
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
    def r8(self) -> int: ...
    @property
    def frames(self) -> tuple[int, ...]: ...


@dataclass(frozen=True)
class AllocatorSites:
    """Watched addresses: the first instruction and the `ret`s of allocate, deallocate and,
    if the allocator has its own, reallocate."""

    alloc_entry: int
    alloc_returns: tuple[int, ...]
    dealloc_entry: int
    # how the allocator takes (&self, size, align), (&self, ptr) and (&self, ptr, new_size):
    # "sysv64" (rdi, rsi, rdx) or "win64" (rcx, rdx, r8), as the kernel's target passes them
    convention: str = "sysv64"
    dealloc_returns: tuple[int, ...] = ()
    realloc_entry: int | None = None
    realloc_returns: tuple[int, ...] = ()
    realloc_takes_self: bool = True

    @cached_property
    def args(self) -> redzones.Arguments:
        # asked at every run's replay: made once
        return redzones.Arguments.of(self.convention, self.realloc_takes_self)

    @cached_property
    def any_return(self) -> frozenset[int]:
        """The `ret`s of allocate and reallocate, which the replay treats alike."""
        return frozenset(self.alloc_returns) | frozenset(self.realloc_returns)

    @property
    def addresses(self) -> list[int]:
        return [address for address, _ in self.roles]

    @property
    def roles(self) -> list[tuple[int, int]]:
        """(address, role) of every site, roles as kernel_emu.redzones numbers them."""
        out = [(self.alloc_entry, redzones.ALLOC_IN),
               *((a, redzones.ALLOC_OUT) for a in self.alloc_returns),
               (self.dealloc_entry, redzones.FREE_IN),
               *((a, redzones.FREE_OUT) for a in self.dealloc_returns)]
        if self.realloc_entry is not None:
            out += [(self.realloc_entry, redzones.REALLOC_IN),
                    *((a, redzones.REALLOC_OUT) for a in self.realloc_returns)]
        return out


class Allocation(NamedTuple):
    seq: int
    ptr: int
    size: int
    # allocate's return: where the object was first allocated (a resize keeps it: the same
    # object, named by the same site)
    returned: WatchEvent | None = None
    # the return of the last resize, which made the block what it is now
    resized: WatchEvent | None = None


def replay(events: Sequence[WatchEvent], sites: AllocatorSites,
           describe: Callable[[int, bool], str],
           hits: Sequence[GuardHit] = (), freed: list[Allocation] | None = None
           ) -> tuple[list[Finding], list[Allocation]]:
    """Findings in the order they happened, and the allocations still live at the end
    (`freed`, if given, gets those freed during the run, in the order they were).

    Entry and return are paired by the stack pointer: at a `ret` it is back where it was on
    entry. `describe(address, is_return_address)` symbolizes frames. `hits`: the redzone
    hits of the run (kernel_emu.redzones), each placed before the first event it did not
    come after."""
    if not hits and native_walker is not None and events:
        fast = _replay_natively(events, sites, freed)
        if fast is not None:
            return [], fast
    returns = sites.any_return
    # (rsp, size, for a resize the pointer and the allocation it resizes)
    pending: list[tuple[int, int, int | None, Allocation | None]] = []
    live: dict[int, Allocation] = {}
    starts: list[int] = []  # sorted keys of `live`, to find a neighbour that overlaps
    findings: list[Finding] = []
    seq = 0
    # the last free seen, which is what let a first-fit allocator hand out a block twice:
    # (pointer, the allocation it ended or None, the free's event)
    last_free: tuple[int, Allocation | None, WatchEvent] | None = None
    args = sites.args
    asked_size, freed_ptr = attrgetter(args.size), attrgetter(args.free)
    resized, new_size = attrgetter(args.resized), attrgetter(args.new_size)
    waiting = sorted(hits, key=lambda hit: hit.instructions)
    h = 0

    def made(ptr: int, size: int, ev: WatchEvent, resize: bool = False,
             was: Allocation | None = None) -> None:
        """`ptr` is live with `size` bytes from `ev` on; `resize`: `ev` is a resize's return,
        `was` the allocation it resized, if known."""
        nonlocal seq
        seq += 1
        if resize and ptr in live:  # in place, or moved by its own allocate
            was = was or live[ptr]
            del live[ptr]
            del starts[bisect.bisect_left(starts, ptr)]
        other = _overlapping(live, starts, ptr, max(size, 1))
        if other is not None:
            evidence = [f"allocation #{seq} of {size:#x} bytes returned {ptr:#x}, which "
                        f"overlaps live allocation #{other.seq} at {other.ptr:#x} "
                        f"({other.size:#x} bytes)"]
            if last_free is not None:
                evidence.append(_free_evidence(*last_free, describe))
            frames = event_frames(ev, describe)
            # an allocator that hands out a live block is wrong in itself, whoever asked:
            # the allocator call that made that block live, and should have taken it off
            # its free list, names the bucket
            maker = (other.resized or other.returned or ev).rip
            findings.append(Finding(
                CrashClass.HEAP_CORRUPTION, evidence, frames=frames,
                field="allocation.overlap", pc=ev.rip,
                site=describe(maker, False).rsplit("+0x", 1)[0]))
        if ptr not in live:
            bisect.insort(starts, ptr)
        live[ptr] = Allocation(seq, ptr, size, was.returned, ev) if was is not None else \
            Allocation(seq, ptr, size, ev)

    for ev in events:
        while h < len(waiting) and waiting[h].instructions <= ev.instructions:
            findings.append(_redzone_finding(waiting[h], live, ev, describe))
            h += 1
        if ev.address == sites.alloc_entry:
            pending.append((ev.rsp, asked_size(ev), None, None))
        elif ev.address == sites.realloc_entry:
            old_ptr = resized(ev)
            pending.append((ev.rsp, new_size(ev), old_ptr, live.get(old_ptr)))
            if old_ptr and old_ptr not in live:
                findings.append(Finding(
                    CrashClass.HEAP_CORRUPTION,
                    [f"resize of {old_ptr:#x}, which is not a live allocation"],
                    frames=event_frames(ev, describe), field="realloc.unknown", pc=ev.rip))
        elif ev.address in returns:
            match = len(pending) - 1  # nearly always the innermost call
            while match >= 0 and pending[match][0] != ev.rsp:
                match -= 1
            if match < 0:
                continue
            _, asked, old_ptr, was = pending.pop(match)
            ptr = ev.rax
            if not ptr:
                continue
            if old_ptr is None:
                made(ptr, asked, ev)
                continue
            if ptr != old_ptr and old_ptr in live:  # moved, by other means than its own
                del live[old_ptr]  # allocate and free
                del starts[bisect.bisect_left(starts, old_ptr)]
            made(ptr, asked, ev, resize=True, was=was)
        elif ev.address == sites.dealloc_entry:
            ptr = freed_ptr(ev)
            if not ptr:
                continue
            ended = live.pop(ptr, None)
            last_free = (ptr, ended, ev)
            if ended is not None and freed is not None:
                freed.append(ended)
            if ended is None:
                findings.append(Finding(
                    CrashClass.HEAP_CORRUPTION,
                    [f"free of {ptr:#x}, which is not a live allocation"],
                    frames=event_frames(ev, describe), field="free.unknown", pc=ev.rip))
            else:
                del starts[bisect.bisect_left(starts, ptr)]
    for hit in waiting[h:]:  # found when the run ended
        findings.append(_redzone_finding(hit, live, None, describe))
    return findings, list(live.values())


def _replay_natively(events: Sequence[WatchEvent], sites: AllocatorSites,
                     freed: list[Allocation] | None) -> list[Allocation] | None:
    """The live allocations of a run with nothing to report, replayed natively; None when
    the native replay leaves the run to `replay`: it has something to report, or its events
    are not tuples of the tracer's fields."""
    registers = _event_registers(type(events[0]), sites.args)
    if registers is None:
        return None
    realloc = -1 if sites.realloc_entry is None else sites.realloc_entry
    out = native_walker.replay_allocations(events, sites.alloc_entry, sites.any_return,
                                           sites.dealloc_entry, realloc, registers, Allocation)
    if out is None:
        return None
    live, gone = out
    if freed is not None:
        freed.extend(gone)
    return live


@functools.cache
def _event_registers(kind: type, args: redzones.Arguments) -> tuple[int, int, int, int] | None:
    """Where in an event of type `kind` the allocator's arguments are (allocate's size,
    deallocate's pointer, reallocate's pointer and new size); None where its fields do not
    begin as the native replay reads them (address, instructions, rip, rsp, rbp, rax)."""
    fields = getattr(kind, "_fields", None)
    if fields is None or fields[:6] != ("address", "instructions", "rip", "rsp", "rbp", "rax"):
        return None
    try:
        size, free, resized, new_size = (fields.index(name) for name in args)
    except ValueError:
        return None
    return size, free, resized, new_size


def _redzone_finding(hit: GuardHit, live: dict[int, Allocation], noticed: WatchEvent | None,
                     describe: Callable[[int, bool], str]) -> Finding:
    """A write past the end (or before the start) of a live allocation, seen at the next call
    into the allocator: it is charged, as a heap overflow report charges it, to the
    allocation it ran out of, named by where that was made."""
    where = "after" if hit.after else "before"
    offset = hit.address - (hit.ptr + hit.size) if hit.after else hit.ptr - hit.address - 1
    evidence = [f"{offset:#x} bytes {where} allocation of {hit.size:#x} bytes at "
                f"{hit.ptr:#x}: {hit.address:#x} held {hit.was:#04x}, now {hit.now:#04x}"]
    owner = live.get(hit.ptr)
    frames: list[str] = []
    if owner is not None and owner.returned is not None:
        frames = event_frames(owner.returned, describe)
        evidence[0] = f"allocation #{owner.seq}: " + evidence[0]
        evidence.append("allocated by " + " < ".join(frames[1:5]))
    evidence.append("written before " + (
        "the call into the allocator from " + " < ".join(event_frames(noticed, describe)[1:5])
        if noticed is not None else "the run ended"))
    return Finding(CrashClass.HEAP_CORRUPTION, evidence, frames=frames,
                   field="block.overflow" if hit.after else "block.underflow",
                   site=None if frames else HEAP)


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
