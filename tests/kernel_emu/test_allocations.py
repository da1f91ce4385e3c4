"""The allocator observer, on hand-made watch events."""

from __future__ import annotations

import random

import pytest

from kernel_emu.allocations import AllocatorSites, replay
from kernel_emu.redzones import GuardHit
from kernel_emu.tracing import WatchEvent

SITES = AllocatorSites(alloc_entry=0x1000, alloc_returns=(0x1080, 0x10A0), dealloc_entry=0x2000)


def ev(address: int, rsp: int, *, rax: int = 0, rsi: int = 0) -> WatchEvent:
    return WatchEvent(address, 0, address, rsp, 0, rax, 0, rsi, 8, 0, 0, (0x5000,))


def alloc(size: int, ptr: int, rsp: int = 0x8000, site: int = 0x1080) -> list[WatchEvent]:
    return [ev(SITES.alloc_entry, rsp, rsi=size), ev(site, rsp, rax=ptr)]


def describe(address: int, _is_return: bool) -> str:
    return f"f{address:#x}"


def test_disjoint_allocations_and_frees_are_fine() -> None:
    events = alloc(0x40, 0x300028) + alloc(0x10, 0x300090, site=0x10A0)
    events.append(ev(SITES.dealloc_entry, 0x8000, rsi=0x300028))
    findings, live = replay(events, SITES, describe)
    assert findings == []
    assert [(a.seq, a.ptr, a.size) for a in live] == [(2, 0x300090, 0x10)]


def test_allocation_over_a_live_one_is_heap_corruption() -> None:
    events = alloc(0xA0, 0x300028) + alloc(0x28, 0x300028)
    findings, _ = replay(events, SITES, describe)
    assert len(findings) == 1
    f = findings[0]
    assert f.cls == "heap-corruption" and f.field == "allocation.overlap"
    assert "allocation #2 of 0x28 bytes returned 0x300028" in f.evidence[0]
    assert "live allocation #1 at 0x300028 (0xa0 bytes)" in f.evidence[0]
    assert f.frames == ["f0x1080", "f0x5000"]


def test_overlap_with_a_neighbour_on_either_side() -> None:
    # ends inside a later block
    findings, _ = replay(alloc(0x40, 0x300100) + alloc(0x40, 0x3000F0), SITES, describe)
    assert findings and "#1 at 0x300100" in findings[0].evidence[0]
    # starts inside an earlier block
    findings, _ = replay(alloc(0x40, 0x300100) + alloc(0x8, 0x300138), SITES, describe)
    assert findings and "#1 at 0x300100" in findings[0].evidence[0]
    # touching is not overlapping
    findings, _ = replay(alloc(0x40, 0x300100) + alloc(0x8, 0x300140), SITES, describe)
    assert findings == []


def test_entry_and_return_are_paired_by_stack_pointer() -> None:
    # an allocation made while another is in progress (deeper stack) returns first
    events = [ev(SITES.alloc_entry, 0x8000, rsi=0x100), ev(SITES.alloc_entry, 0x7F00, rsi=0x8),
              ev(0x1080, 0x7F00, rax=0x300500), ev(0x1080, 0x8000, rax=0x300028)]
    findings, live = replay(events, SITES, describe)
    assert findings == []
    assert {(a.ptr, a.size) for a in live} == {(0x300500, 0x8), (0x300028, 0x100)}


def test_free_of_a_pointer_that_is_not_live() -> None:
    events = alloc(0x10, 0x300028) + [ev(SITES.dealloc_entry, 0x8000, rsi=0x300028),
                                      ev(SITES.dealloc_entry, 0x8000, rsi=0x300028)]
    findings, _ = replay(events, SITES, describe)
    assert [f.field for f in findings] == ["free.unknown"]


def test_failed_allocation_and_unmatched_return_are_ignored() -> None:
    events = alloc(0x10, 0) + [ev(0x1080, 0x9999, rax=0x300028)]
    assert replay(events, SITES, describe) == ([], [])


def test_many_allocations_stay_fast() -> None:
    events = []
    for i in range(20000):
        events += alloc(0x20, 0x300000 + i * 0x40)
    findings, live = replay(events, SITES, describe)
    assert findings == [] and len(live) == 20000


RESIZING = AllocatorSites(alloc_entry=0x1000, alloc_returns=(0x1080,), dealloc_entry=0x2000,
                          realloc_entry=0x3000, realloc_returns=(0x3080,))


