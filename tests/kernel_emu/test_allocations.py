"""The allocator observer, on hand-made watch events."""

from __future__ import annotations

from kernel_emu.allocations import AllocatorSites, replay
from kernel_emu.tracing import WatchEvent

SITES = AllocatorSites(alloc_entry=0x1000, alloc_returns=(0x1080, 0x10A0), dealloc_entry=0x2000)


def ev(address: int, rsp: int, *, rax: int = 0, rsi: int = 0) -> WatchEvent:
    return WatchEvent(address, 0, address, rsp, 0, rax, 0, rsi, 8, 0, (0x5000,))


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
