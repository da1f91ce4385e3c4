"""Heap redzones: a write past an allocation is caught at the next call into the allocator,
by the Python guard on hand-made calls and by both tracers on the real kernel."""

from __future__ import annotations

import pytest

from kernel_emu.elflayout import ELF64_EHDR, ELF64_PHDR_SIZE
from kernel_emu.executor import Executor
from kernel_emu.profile import load_profile
from kernel_emu.redzones import (
    ALLOC_IN,
    ALLOC_OUT,
    FREE_IN,
    FREE_OUT,
    REALLOC_IN,
    REALLOC_OUT,
    Arguments,
    GuardHit,
    Redzones,
)
from kernel_emu.tracing import attach_tracer, native_available
from tests.reproducers import REPRODUCERS, get_phdr, loads, set_header, set_phdr

BASE = 0x1000
SITES = {0xA0: ALLOC_IN, 0xA1: ALLOC_OUT, 0xF0: FREE_IN, 0xF1: FREE_OUT, 0xB0: REALLOC_IN,
         0xB1: REALLOC_OUT}
ARGS = Arguments.of("sysv64")


class Heap:
    """Memory and an allocator's calls, by hand."""

    def __init__(self) -> None:
        self.mem = bytearray(0x1000)
        self.count = 0
        self.guard = Redzones(16, ARGS, SITES, self.read)

    def read(self, address: int, size: int) -> bytes | None:
        if address < BASE or address + size > BASE + len(self.mem):
            return None
        return bytes(self.mem[address - BASE:address - BASE + size])

    def write(self, address: int, data: bytes) -> None:
        self.mem[address - BASE:address - BASE + len(data)] = data

    def call(self, entry: int, rsi: int = 0, rdx: int = 0, rsp: int = 0x8000) -> None:
        self.count += 1
        self.guard.event(entry, {"rsp": rsp, "rax": 0, "rsi": rsi, "rdx": rdx, "r8": 0},
                         self.count)

    def ret(self, site: int, rax: int = 0, rsp: int = 0x8000) -> None:
        self.count += 1
        self.guard.event(site, {"rsp": rsp, "rax": rax, "rsi": 0, "rdx": 0, "r8": 0},
                         self.count)

    def alloc(self, size: int, ptr: int, header: bytes = b"H" * 16) -> None:
        self.call(0xA0, rsi=size)
        self.write(ptr - 16, header)  # the allocator writes its header: no hit
        self.ret(0xA1, rax=ptr)


def test_a_write_past_the_end_is_a_hit_at_the_next_call() -> None:
    h = Heap()
    h.alloc(0x20, 0x1100)
    h.write(0x1100, b"A" * 0x20)  # its own payload: fine
    h.call(0xA0, rsi=8)
    assert h.guard.hits == []
    h.ret(0xA1, rax=0x1200)
    h.write(0x1100, b"B" * 0x23)  # three bytes too many
    assert h.guard.hits == []  # not yet: nothing looked
    h.call(0xF0, rsi=0x1200)
    assert h.guard.hits == [GuardHit(h.count, 0x1100, 0x20, 0x1120, True, 0, ord("B"))]
    # reported once, then guarded with what it holds
    h.ret(0xF1)
    h.call(0xA0, rsi=8)
    assert len(h.guard.hits) == 1


def test_a_write_before_the_start_names_the_byte_nearest_the_payload() -> None:
    h = Heap()
    h.alloc(0x20, 0x1100)
    h.write(0x10F0, b"\x01\x02")  # the header's first bytes
    h.guard.check(h.count)
    [hit] = h.guard.hits
    assert (hit.address, hit.after, hit.was, hit.now) == (0x10F1, False, ord("H"), 2)


def test_what_the_allocator_writes_during_a_call_is_no_hit() -> None:
    h = Heap()
    h.alloc(0x20, 0x1100)
    h.call(0xA0, rsi=0x10)
    h.write(0x1120, b"N" * 16)  # the next block's header, written by the allocator
    h.ret(0xA1, rax=0x1130)
    h.call(0xB0, rsi=0x1100, rdx=0x40)  # grows in place over the block after it
    h.write(0x10F0, b"S" * 16)
    h.ret(0xB1, rax=0x1100)
    h.write(0x1100, b"C" * 0x40)  # all of it the grown allocation's now
    h.call(0xF0, rsi=0x1100)
    h.write(0x1100, b"F" * 0x50)  # freed: the allocator's to write
    h.ret(0xF1)
    h.guard.check(h.count)
    assert h.guard.hits == []


def test_a_neighbour_s_payload_is_its_own() -> None:
    h = Heap()
    h.alloc(0x18, 0x1100)
    h.alloc(0x18, 0x1118)  # back to back, no header between (an allocator without one)
    h.write(0x1118, b"X" * 0x18)
    h.write(0x1100, b"Y" * 0x18)
    h.guard.check(h.count)
    assert h.guard.hits == []
    h.write(0x1130, b"Z")
    h.guard.check(h.count)
    assert [(hit.ptr, hit.address) for hit in h.guard.hits] == [(0x1118, 0x1130)]