def resize(ptr: int, new_size: int, result: int, rsp: int = 0x8000) -> list[WatchEvent]:
    # sysv64 with &self: (ptr, new_size) in rsi, rdx
    return [WatchEvent(0x3000, 0, 0x3000, rsp, 0, 0, 0, ptr, new_size, 0, 0, (0x5000,)),
            ev(0x3080, rsp, rax=result)]


def test_a_resize_in_place_is_the_allocation_at_its_new_size() -> None:
    events = alloc(0x20, 0x300028) + resize(0x300028, 0x60, 0x300028)
    findings, live = replay(events, RESIZING, describe)
    assert findings == []
    [a] = live
    assert (a.ptr, a.size) == (0x300028, 0x60)
    # the same object: named where it was first allocated, resized by the resize
    assert a.returned is not None and a.returned.address == 0x1080
    assert a.resized is not None and a.resized.address == 0x3080
    # a block handed out inside the grown one overlaps it: the resize made it live
    findings, _ = replay(events + alloc(0x8, 0x300070), RESIZING, describe)
    assert [(f.field, f.site) for f in findings] == [("allocation.overlap", "f0x3080")]


def test_a_resize_that_moves_ends_the_old_allocation() -> None:
    events = alloc(0x20, 0x300028) + resize(0x300028, 0x100, 0x300400)
    findings, live = replay(events, RESIZING, describe)
    assert findings == [] and [(a.ptr, a.size) for a in live] == [(0x300400, 0x100)]
    assert live[0].returned is not None and live[0].returned.address == 0x1080
    # one that moves by its own allocate and free leaves those to say so
    events = alloc(0x20, 0x300028) + [
        WatchEvent(0x3000, 0, 0x3000, 0x8000, 0, 0, 0, 0x300028, 0x100, 0, 0, (0x5000,)),
        *alloc(0x100, 0x300400, rsp=0x7F00), ev(SITES.dealloc_entry, 0x7F00, rsi=0x300028),
        ev(0x3080, 0x8000, rax=0x300400)]
    findings, live = replay(events, RESIZING, describe)
    assert findings == [] and [(a.ptr, a.size) for a in live] == [(0x300400, 0x100)]
    assert live[0].returned is not None and live[0].returned.address == 0x1080
    assert live[0].resized is not None and live[0].resized.address == 0x3080


def test_a_resize_of_a_pointer_that_is_not_live() -> None:
    # as a resize whose arguments the profile places wrong would look, too
    events = alloc(0x20, 0x300028) + resize(0x60, 0x300028, 0x300028)
    findings, _ = replay(events, RESIZING, describe)
    assert [f.field for f in findings] == ["realloc.unknown"]
    assert findings[0].evidence == ["resize of 0x60, which is not a live allocation"]


def test_redzone_hits_are_charged_to_their_allocation_in_order() -> None:
    events = alloc(0x20, 0x300028) + alloc(0x20, 0x300070)
    events = [e._replace(instructions=10 * i) for i, e in enumerate(events)]
    over = GuardHit(instructions=20, ptr=0x300028, size=0x20, address=0x30004A, after=True,
                    was=0xBE, now=0x41)
    under = GuardHit(instructions=99, ptr=0x300070, size=0x20, address=0x30006F, after=False,
                     was=0x00, now=0x41)
    findings, _ = replay(events, SITES, describe, [under, over])
    assert [(f.field, f.site) for f in findings] == [("block.overflow", None),
                                                     ("block.underflow", None)]
    first, second = findings
    assert first.signature() == "heap-corruption | f0x1080 < f0x5000 | block.overflow"
    assert first.evidence[0] == ("allocation #1: 0x2 bytes after allocation of 0x20 bytes at "
                                 "0x300028: 0x30004a held 0xbe, now 0x41")
    assert "before the call into the allocator from f0x5000" in first.evidence[-1]
    assert second.evidence[0].startswith("allocation #2: 0x0 bytes before")
    assert second.evidence[-1] == "written before the run ended"
    # an allocation the replay does not know (made before the run began): the heap names it
    findings, _ = replay([], SITES, describe, [over])
    assert findings[0].signature() == "heap-corruption | heap | block.overflow"


RESIZING = AllocatorSites(alloc_entry=0x1000, alloc_returns=(0x1080, 0x10A0),
                          dealloc_entry=0x2000, realloc_entry=0x3000, realloc_returns=(0x3080,))


