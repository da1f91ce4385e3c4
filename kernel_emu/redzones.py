"""Heap redzones kept at the allocator's calls: the Python counterpart of
kernel_emu/native/guard.h, which the native tracer runs (see there for the reasoning).

While no allocator call runs, only payloads the allocator handed out may be written: the
`width` bytes before each live allocation and after its requested size must keep what they
held when the allocator last returned. Every call into the allocator from outside it (and the
end of a run) compares them with that copy; a difference is a hit, a write past an
allocation's end or before its start."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

WIDTH_MAX = 64
LIVE_MAX = 1024  # past it the oldest is let go (the newest are the ones being filled)
PENDING_MAX = 16
HITS_MAX = 8

# the role of an allocator site, as the native guard numbers them
ALLOC_IN, ALLOC_OUT, FREE_IN, FREE_OUT, REALLOC_IN, REALLOC_OUT = range(6)
ENTRIES = (ALLOC_IN, FREE_IN, REALLOC_IN)
# the registers a watch event records, in the native guard's numbering
REGISTERS = ("rip", "rsp", "rbp", "rax", "rdi", "rsi", "rdx", "rcx", "r8")


class Arguments(NamedTuple):
    """The registers the allocator's calls take their arguments in."""

    size: str  # allocate's
    free: str  # deallocate's pointer
    resized: str  # reallocate's pointer
    new_size: str  # and its new size

    @classmethod
    def of(cls, convention: str, realloc_takes_self: bool = True) -> Arguments:
        """After &self, as "sysv64" (rdi, rsi, rdx) or "win64" (rcx, rdx, r8) pass them; a
        reallocate without &self takes its two from the first."""
        order = ("rcx", "rdx", "r8") if convention == "win64" else ("rdi", "rsi", "rdx")
        resize = order[1:] if realloc_takes_self else order[:2]
        return cls(order[1], order[1], *resize)
_U64 = (1 << 64) - 1


class GuardHit(NamedTuple):
    """A redzone byte found changed: at the allocator call (or end of run) whose check ran
    when `instructions` had run; `ptr`/`size` the allocation, `address` its first changed
    byte (the one nearest the payload), `after` past the end (else before the start)."""

    instructions: int
    ptr: int
    size: int
    address: int
    after: bool
    was: int
    now: int


@dataclass
class _Block:
    ptr: int
    size: int
    age: int = 0
    lo: int = 0
    hi: int = 0
    before: bytes = b""
    after: bytes = b""


@dataclass
class Redzones:
    width: int
    args: Arguments
    sites: dict[int, int]  # address -> role
    # read(address, size) -> the bytes, or None where nothing is mapped
    read: Callable[[int, int], bytes | None]
    live: list[_Block] = field(default_factory=list)  # sorted by ptr
    pending: list[tuple[int, int, int, int]] = field(default_factory=list)
    hits: list[GuardHit] = field(default_factory=list)
    hits_dropped: int = 0
    unguarded: int = 0
    made: int = 0

    def clear(self) -> None:
        self.live.clear()
        self.pending.clear()
        self.hits.clear()
        self.hits_dropped = self.unguarded = self.made = 0

    def event(self, address: int, regs: dict[str, int], instructions: int) -> None:
        role = self.sites.get(address)
        if role is None:
            return
        if role in ENTRIES:
            args = self.args
            first, second = (regs[args.size], 0) if role == ALLOC_IN else \
                (regs[args.free], 0) if role == FREE_IN else \
                (regs[args.resized], regs[args.new_size])
            if not self.pending:
                self.check(instructions)
            if role == FREE_IN:
                self._forget(first)
            if len(self.pending) < PENDING_MAX:
                self.pending.append((regs["rsp"], role, first, second))
            return
        k = len(self.pending)
        while k and self.pending[k - 1][0] != regs["rsp"]:
            k -= 1
        if not k:
            return
        _, called, a, b = self.pending[k - 1]
        del self.pending[k - 1:]
        ret = regs["rax"]
        if called == ALLOC_IN and ret:
            self._keep(ret, a)
        elif called == REALLOC_IN and ret:
            if ret != a:
                self._forget(a)
            self._keep(ret, b)
        if not self.pending:
            for i in range(len(self.live)):
                self._copy(i)

    def check(self, instructions: int) -> None:
        for i, b in enumerate(self.live):
            end = b.ptr + b.size
            changed = False
            now = self.read(b.lo, b.ptr - b.lo) if b.ptr > b.lo else None
            if now is not None and now != b.before:
                k = max(j for j in range(len(now)) if now[j] != b.before[j])
                self._hit(instructions, b, b.lo + k, False, b.before[k], now[k])
                changed = True
            now = self.read(end, b.hi - end) if b.hi > end else None
            if now is not None and now != b.after:
                k = next(j for j in range(len(now)) if now[j] != b.after[j])
                self._hit(instructions, b, end + k, True, b.after[k], now[k])
                changed = True
            if changed:
                self._copy(i)

    def _hit(self, instructions: int, b: _Block, address: int, after: bool, was: int,
             now: int) -> None:
        if len(self.hits) == HITS_MAX:
            self.hits_dropped += 1
            return
        self.hits.append(GuardHit(instructions, b.ptr, b.size, address, after, was, now))

    def _copy(self, i: int) -> None:
        b, w = self.live[i], self.width
        lo = max(b.ptr - w, 0)
        end = b.ptr + b.size
        hi = min(end + w, _U64)
        if end > _U64:
            end = hi = _U64
        if i > 0:
            p = self.live[i - 1]
            pend = min(p.ptr + p.size, _U64)
            if pend > lo:
                lo = min(pend, b.ptr)
        if i + 1 < len(self.live):
            n = self.live[i + 1]
            if n.ptr < hi:
                hi = max(n.ptr, end)
        b.lo, b.hi = lo, hi
        before = self.read(lo, b.ptr - lo) if b.ptr > lo else b""
        after = self.read(end, hi - end) if hi > end else b""
        if before is None:
            b.lo, before = b.ptr, b""
        if after is None:
            b.hi, after = end, b""
        b.before, b.after = before, after

    def _find(self, ptr: int) -> int:
        return bisect.bisect_left(self.live, ptr, key=lambda b: b.ptr)

    def _forget(self, ptr: int) -> None:
        i = self._find(ptr)
        if i < len(self.live) and self.live[i].ptr == ptr:
            del self.live[i]

    def _keep(self, ptr: int, size: int) -> None:
        i = self._find(ptr)
        if i < len(self.live) and self.live[i].ptr == ptr:
            self.live[i].size = size
            return
        if len(self.live) == LIVE_MAX:
            del self.live[min(range(len(self.live)), key=lambda k: self.live[k].age)]
            self.unguarded += 1
            i = self._find(ptr)
        self.live.insert(i, _Block(ptr, size, self.made, ptr, ptr + size))
        self.made += 1


def check_sites(width: int, sites: Sequence[tuple[int, int]], args: Arguments) -> dict[int, int]:
    if not 0 <= width <= WIDTH_MAX:
        raise ValueError(f"a redzone is at most {WIDTH_MAX} bytes")
    for name in args:
        if name not in REGISTERS:
            raise ValueError(f"no watched register {name!r}")
    out: dict[int, int] = {}
    for address, role in sites:
        if role not in range(6):
            raise ValueError(f"unknown allocator site role {role}")
        out[address] = role
    return out