def test_nested_calls_check_and_copy_only_at_the_outermost() -> None:
    h = Heap()
    h.alloc(0x20, 0x1100)
    h.call(0xB0, rsi=0x1100, rdx=0x100, rsp=0x8000)  # a resize that moves ...
    h.call(0xA0, rsi=0x100, rsp=0x7F00)  # ... by allocate,
    h.ret(0xA1, rax=0x1300, rsp=0x7F00)
    h.write(0x1300, b"M" * 0x20)  # copy,
    h.call(0xF0, rsi=0x1100, rsp=0x7F00)  # free
    h.write(0x10F0, b"\0" * 0x40)
    h.ret(0xF1, rsp=0x7F00)
    h.ret(0xB1, rax=0x1300, rsp=0x8000)
    h.guard.check(h.count)
    assert h.guard.hits == [] and [(b.ptr, b.size) for b in h.guard.live] == [(0x1300, 0x100)]
    h.write(0x1400, b"!")
    h.guard.check(h.count)
    assert [hit.address for hit in h.guard.hits] == [0x1400]


def test_arguments_follow_the_convention_and_a_dropped_self() -> None:
    assert Arguments.of("win64") == Arguments("rdx", "rdx", "rdx", "r8")
    assert Arguments.of("win64", realloc_takes_self=False) == Arguments("rdx", "rdx", "rcx",
                                                                          "rdx")
    assert Arguments.of("sysv64", realloc_takes_self=False) == Arguments("rsi", "rsi", "rdi",
                                                                           "rsi")


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_tracers_check_their_guard_arguments(native: bool) -> None:
    if native and not native_available():
        pytest.skip("the native tracer is not built")
    from unicorn import UC_ARCH_X86, UC_MODE_64, Uc

    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    tracer = attach_tracer(uc, [(0, 0x1000)], native=native)
    with pytest.raises(ValueError):
        tracer.guard(65, [(0x10, ALLOC_IN)], ARGS)
    with pytest.raises(ValueError):
        tracer.guard(8, [(0x10, 9)], ARGS)
    with pytest.raises(ValueError):
        tracer.guard(8, [(0x10, ALLOC_IN)], Arguments("rsi", "rsi", "rsi", "r15"))
    tracer.guard(8, [(0x10, ALLOC_IN)], ARGS)
    tracer.check_guards()
    assert tracer.take_guard_hits() == []


def test_both_tracers_catch_the_overflow_where_it_was_made(base_elf: bytes) -> None:
    """A segment whose file data outruns its buffer, on the seed build: the bytes after the
    buffer change before the next allocation, which the allocator would have carried on."""
    data = next(r for r in REPRODUCERS if r.bug == "RX-05").make(base_elf)
    results = [Executor(load_profile("seed"), native=native).run(data)
               for native in (True, False)]
    for result in results:
        cause = result.findings[0]
        assert (cause.cls, cause.field) == ("heap-corruption", "block.overflow")
        assert "load_segments" in cause.signature()
        assert "bytes after allocation of 0x" in cause.evidence[0]
    native, python = results
    assert native.findings[0].evidence == python.findings[0].evidence
    assert native.signature == python.signature


def test_loads_that_write_only_their_own_buffers_have_no_hits(base_elf: bytes) -> None:
    for kernel in ("seed", "fixed"):
        result = Executor(load_profile(kernel)).run(base_elf)
        assert result.verdict == "ok", (kernel, result.signature)
    # upstream's allocator hands out live blocks (UP-01) but the loader stays in its buffers
    result = Executor(load_profile("upstream")).run(base_elf)
    assert result.findings and not any(f.field in ("block.overflow", "block.underflow")
                                       for f in result.findings)


def test_a_full_table_lets_the_oldest_go(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kernel_emu.redzones.LIVE_MAX", 4)
    h = Heap()
    for k in range(6):
        h.alloc(0x10, 0x1100 + 0x40 * k)
    assert [b.ptr for b in h.guard.live] == [0x1180, 0x11C0, 0x1200, 0x1240]
    assert h.guard.unguarded == 2
    h.write(0x1250, b"!")  # the newest is watched
    h.guard.check(h.count)
    assert [hit.ptr for hit in h.guard.hits] == [0x1240]


def many_loads(elf: bytes, count: int) -> bytes:
    """`elf` with a program header table of `count` copies of its first PT_LOAD appended,
    the last of them copying 16 bytes more than its buffer holds."""
    index = loads(elf)[0]
    last = set_phdr(elf, index, memsz=get_phdr(elf, index)["filesz"] - 16)
    phoff = ELF64_EHDR["e_phoff"].read(elf) + index * ELF64_PHDR_SIZE
    entry, overflowing = (e[phoff:phoff + ELF64_PHDR_SIZE] for e in (elf, last))
    return set_header(elf, phoff=len(elf), phnum=count) + entry * (count - 1) + overflowing


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_an_overflow_after_hundreds_of_allocations_is_still_caught(base_elf: bytes,
                                                                  native: bool) -> None:
    data = many_loads(base_elf, 300)  # a buffer per segment, and the tables
    result = Executor(load_profile("seed"), native=native).run(data)
    cause = result.findings[0]
    assert (cause.cls, cause.field) == ("heap-corruption", "block.overflow"), result.findings
    assert "load_segments" in cause.signature()