def _random_events(rng: random.Random, count: int, wrong: float,
                   resizes: bool = True) -> list[WatchEvent]:
    """Allocator calls as a guest makes them, nested or not, resizes in place or moving; and
    with odds `wrong` each, as a broken allocator or a buggy caller makes them: blocks handed
    out twice, frees and resizes of pointers never live, returns without a call, null and
    huge pointers."""
    def event(address: int, rsp: int, *, rax: int = 0, rsi: int = 0, rdx: int = 0) -> WatchEvent:
        return WatchEvent(address, len(out), address, rsp, 0, rax, 0, rsi, rdx, 0, 0,
                          (0x5000 + len(out),))

    def bad() -> bool:
        return rng.random() < wrong

    out: list[WatchEvent] = []
    live: list[int] = []
    holes: dict[int, int] = {}  # freed blocks a first-fit allocator hands out again: size
    sizes: dict[int, int] = {}
    calls: list[tuple[int, int, int, int]] = []  # (rsp, return site, size, resized or 0)
    fresh = 0x30_0000
    for _ in range(count):
        kind = rng.random()
        rsp = 0x8000 - 0x100 * len(calls)
        if calls and kind < 0.45:  # a pending call returns (the innermost, or not)
            at = len(calls) - 1 if rng.random() < 0.9 else rng.randrange(len(calls))
            call_rsp, site, size, old = calls.pop(at)
            ptr = fresh
            fits = [p for p, room in holes.items() if room >= max(size, 1)]
            if old and old in live and rng.random() < 0.5:
                ptr = old  # resized in place
            elif fits and not old and rng.random() < 0.5:
                ptr = rng.choice(fits)  # a freed block again, up to its neighbour
                del holes[ptr]
            elif bad():
                ptr = rng.choice([0, rng.choice(live) if live else fresh, (1 << 64) - 0x10,
                                  rng.randrange(1 << 64)])
            if ptr == fresh:
                fresh += (max(size, 1) + 0xF & ~0xF) + rng.choice((0, 0x10, 0x40))
            if old in live and ptr != old:
                live.remove(old)
            if ptr and ptr not in live:
                live.append(ptr)
                sizes[ptr] = max(size, 1)
            out.append(event(site, call_rsp if not bad() else 0x7777, rax=ptr))
        elif kind < (0.65 if resizes else 0.75):
            size = rng.choice((0, 8, 0x40, 0x1000)) if not bad() else 1 << 63
            out.append(event(0x1000, rsp, rsi=size))
            calls.append((rsp, rng.choice((0x1080, 0x10A0)), size, 0))
        elif kind < 0.75:
            old = rng.choice((0, 0x1234)) if bad() else rng.choice(live) if live else 0
            size = rng.choice((0, 8, 0x80, 0x2000))
            out.append(event(0x3000, rsp, rsi=old, rdx=size))
            calls.append((rsp, 0x3080, size, old))
        elif kind < 0.95:
            ptr = rng.choice((0, 0x4242)) if bad() else rng.choice(live) if live else 0
            if ptr in live:
                live.remove(ptr)
                holes[ptr] = sizes[ptr]
            out.append(event(0x2000, rsp, rsi=ptr))
        else:
            out.append(event(0x9999, rsp))  # no site of the allocator
    return out


def test_the_native_replay_answers_as_the_python_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the events, the replay's findings, live and freed allocations are the same
    with the native common case as without it (which it leaves every finding to)."""
    import kernel_emu.allocations as allocations

    assert allocations.native_walker is not None, "the native walker is not built"
    rng = random.Random(11)
    native_runs = 0
    for trial in range(1500):
        sites = RESIZING if trial % 2 else SITES
        events = _random_events(rng, rng.choice((0, 1, 4, 12, 40, 150)),
                                rng.choice((0.0, 0.0, 0.01, 0.1)), sites is RESIZING)
        got_freed: list = []
        got = replay(events, sites, describe, (), got_freed)
        with monkeypatch.context() as m:
            m.setattr(allocations, "native_walker", None)
            want_freed: list = []
            want = replay(events, sites, describe, (), want_freed)
        assert (got, got_freed) == (want, want_freed), trial
        native_runs += events != [] and not want[0]
    assert native_runs > 300  # many runs with nothing to report, taken natively
