"""The leak oracle's word search: every way of looking finds the same words; and its native
check that nothing leaked agrees with the scan in Python."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest

from kernel_emu import leaks
from kernel_emu.allocations import Allocation
from kernel_emu.executor import Executor
from kernel_emu.leaks import WORDS_AT_ONCE, _held, _held_python, _holds_word
from kernel_emu.machine import Machine
from kernel_emu.profile import load_profile
from tests.kernel_emu.speedups import count_calls
from tests.reproducers import REPRODUCERS, build_id, with_notes

ROOT = Path(__file__).parents[2]

needs_native = pytest.mark.skipif(leaks.held_words is None,
                                  reason="the native walker is not built")


def test_a_set_of_words_and_a_search_per_key_agree() -> None:
    rng = random.Random(7)
    for _ in range(200):
        start = 0x300000 + rng.randrange(16)
        size = rng.choice((0, 3, 8, 9, 64, 1000, WORDS_AT_ONCE, WORDS_AT_ONCE + 24))
        data = bytearray(rng.randbytes(size))
        wanted: dict[int, Allocation] = {}
        for _ in range(rng.randrange(1, 6)):
            ptr = 0x300000 + rng.randrange(0x10000)
            wanted[ptr] = Allocation(len(wanted) + 1, ptr, 8)
            if size >= 16 and rng.random() < 0.6:  # plant it, aligned or not
                at = rng.randrange(size - 8)
                data[at:at + 8] = struct.pack("<Q", ptr)
        found = _held(bytes(data), start, wanted)
        assert found == [p for p in wanted if _holds_word(bytes(data), start, p)]
        assert _held_python(bytes(data), start, wanted) == found
        for ptr in found:  # really there, 8-aligned in the address space
            at = bytes(data).find(struct.pack("<Q", ptr))
            assert at >= 0


def test_only_aligned_words_count() -> None:
    ptr = 0x30_0028
    wanted = {ptr: Allocation(1, ptr, 8)}
    data = bytes(3) + struct.pack("<Q", ptr) + bytes(5)
    assert _held(data, 0x1000, wanted) == []  # at 0x1003
    assert _held(data, 0x1005, wanted) == [ptr]  # at 0x1008


@needs_native
def test_the_native_scan_finds_what_the_search_finds() -> None:
    """Repeated keys, keys at either end, misaligned starts, zero-filled regions (where a
    search per key is slowest), keys above 2**63."""
    rng = random.Random(11)
    for _ in range(300):
        start = rng.randrange(1 << 20)
        size = rng.choice((0, 7, 8, 16, 4096, 8700))
        data = bytearray(size if rng.random() < 0.3 else 0) or bytearray(rng.randbytes(size))
        keys = [rng.choice((rng.randrange(1 << 64), 0x300000 + 8 * rng.randrange(64), 0))
                for _ in range(rng.randrange(0, 8))]
        keys += keys[:rng.randrange(3)]
        for key in keys[:3]:
            if size >= 8:
                at = rng.choice((0, size - 8, rng.randrange(size - 7)))
                data[at:at + 8] = struct.pack("<Q", key)
        found = leaks.held_words(bytes(data), start, keys)
        assert found == [k for k in keys if _holds_word(bytes(data), start, k)]


@needs_native
def test_the_native_scan_refuses_what_is_no_word() -> None:
    with pytest.raises(OverflowError):
        leaks.held_words(bytes(16), 0, [1 << 64])
    with pytest.raises(TypeError):
        leaks.held_words(bytes(16), 0, 5)


def _heap_case(rng: random.Random, m: Machine) -> tuple[list[Allocation], list[tuple[int, int]],
                                                         dict[str, int]]:
    """Live allocations in the first bank, roots, registers, and pointers planted so that some
    allocations are reached through chains, some only from a register, some from nothing."""
    low, high = m.banks
    m.write(low.base, bytes(low.size))
    live: list[Allocation] = []
    used: set[int] = set()
    for seq in range(rng.randrange(0, 12)):
        ptr = 0x8000 + 8 * rng.randrange(0x1800)
        if ptr in used:
            continue
        used.add(ptr)
        size = rng.choice((0, 1, 8, 24, 0x40, 0x200, 0x3000, leaks.SCAN_LIMIT + 64))
        live.append(Allocation(seq, ptr, size))
    roots = [(0x1000, rng.choice((0, 0x80, 0x400))), (0x2000 + rng.randrange(8), 0x100)]
    if rng.random() < 0.3:  # a root only the second bank holds, or none does
        roots.append((rng.choice((high.base, low.base + low.size - 0x20)), 0x40))
    regions = roots + [(a.ptr, min(max(a.size, 1), 0x2000)) for a in live]
    for a in live:
        if rng.random() < 0.95:  # a pointer to it somewhere, aligned or not
            start, size = rng.choice(roots if rng.random() < 0.4 else regions)
            if size >= 16:
                at = start + rng.randrange(size - 8)
                if rng.random() < 0.9:
                    at &= ~7
                if m.bank_for(at, 8) is not None:
                    m.write(at, struct.pack("<Q", a.ptr))
    registers = {r: rng.randrange(1 << 64) for r in leaks.REGISTERS}
    if live and rng.random() < 0.5:
        registers[rng.choice(leaks.REGISTERS)] = rng.choice(live).ptr
    return live, roots, registers


@needs_native
def test_the_native_reach_says_nothing_leaked_exactly_when_the_scan_does() -> None:
    """Over random heaps: chains of pointers, allocations of no size or larger than the scan
    limit, misaligned pointers, pointers in registers, roots outside RAM or in the second bank
    (which the native check does not read: there it may only refuse, never pass a leak)."""
    m = Machine([(0, 0x40000), (0x100000, 0x1000)])
    rng = random.Random(5)
    seen = {True: 0, False: 0}
    for _ in range(600):
        live, roots, registers = _heap_case(rng, m)
        low = m.banks[0]
        native = leaks.leaks_reached(low.buffer, low.base, live, roots,
                                     [registers[r] for r in leaks.REGISTERS],
                                     leaks.SCAN_LIMIT, leaks.NATIVE_MAX_LIVE)
        python = leaks.leak_findings_python(live, roots, registers, m, lambda a, r: hex(a))
        in_second_bank = any(m.banks[1].contains(start, size) for start, size in roots)
        if in_second_bank:
            assert not native or python == [], (live, roots)
        else:
            assert native == (python == []), (live, roots)
        seen[python == []] += 1
    assert min(seen.values()) > 100, seen  # both outcomes, many times


@needs_native
def test_the_native_reach_refuses_what_it_does_not_judge() -> None:
    m = Machine([(0, 0x10000)])
    low = m.banks[0]
    m.write(0x1000, struct.pack("<QQ", 0x2000, 0x2000))
    twice = [Allocation(1, 0x2000, 8), Allocation(2, 0x2000, 8)]
    args = (low.buffer, low.base)
    assert not leaks.leaks_reached(*args, twice, [(0x1000, 16)], [], leaks.SCAN_LIMIT, 8)
    once = twice[:1]
    assert leaks.leaks_reached(*args, once, [(0x1000, 16)], [], leaks.SCAN_LIMIT, 8)
    assert not leaks.leaks_reached(*args, once, [(0x1000, 16)], [], leaks.SCAN_LIMIT, 0)
    with pytest.raises(IndexError):  # no size: no allocation
        leaks.leaks_reached(*args, [(1, 2)], [(0x1000, 16)], [], leaks.SCAN_LIMIT, 8)


def test_runs_with_nothing_leaked_never_reach_the_python_scan(
        base_elf: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """The seeds' runs leak nothing, and the native check says so for every one of them (the
    speed-up is real, not a check that always defers); a leak reproducer's run reaches the
    scan in Python, which gives its finding."""
    ex = Executor(load_profile("seed"), explain=False, causes=False)
    python = count_calls(monkeypatch, leaks, "leak_findings_python")
    judged = 0
    for path in sorted((ROOT / "corpus" / "seeds").glob("*.elf")):
        result = ex.run(path.read_bytes())
        assert not any(f.cls == "memory-leak" for f in result.findings)
        judged += result.stop in ("until", "halt")
    assert judged >= 10 and python == [0], (judged, python)
    leak = next(r for r in REPRODUCERS if r.expected == "memory-leak")
    result = ex.run(leak.make(base_elf))
    assert python[0] >= 1 and any(f.cls == "memory-leak" for f in result.findings)


def test_a_log_of_the_allocator_too_short_for_the_run_judges_no_leak(base_elf: bytes) -> None:
    """A thousand build-ID notes make the fixed build call its allocator more often than the
    tracer's log holds events for: what was live is then not known, and a leak read from the
    log's first part (an early build ID, freed after the log was full) would be the farm's
    own. No leak is judged, and the Result says why; a few notes are judged as ever."""
    fixed = Executor(load_profile("fixed"))
    many = with_notes(base_elf, b"".join(build_id(fill=i % 256) for i in range(1000)))
    result = fixed.run(many)
    assert fixed.tracer.events_dropped > 0
    assert result.verdict == "ok", result.findings
    assert any("no leak was judged" in note for note in result.notes)
    few = fixed.run(with_notes(base_elf, build_id(fill=1) + build_id(fill=2)))
    assert fixed.tracer.events_dropped == 0 and few.verdict == "ok"
    assert not any("no leak was judged" in note for note in few.notes)
