"""Guest tracing on hand-assembled x86-64 snippets: counts, budget, dirty pages, coverage, ports,
watches.

Every behavioural test runs against both the native hooks and the Python fallback, and one
test runs a mixed program through both and compares every result.
"""

from __future__ import annotations

import gc
import struct
from collections import Counter
from typing import Any

import pytest
from unicorn import UC_ARCH_X86, UC_HOOK_CODE, UC_HOOK_INSN, UC_MODE_64, Uc
from unicorn.x86_const import (
    UC_X86_INS_IN,
    UC_X86_INS_OUT,
    UC_X86_REG_CR0,
    UC_X86_REG_CR3,
    UC_X86_REG_CR4,
    UC_X86_REG_EBX,
    UC_X86_REG_ECX,
    UC_X86_REG_RAX,
    UC_X86_REG_RBP,
    UC_X86_REG_RBX,
    UC_X86_REG_RIP,
    UC_X86_REG_RSP,
)

from kernel_emu import tracing
from kernel_emu.tracing import (
    NO_BUDGET,
    OUTSIDE,
    UNKNOWN_PAGE,
    GuestTracer,
    PortConfig,
    WatchEvent,
    attach_tracer,
)

CODE = 0x1000
STACK_TOP = 0x9000
DATA = 0x200000
RAM_SIZE = 4 << 20
# Region 0 holds code and stack, region 1 data; 1-2 MiB and 3-4 MiB are RAM outside both.
REGIONS = [(0, 0x100000), (DATA, 0x100000)]
K = tracing.COVERAGE_MULTIPLIER
EFER_MSR = 0xC0000080

IMPLEMENTATIONS = [
    pytest.param(True, id="native"),
    pytest.param(False, id="python"),
]


def q(value: int) -> bytes:
    return struct.pack("<Q", value)


def d(value: int) -> bytes:
    return struct.pack("<I", value)


def mov_rdi(value: int) -> bytes:
    return b"\x48\xbf" + q(value)  # mov rdi, imm64


def loop(n: int) -> bytes:
    # 0: mov ecx, n ; 5: l: dec ecx ; 7: jnz l ; 9: hlt
    return b"\xb9" + d(n) + b"\xff\xc9\x75\xfc\xf4"


def engine(code: bytes) -> Uc:
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, RAM_SIZE)
    uc.mem_write(CODE, code)
    uc.reg_write(UC_X86_REG_RSP, STACK_TOP)
    return uc


@pytest.fixture(params=IMPLEMENTATIONS)
def native(request: pytest.FixtureRequest) -> bool:
    if request.param and not tracing.native_available():
        pytest.skip("kernel_emu._tracer is not built")
    return request.param


def run(
    code: bytes, native: bool, budget: int = NO_BUDGET, **kwargs: Any
) -> tuple[Uc, GuestTracer]:
    uc = engine(code)
    tracer = attach_tracer(uc, REGIONS, native=native, **kwargs)
    tracer.reset(budget)
    uc.emu_start(CODE, 0)
    return uc, tracer


def cur(address: int) -> int:
    return ((address * K) & ((1 << 64) - 1)) >> 48


def expected_coverage(blocks: list[int]) -> bytes:
    hits: Counter[int] = Counter()
    prev = 0
    for address in blocks:
        hits[cur(address) ^ prev] += 1
        prev = cur(address) >> 1
    out = bytearray(tracing.MAP_SIZE)
    for edge, count in hits.items():
        out[edge] = min(count, 255)
    return bytes(out)


def test_native_extension_is_built() -> None:
    # Tracing is orders of magnitude slower without it: a missing build must not pass quietly.
    assert tracing.native_available(), "build it with: pip install -e ."


def test_tracer_satisfies_protocol(native: bool) -> None:
    _, tracer = run(b"\xf4", native)
    assert isinstance(tracer, GuestTracer)
    assert tracer.native is native


# --- instruction counting and budget ------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 100, 5000])
def test_loop_instruction_count_is_exact(native: bool, n: int) -> None:
    uc, tracer = run(loop(n), native)
    # mov + n * (dec, jnz) + hlt
    assert tracer.instructions == 1 + 2 * n + 1
    assert not tracer.budget_exhausted
    assert uc.reg_read(UC_X86_REG_ECX) == 0


@pytest.mark.parametrize("budget", [0, 1, 2, 1000, 123457])
def test_budget_stops_infinite_loop_exactly(native: bool, budget: int) -> None:
    uc, tracer = run(b"\xeb\xfe", native, budget)  # jmp $
    assert tracer.instructions == budget
    assert tracer.budget_exhausted
    assert uc.reg_read(UC_X86_REG_RIP) == CODE


def test_budget_stops_before_the_next_instruction(native: bool) -> None:
    # mov, (dec, jnz) x 3 = 7 instructions; the 8th (dec) must not run.
    uc, tracer = run(loop(100), native, budget=7)
    assert tracer.instructions == 7
    assert tracer.budget_exhausted
    assert uc.reg_read(UC_X86_REG_ECX) == 97
    assert uc.reg_read(UC_X86_REG_RIP) == CODE + 5


def test_budget_equal_to_run_length_is_not_exhausted(native: bool) -> None:
    _, tracer = run(loop(10), native, budget=22)
    assert tracer.instructions == 22
    assert not tracer.budget_exhausted


def test_exhausted_budget_holds_until_reset(native: bool) -> None:
    uc, tracer = run(b"\xeb\xfe", native, budget=50)
    uc.emu_start(CODE, 0)
    assert tracer.instructions == 50
    tracer.reset(30)
    uc.emu_start(CODE, 0)
    assert tracer.instructions == 30
    assert tracer.budget_exhausted


def test_rep_string_counts_each_iteration_plus_one(native: bool) -> None:
    # mov rdi, DATA ; mov ecx, 5 ; rep stosq ; hlt
    code = mov_rdi(DATA) + b"\xb9" + d(5) + b"\xf3\x48\xab\xf4"
    _, tracer = run(code, native)
    assert tracer.instructions == 2 + (5 + 1) + 1


def test_reset_rejects_out_of_range_budget(native: bool) -> None:
    _, tracer = run(b"\xf4", native)
    with pytest.raises(ValueError):
        tracer.reset(-1)
    with pytest.raises(ValueError):
        tracer.reset(1 << 64)


# --- dirty pages --------------------------------------------------------------------------


def stores_program() -> bytes:
    return b"".join(
        [
            b"\xb8" + d(0x11223344),  # mov eax, 0x11223344
            mov_rdi(DATA + 0x3010),
            b"\x89\x07",  # mov [rdi], eax                    -> region 1 page 3
            mov_rdi(DATA + 0x4FFC),
            b"\x48\x89\x07",  # mov [rdi], rax (straddles)    -> region 1 pages 4, 5
            mov_rdi(DATA + 0x8800),
            b"\xb9" + d(1024),  # mov ecx, 1024
            b"\xf3\x48\xab",  # rep stosq: 8 KiB               -> region 1 pages 8, 9, 10
            b"\x50",  # push rax                                -> region 0 page 8 (stack)
            b"\xf4",
        ]
    )


def test_dirty_pages_are_exactly_the_written_ones(native: bool) -> None:
    uc, tracer = run(stores_program(), native)
    uc.mem_write(DATA + 0xF000, b"host")  # host writes are not the guest's
    assert tracer.take_dirty() == [(0, 8), (1, 3), (1, 4), (1, 5), (1, 8), (1, 9), (1, 10)]
    assert uc.mem_read(DATA + 0x4FFC, 8) == q(0x11223344)


def test_take_dirty_forgets_and_reset_clears(native: bool) -> None:
    uc, tracer = run(stores_program(), native)
    assert tracer.take_dirty()
    assert tracer.take_dirty() == []
    uc.reg_write(UC_X86_REG_RSP, STACK_TOP)
    uc.emu_start(CODE, 0)
    tracer.reset(NO_BUDGET)
    assert tracer.take_dirty() == []


def test_untracked_writes_leave_the_rest_alone(native: bool) -> None:
    uc, tracked = run(stores_program(), native)
    uc, untracked = run(stores_program(), native, track_writes=False)
    assert untracked.instructions == tracked.instructions
    assert untracked.recent_blocks() == tracked.recent_blocks()
    assert bytes(untracked.coverage()) == bytes(tracked.coverage())
    assert uc.mem_read(DATA + 0x4FFC, 8) == q(0x11223344)
    with pytest.raises(RuntimeError, match="track_writes"):
        untracked.take_dirty()


def test_host_writes_are_not_counted(native: bool) -> None:
    uc, tracer = run(b"\xf4", native)
    uc.mem_write(DATA, b"x" * 0x3000)
    uc.mem_write(0x10, b"y")
    assert tracer.take_dirty() == []


def test_writes_outside_regions_are_reported_by_physical_page(native: bool) -> None:
    code = mov_rdi(0x345678) + b"\x89\x07\xf4"  # mov [rdi], eax
    _, tracer = run(code, native)
    assert tracer.take_dirty() == [(OUTSIDE, 0x345)]


def test_unpaged_straddle_into_unregioned_page_is_reported(native: bool) -> None:
    # Last bytes of region 1 then the first page past it: both pages named, nothing unknown.
    code = mov_rdi(DATA + 0x100000 - 4) + b"\x48\x89\x07\xf4"
    _, tracer = run(code, native)
    assert tracer.take_dirty() == [(OUTSIDE, (DATA + 0x100000) >> 12), (1, 0xFF)]


def test_atomic_writes_are_tracked(native: bool) -> None:
    code = b"".join(
        [
            mov_rdi(DATA + 0x1000),
            b"\x87\x07",  # xchg [rdi], eax
            b"\x48\xbe" + q(DATA + 0x2000),  # mov rsi, imm64
            b"\xf0\x0f\xb1\x0e",  # lock cmpxchg [rsi], ecx (rax == 0 == [rsi]: stores)
            b"\xf4",
        ]
    )
    uc = engine(code)
    tracer = attach_tracer(uc, REGIONS, native=native)
    tracer.reset(NO_BUDGET)
    uc.reg_write(UC_X86_REG_RAX, 0)
    uc.emu_start(CODE, 0)
    assert tracer.take_dirty() == [(1, 1), (1, 2)]


# --- paging: what address the write hook sees ---------------------------------------------

PML4, PDPT, PD, PT = 0x10000, 0x11000, 0x12000, 0x13000
PTE_P, PTE_W, PTE_A, PTE_D = 1, 2, 0x20, 0x40


def enable_paging(uc: Uc, remap: dict[int, int]) -> None:
    """Identity-map the first 2 MiB with 4 KiB pages, except virtual pages in ``remap``."""
    uc.mem_write(PML4, q(PDPT | PTE_P | PTE_W))
    uc.mem_write(PDPT, q(PD | PTE_P | PTE_W))
    uc.mem_write(PD, q(PT | PTE_P | PTE_W))
    entries = [remap.get(page, page) << 12 | PTE_P | PTE_W for page in range(512)]
    uc.mem_write(PT, struct.pack("<512Q", *entries))
    uc.reg_write(UC_X86_REG_CR3, PML4)
    uc.reg_write(UC_X86_REG_CR4, uc.reg_read(UC_X86_REG_CR4) | 0x20)  # PAE
    uc.msr_write(EFER_MSR, uc.msr_read(EFER_MSR) | 0xD00)  # LME | LMA | NXE
    uc.reg_write(UC_X86_REG_CR0, uc.reg_read(UC_X86_REG_CR0) | 0x80000001)  # PG | PE


def test_paged_writes_are_tracked_by_physical_address(native: bool) -> None:
    # Virtual page 0x100 lives at physical 0x230000 (region 1 page 0x30).
    code = b"\xb8" + d(0xCAFE) + mov_rdi(0x100010) + b"\x89\x07\xf4"
    uc = engine(code)
    enable_paging(uc, {0x100: 0x230})
    tracer = attach_tracer(uc, REGIONS, native=native)
    tracer.reset(NO_BUDGET)
    uc.emu_start(CODE, 0)
    assert uc.mem_read(0x230010, 4) == d(0xCAFE)  # uc.mem_read is physical
    assert uc.mem_read(0x100010, 4) == d(0)
    # Not (OUTSIDE, 0x100), the virtual page; page-table pages are absent too (see below).
    assert tracer.take_dirty() == [(1, 0x30)]


def test_paged_straddle_over_discontiguous_pages_is_flagged(native: bool) -> None:
    # Virtual 0x100000 -> physical 0x230000, virtual 0x101000 -> physical 0x250000.
    code = b"\x48\xc7\xc0\xff\xff\xff\xff" + mov_rdi(0x100FFC) + b"\x48\x89\x07\xf4"
    uc = engine(code)
    enable_paging(uc, {0x100: 0x230, 0x101: 0x250})
    tracer = attach_tracer(uc, REGIONS, native=native)
    tracer.reset(NO_BUDGET)
    uc.emu_start(CODE, 0)
    # The tail really went to 0x250000, a page the hook is never told about ...
    assert uc.mem_read(0x250000, 4) == b"\xff" * 4
    assert uc.mem_read(0x231000, 4) == b"\x00" * 4
    # ... so the set carries the "incomplete" marker; the adjacent guess is harmless.
    assert tracer.take_dirty() == [(OUTSIDE, UNKNOWN_PAGE), (1, 0x30), (1, 0x31)]


def test_page_walker_accessed_bits_are_not_reported(native: bool) -> None:
    # Pins a Unicorn behaviour the snapshot code must work around (see tracing's doc):
    # the MMU sets PTE.A/D with direct physical writes that no hook sees.
    code = mov_rdi(0x80010) + b"\x89\x07\xf4"
    uc = engine(code)
    enable_paging(uc, {})
    tracer = attach_tracer(uc, REGIONS, native=native)
    tracer.reset(NO_BUDGET)
    uc.emu_start(CODE, 0)
    pte = struct.unpack("<Q", uc.mem_read(PT + 0x80 * 8, 8))[0]
    assert pte & (PTE_A | PTE_D) == PTE_A | PTE_D
    for table in (PML4, PDPT, PD):
        assert struct.unpack("<Q", uc.mem_read(table, 8))[0] & PTE_A
    # Four page-table pages changed, yet only the guest's own store is reported.
    assert tracer.take_dirty() == [(0, 0x80)]


# --- paging: identity page tables vouched for by the caller ------------------------------

ALIAS_PML4 = 0x14000  # a second PML4 over the same identity tables, not vouched for
MINUS_ONE_RAX = b"\x48\xc7\xc0\xff\xff\xff\xff"  # mov rax, -1


def use_pml4(uc: Uc, cr3: int) -> None:
    """Point CR3 at ``cr3``, writing there a PML4 that shares :func:`enable_paging`'s PDPT."""
    if cr3 & ~0xFFF != PML4:
        uc.mem_write(cr3 & ~0xFFF, q(PDPT | PTE_P | PTE_W))
    uc.reg_write(UC_X86_REG_CR3, cr3)


def crossing_program() -> bytes:
    return b"".join(
        [
            MINUS_ONE_RAX,
            mov_rdi(0x80FFC),
            b"\x48\x89\x07",  # mov [rdi], rax: straddles pages 0x80 and 0x81
            mov_rdi(0x82000),
            b"\x89\x07",  # mov [rdi], eax: within page 0x82, not a crossing
            b"\xf4",
        ]
    )


CROSSING_PAGES = [(0, 0x80), (0, 0x81), (0, 0x82)]


def run_crossing(native: bool, cr3: int, identity_cr3: int) -> tuple[Uc, GuestTracer]:
    uc = engine(crossing_program())
    enable_paging(uc, {})
    use_pml4(uc, cr3)
    tracer = attach_tracer(uc, REGIONS, native=native)
    tracer.identity_cr3 = identity_cr3
    tracer.reset(NO_BUDGET)
    uc.emu_start(CODE, 0)
    assert uc.mem_read(0x80FFC, 8) == b"\xff" * 8  # the tail really is on physical 0x81000
    return uc, tracer


# PCD | PWT in CR3's low bits are not part of the table address.
@pytest.mark.parametrize("cr3", [PML4, PML4 | 0x18, ALIAS_PML4], ids=hex)
def test_identity_cr3_resolves_paged_crossings(native: bool, cr3: int) -> None:
    uc, tracer = run_crossing(native, cr3, cr3 & ~0xFFF)
    assert tracer.identity_crossings == 1
    assert tracer.take_dirty() == CROSSING_PAGES  # exact: no UNKNOWN_PAGE marker
    assert tracer.identity_crossings == 1  # take_dirty does not reset the count
    tracer.reset(NO_BUDGET)
    assert tracer.identity_crossings == 0
    assert tracer.identity_cr3 == cr3 & ~0xFFF  # configuration, not a result: kept
    uc.emu_start(CODE, 0)  # the next run counts from zero again
    assert tracer.identity_crossings == 1
    assert tracer.take_dirty() == CROSSING_PAGES


@pytest.mark.parametrize(
    ("cr3", "identity_cr3"),
    [
        (PML4, 0),
        (PML4, ALIAS_PML4),
        (ALIAS_PML4, PML4),
        (PML4, PDPT),
        (0, 0),  # tables at physical 0: identity_cr3 = 0 still means "none"
    ],
    ids=["unset", "other-tables", "alias-in-use", "pdpt", "cr3-zero"],
)
def test_other_cr3_leaves_paged_crossings_unknown(
    native: bool, cr3: int, identity_cr3: int
) -> None:
    _, tracer = run_crossing(native, cr3, identity_cr3)
    assert tracer.identity_crossings == 0
    assert tracer.take_dirty() == [(OUTSIDE, UNKNOWN_PAGE), *CROSSING_PAGES]


def test_unpaged_crossings_are_not_identity_crossings(native: bool) -> None:
    # Without paging the tail's page is known anyway: nothing to resolve, nothing counted.
    uc = engine(crossing_program())
    uc.reg_write(UC_X86_REG_CR3, PML4)
    tracer = attach_tracer(uc, REGIONS, native=native)
    tracer.identity_cr3 = PML4
    tracer.reset(NO_BUDGET)
    uc.emu_start(CODE, 0)
    assert tracer.identity_crossings == 0
    assert tracer.take_dirty() == CROSSING_PAGES


@pytest.mark.parametrize("value", [PML4, ALIAS_PML4, 1 << 40, (1 << 64) - 0x1000, 0], ids=hex)
def test_identity_cr3_round_trips(native: bool, value: int) -> None:
    uc = engine(b"\xf4")
    tracer = attach_tracer(uc, REGIONS, native=native)
    assert tracer.identity_cr3 == 0
    assert tracer.identity_crossings == 0
    tracer.identity_cr3 = value
    assert tracer.identity_cr3 == value
    tracer.reset(NO_BUDGET)
    uc.emu_start(CODE, 0)
    tracer.take_dirty()
    assert tracer.identity_cr3 == value


def test_native_identity_cr3_keeps_only_the_table_address() -> None:
    # Page-aligned values round-trip on both tracers (above); the native setter also drops
    # the low 12 bits, as the comparison does for CR3, and refuses values outside 64 bits.
    if not tracing.native_available():
        pytest.skip("kernel_emu._tracer is not built")
    tracer = attach_tracer(engine(b"\xf4"), REGIONS, native=True)
    tracer.identity_cr3 = PML4 | 0x18
    assert tracer.identity_cr3 == PML4
    for bad in (-1, 1 << 64):
        with pytest.raises(OverflowError):
            tracer.identity_cr3 = bad
    assert tracer.identity_cr3 == PML4


def identity_program(switch_tables: bool) -> bytes:
    """Three crossing stores and a plain one under CR3 = PML4, then optionally one more
    after the guest itself moves CR3 to the alias tables."""
    code = b"".join(
        [
            MINUS_ONE_RAX,
            mov_rdi(0x80FFC),
            b"\x48\x89\x07",  # mov [rdi], rax: pages 0x80, 0x81
            mov_rdi(0x82000),
            b"\x89\x07",  # mov [rdi], eax: page 0x82 only
            mov_rdi(0xFFFFF),
            b"\x66\x89\x07",  # mov [rdi], ax: region 0 page 0xff, then outside page 0x100
            b"\x48\xbc" + q(0x8004),  # mov rsp, 0x8004
            b"\x50",  # push rax: 0x7ffc..0x8003, pages 7 and 8
        ]
    )
    if switch_tables:
        code += b"".join(
            [
                b"\x48\xbb" + q(ALIAS_PML4),  # mov rbx, ALIAS_PML4
                b"\x0f\x22\xdb",  # mov cr3, rbx
                mov_rdi(0x83FFC),
                b"\x48\x89\x07",  # mov [rdi], rax: pages 0x83, 0x84
            ]
        )
    return code + b"\xf4"


@pytest.mark.parametrize("switch_tables", [False, True], ids=["one-cr3", "cr3-switch"])
def test_native_and_python_agree_on_identity_crossings(switch_tables: bool) -> None:
    if not tracing.native_available():
        pytest.skip("kernel_emu._tracer is not built")
    code = identity_program(switch_tables)
    identity_values = [0, PML4, ALIAS_PML4]
    outcomes = {}
    for native in (True, False):
        for identity_cr3 in identity_values:
            uc = engine(code)
            enable_paging(uc, {})
            uc.mem_write(ALIAS_PML4, q(PDPT | PTE_P | PTE_W))
            tracer = attach_tracer(uc, REGIONS, native=native)
            tracer.identity_cr3 = identity_cr3
            runs = []
            for _ in range(2):  # a second run after reset must not accumulate
                tracer.reset(NO_BUDGET)
                uc.reg_write(UC_X86_REG_CR3, PML4)
                uc.emu_start(CODE, 0)
                runs.append(
                    (
                        tracer.instructions,
                        tracer.identity_crossings,
                        tracer.take_dirty(),
                        uc.reg_read(UC_X86_REG_CR3),
                        bytes(uc.mem_read(0x7000, 0x7E000)),
                    )
                )
            assert runs[0] == runs[1]
            outcomes[native, identity_cr3] = runs[0]
    for identity_cr3 in identity_values:
        assert outcomes[True, identity_cr3] == outcomes[False, identity_cr3], hex(identity_cr3)
    # The expected answers: under PML4 three crossings, under the alias one.
    pages = [(0, page) for page in (7, 8, 0x80, 0x81, 0x82)]
    if switch_tables:
        pages += [(0, 0x83), (0, 0x84)]
    pages = [(OUTSIDE, 0x100), *pages, (0, 0xFF)]
    crossings = {0: (0, 0), PML4: (3, 0), ALIAS_PML4: (0, 1)}
    for identity_cr3, (under_pml4, under_alias) in crossings.items():
        _, counted, dirty, cr3, _ = outcomes[True, identity_cr3]
        assert cr3 == (ALIAS_PML4 if switch_tables else PML4)
        assert counted == under_pml4 + (under_alias if switch_tables else 0)
        # Any crossing under tables nobody vouched for makes the set incomplete.
        complete = identity_cr3 == PML4 and not switch_tables
        assert dirty == (pages if complete else [(OUTSIDE, UNKNOWN_PAGE), *pages])


# --- recent blocks and coverage -----------------------------------------------------------


def test_recent_blocks_show_where_a_loop_spins(native: bool) -> None:
    _, tracer = run(loop(100), native)
    assert tracer.recent_blocks() == [CODE + 5] * 63 + [CODE + 9]


def test_recent_blocks_before_the_ring_fills(native: bool) -> None:
    _, tracer = run(loop(3), native)
    assert tracer.recent_blocks() == [CODE, CODE + 5, CODE + 5, CODE + 9]


def test_recent_blocks_of_a_hang(native: bool) -> None:
    _, tracer = run(b"\x90\xeb\xfe", native, budget=10_000)  # nop; jmp $
    assert tracer.recent_blocks() == [CODE + 1] * 64


def test_coverage_counts_edges_and_saturates(native: bool) -> None:
    n = 1000
    _, tracer = run(loop(n), native)
    blocks = [CODE] + [CODE + 5] * (n - 1) + [CODE + 9]
    view = tracer.coverage()
    assert len(view) == tracing.MAP_SIZE
    assert view.readonly
    assert bytes(view) == expected_coverage(blocks)
    loop_edge = cur(CODE + 5) ^ (cur(CODE + 5) >> 1)
    assert view[loop_edge] == 255


def test_coverage_sees_a_new_edge(native: bool) -> None:
    # jz skips a nop depending on eax: the two runs differ by one block and its edges.
    code = b"\x85\xc0\x74\x01\x90\xf4"  # test eax, eax; jz +1; nop; hlt
    uc = engine(code)
    tracer = attach_tracer(uc, REGIONS, native=native)
    seen = []
    for eax in (0, 1):
        tracer.reset(NO_BUDGET)
        uc.reg_write(UC_X86_REG_RAX, eax)
        uc.emu_start(CODE, 0)
        seen.append({i for i, count in enumerate(tracer.coverage()) if count})
    assert seen[0] and seen[1]
    assert seen[1] - seen[0]


def test_coverage_can_be_disabled(native: bool) -> None:
    _, tracer = run(loop(10), native, coverage=False)
    assert not any(tracer.coverage())
    assert tracer.recent_blocks()[-1] == CODE + 9


def test_reset_clears_coverage_and_blocks(native: bool) -> None:
    _, tracer = run(loop(10), native)
    tracer.reset(NO_BUDGET)
    assert not any(tracer.coverage())
    assert tracer.recent_blocks() == []
    assert tracer.instructions == 0


# --- both implementations agree ------------------------------------------------------------


def mixed_program() -> bytes:
    body = b"\x48\x89\xc8" + b"\x48\xc1\xe0\x0c" + b"\x89\x0c\x07" + b"\xff\xc9"
    head = b"".join(
        [
            mov_rdi(DATA),
            b"\xb9" + d(40),  # mov ecx, 40
            body,  # l: mov rax, rcx; shl rax, 12; mov [rdi+rax], ecx; dec ecx
            b"\x75" + bytes([256 - len(body) - 2]),  # jnz l
        ]
    )
    tail = b"".join(
        [
            mov_rdi(DATA + 0x50FFA),
            b"\x48\x89\x07",  # mov [rdi], rax: straddles region 1 pages 0x50 and 0x51
            mov_rdi(0x150800),
            b"\xb9" + d(700),  # mov ecx, 700
            b"\xf3\x48\xab",  # rep stosq: pages 0x150, 0x151, outside the regions
            b"\x87\x07",  # xchg [rdi], eax
            b"\xeb\xfe",  # jmp $
        ]
    )
    # call f, with f: ret placed after the final jmp $: a push and a pop of the stack.
    return head + b"\xe8" + d(len(tail)) + tail + b"\xc3"


def test_native_and_python_agree() -> None:
    if not tracing.native_available():
        pytest.skip("kernel_emu._tracer is not built")
    code = mixed_program()
    outcomes = []
    for native in (True, False):
        for budget in (5000, 57, 150, 2000):
            uc = engine(code)
            tracer = attach_tracer(uc, REGIONS, native=native)
            tracer.reset(budget)
            uc.emu_start(CODE, 0)
            outcomes.append(
                (
                    native,
                    budget,
                    tracer.instructions,
                    tracer.budget_exhausted,
                    tracer.take_dirty(),
                    tracer.recent_blocks(),
                    bytes(tracer.coverage()),
                    uc.reg_read(UC_X86_REG_RIP),
                )
            )
    half = len(outcomes) // 2
    for native_run, python_run in zip(outcomes[:half], outcomes[half:], strict=True):
        assert native_run[1:] == python_run[1:]
    # The full run really exercised the interesting cases; paging is off, so the straddle
    # is exact and no UNKNOWN_PAGE marker appears.
    full = outcomes[0]
    assert full[2:4] == (5000, True)
    assert full[4] == (
        [(OUTSIDE, 0x150), (OUTSIDE, 0x151), (0, (STACK_TOP - 8) >> 12)]
        + [(1, page) for page in range(1, 41)]
        + [(1, 0x50), (1, 0x51)]
    )


# --- port I/O ------------------------------------------------------------------------------

PORTS = PortConfig()
SERVICE_VALUE = 0x12345678


def run_ports(
    code: bytes, native: bool, budget: int = NO_BUDGET, ports: PortConfig = PORTS
) -> tuple[Uc, GuestTracer]:
    return run(code, native, budget, ports=ports)


def console_loop(message_address: int, n: int) -> bytes:
    # mov rsi, message; mov ecx, n; l: lodsb; out 0xe9, al; dec ecx; jnz l; hlt
    return b"\x48\xbe" + q(message_address) + b"\xb9" + d(n) + b"\xac\xe6\xe9\xff\xc9\x75\xf9\xf4"


def counting_console_loop(n: int) -> bytes:
    # mov ecx, n; l: mov eax, ecx; out 0xe9, al; dec ecx; jnz l; hlt
    return b"\xb9" + d(n) + b"\x89\xc8\xe6\xe9\xff\xc9\x75\xf8\xf4"


def counting_console_bytes(n: int) -> bytes:
    return bytes(k & 0xFF for k in range(n, 0, -1))


def test_console_captures_every_byte_exactly(native: bool) -> None:
    message = b"Rustux boot log\n" + bytes(range(256)) + b"\x00end"
    uc = engine(console_loop(DATA, len(message)))
    uc.mem_write(DATA, message)
    tracer = attach_tracer(uc, REGIONS, native=native, ports=PORTS)
    tracer.reset(NO_BUDGET)
    uc.emu_start(CODE, 0)
    assert tracer.console() == message
    assert tracer.console_dropped == 0
    assert tracer.instructions == 2 + 4 * len(message) + 1
    assert tracer.take_service() is None
    assert tracer.port_log() == []
    # Reading is not destructive; reset is what clears.
    assert tracer.console() == message
    tracer.reset(NO_BUDGET)
    assert tracer.console() == b""


def test_console_takes_the_low_byte_of_wide_writes(native: bool) -> None:
    # mov eax, 0xAABBCCDD; out 0xe9, ax; mov edx, 0xe9; out dx, eax; hlt
    code = b"\xb8" + d(0xAABBCCDD) + b"\x66\xe7\xe9" + b"\xba" + d(0xE9) + b"\xef\xf4"
    _, tracer = run_ports(code, native)
    assert tracer.console() == b"\xdd\xdd"
    assert tracer.port_log() == []


def test_console_is_capped_and_counts_dropped_bytes(
    native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if native:
        from kernel_emu import _tracer

        assert _tracer.CONSOLE_CAP == tracing.CONSOLE_CAP == 1 << 20
        cap = tracing.CONSOLE_CAP
    else:
        # A mebibyte of Python callbacks takes seconds; the fallback reads the cap at run
        # time, so a small one tests the same code path.
        cap = 100
        monkeypatch.setattr(tracing, "CONSOLE_CAP", cap)
    n = cap + 37
    _, tracer = run_ports(counting_console_loop(n), native)
    assert tracer.console() == counting_console_bytes(n)[:cap]
    assert tracer.console_dropped == 37
    assert tracer.instructions == 1 + 4 * n + 1
    tracer.reset(NO_BUDGET)
    assert tracer.console_dropped == 0


def service_program() -> bytes:
    return b"".join(
        [
            b"\xb8" + d(SERVICE_VALUE),  # mov eax, SERVICE_VALUE
            b"\xe7\xf0",  # out 0xf0, eax
            b"\xff\xc3",  # inc ebx
            b"\x89\xc1",  # mov ecx, eax
            b"\xf4",  # hlt
        ]
    )


def test_service_out_stops_right_after_the_out(native: bool) -> None:
    uc, tracer = run_ports(service_program(), native)
    assert uc.reg_read(UC_X86_REG_RIP) == CODE + 7
    assert uc.reg_read(UC_X86_REG_EBX) == 0  # the next instruction did not run ...
    assert tracer.instructions == 2  # ... and is not counted
    assert not tracer.budget_exhausted
    assert tracer.take_service() == SERVICE_VALUE
    assert tracer.take_service() is None  # cleared by reading
    # The caller performs the service, sets the result and resumes from RIP.
    uc.reg_write(UC_X86_REG_RAX, 0x55)
    uc.emu_start(uc.reg_read(UC_X86_REG_RIP), 0)
    assert uc.reg_read(UC_X86_REG_EBX) == 1
    assert uc.reg_read(UC_X86_REG_ECX) == 0x55
    assert tracer.instructions == 5
    assert tracer.take_service() is None
    assert tracer.port_log() == []


def test_service_out_of_any_width(native: bool) -> None:
    # mov eax, 0xAABBCCDD; mov edx, 0xf0; out dx, al; out dx, ax; hlt
    code = b"\xb8" + d(0xAABBCCDD) + b"\xba" + d(0xF0) + b"\xee\x66\xef\xf4"
    uc, tracer = run_ports(code, native)
    assert tracer.take_service() == 0xDD
    uc.emu_start(uc.reg_read(UC_X86_REG_RIP), 0)
    assert tracer.take_service() == 0xCCDD
    uc.emu_start(uc.reg_read(UC_X86_REG_RIP), 0)
    assert tracer.take_service() is None
    assert tracer.instructions == 5


def test_service_out_as_the_last_instruction_of_the_budget(native: bool) -> None:
    uc, tracer = run_ports(service_program(), native, budget=2)
    assert tracer.take_service() == SERVICE_VALUE
    assert not tracer.budget_exhausted
    uc.emu_start(uc.reg_read(UC_X86_REG_RIP), 0)
    assert tracer.budget_exhausted
    assert tracer.instructions == 2
    assert uc.reg_read(UC_X86_REG_RIP) == CODE + 7
    assert uc.reg_read(UC_X86_REG_EBX) == 0


def padded_service_program(pad: int) -> bytes:
    # pad x nop; out 0xf0, al; inc ebx; hlt
    return b"\x90" * pad + b"\xe6\xf0\xff\xc3\xf4"


def announcement_reaches_tracer(pad: int) -> bool:
    """Whether Unicorn announces the instruction after a service OUT before it stops.

    It does when the OUT is inside its translation block and the tracer's code hook is the
    only one; otherwise it stops at the next block's entry, or skips the announcement.  The
    probe is a fallback tracer alone (no extra hook: that would change the answer), whose
    swallow stays pending exactly when no announcement came.
    """
    uc = engine(padded_service_program(pad))
    tracer = attach_tracer(uc, REGIONS, native=False, ports=PORTS)
    tracer.reset(NO_BUDGET)
    uc.emu_start(CODE, 0)
    return not tracer.stop_pending  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def block_ending_pad() -> int:
    # Find how many nops Unicorn puts into one block under the tracer's hooks, then the
    # padding that makes the service OUT its block's last instruction.
    uc = engine(b"\x90" * 2000 + b"\xf4")
    tracer = attach_tracer(uc, REGIONS, native=False, ports=PORTS)
    tracer.reset(NO_BUDGET)
    uc.emu_start(CODE, 0)
    block = tracer.recent_blocks()[1] - CODE
    for pad in range(block, -1, -1):
        if not announcement_reaches_tracer(pad):
            return pad
    raise AssertionError("no padding makes the OUT end its block: Unicorn changed")


@pytest.mark.parametrize("where", ["announced", "end of block", "other code hook"])
def test_service_out_resumes_with_exact_counts(
    native: bool, where: str, request: pytest.FixtureRequest
) -> None:
    # Every way Unicorn can honour the stop: right after announcing the next instruction,
    # at the next block's entry when the OUT ended its block, or without announcing
    # anything to the tracer when another code hook exists.
    pad = request.getfixturevalue("block_ending_pad") if where == "end of block" else 3
    assert announcement_reaches_tracer(pad) == (where != "end of block")
    for reset_before_resume in (False, True):
        uc = engine(padded_service_program(pad))
        if where == "other code hook":
            uc.hook_add(UC_HOOK_CODE, lambda *args: None)
        tracer = attach_tracer(uc, REGIONS, native=native, ports=PORTS)
        tracer.reset(NO_BUDGET)
        uc.emu_start(CODE, 0)
        assert tracer.take_service() == 0
        assert tracer.instructions == pad + 1
        assert uc.reg_read(UC_X86_REG_RIP) == CODE + pad + 2
        assert uc.reg_read(UC_X86_REG_EBX) == 0
        if not native:  # the case under test really happened
            assert tracer.stop_pending == (where != "announced")  # type: ignore[attr-defined]
        if reset_before_resume:
            tracer.reset(NO_BUDGET)
        uc.emu_start(uc.reg_read(UC_X86_REG_RIP), 0)
        assert tracer.instructions == (2 if reset_before_resume else pad + 3)
        assert uc.reg_read(UC_X86_REG_EBX) == 1
        assert tracer.recent_blocks()[-1] == CODE + pad + 2


def in_program() -> bytes:
    store = b"\x89\x07\x48\x83\xc7\x04"  # mov [rdi], eax; add rdi, 4
    clear = b"\x31\xc0"  # xor eax, eax
    return b"".join(
        [
            mov_rdi(DATA),
            b"\xba" + d(0x3F8),  # mov edx, 0x3f8
            clear + b"\xe4\xe9" + store,  # in al, 0xe9
            clear + b"\xe5\xe9" + store,  # in eax, 0xe9
            clear + b"\xec" + store,  # in al, dx
            clear + b"\x66\xed" + store,  # in ax, dx
            clear + b"\xed" + store,  # in eax, dx
            clear + b"\xe4\xf0" + store,  # in al, 0xf0: the service port is not readable
            b"\xf4",
        ]
    )


@pytest.mark.parametrize("read_value", [0xE9, 0x12345678])
def test_in_returns_console_value_or_all_ones(native: bool, read_value: int) -> None:
    ports = PortConfig(console_read_value=read_value)
    uc, tracer = run_ports(in_program(), native, ports=ports)
    values = struct.unpack("<6I", uc.mem_read(DATA, 24))
    assert values == (read_value & 0xFF, read_value, 0xFF, 0xFFFF, 0xFFFF_FFFF, 0xFF)
    assert tracer.port_log() == [
        ("in", 0x3F8, 1, 0xFF),
        ("in", 0x3F8, 2, 0xFFFF),
        ("in", 0x3F8, 4, 0xFFFF_FFFF),
        ("in", 0xF0, 1, 0xFF),
    ]
    assert tracer.take_service() is None
    assert tracer.console() == b""


def test_other_port_writes_are_logged(native: bool) -> None:
    code = b"".join(
        [
            b"\xb8" + d(0xAABBCCDD),  # mov eax, 0xAABBCCDD
            b"\xe6\x80",  # out 0x80, al
            b"\xba" + d(0xCF8),  # mov edx, 0xcf8
            b"\x66\xef",  # out dx, ax
            b"\xef",  # out dx, eax
            b"\xf4",
        ]
    )
    _, tracer = run_ports(code, native)
    assert tracer.port_log() == [
        ("out", 0x80, 1, 0xDD),
        ("out", 0xCF8, 2, 0xCCDD),
        ("out", 0xCF8, 4, 0xAABBCCDD),
    ]
    assert tracer.console() == b""


def test_port_log_keeps_the_first_64(native: bool) -> None:
    # mov ecx, 100; l: mov eax, ecx; out 0x80, al; dec ecx; jnz l; hlt
    code = b"\xb9" + d(100) + b"\x89\xc8\xe6\x80\xff\xc9\x75\xf8\xf4"
    _, tracer = run_ports(code, native)
    assert tracer.port_log() == [("out", 0x80, 1, k) for k in range(100, 36, -1)]
    assert len(tracer.port_log()) == tracing.PORT_LOG_SIZE


def test_custom_ports(native: bool) -> None:
    ports = PortConfig(console=0x3F8, service=0x501, console_read_value=0)
    code = b"".join(
        [
            b"\xb8" + d(0x41),  # mov eax, 0x41
            b"\xba" + d(0x3F8),  # mov edx, 0x3f8
            b"\xee",  # out dx, al: the console now
            b"\xe6\xe9",  # out 0xe9, al: just another port
            b"\xba" + d(0x501),  # mov edx, 0x501
            b"\xef",  # out dx, eax: the service
            b"\xf4",
        ]
    )
    _, tracer = run_ports(code, native, ports=ports)
    assert tracer.console() == b"A"
    assert tracer.port_log() == [("out", 0xE9, 1, 0x41)]
    assert tracer.take_service() == 0x41


@pytest.mark.parametrize(
    "kwargs",
    [
        {"console": -1},
        {"service": 0x10000},
        {"console": 0x80, "service": 0x80},
        {"console_read_value": 1 << 32},
    ],
)
def test_bad_port_configs_are_rejected(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        PortConfig(**kwargs)


def test_reset_clears_port_results(native: bool) -> None:
    code = b"\xb0\x21\xe6\xe9\xe6\x80\xe7\xf0\xf4"  # mov al, '!'; out e9; out 80; out f0; hlt
    _, tracer = run_ports(code, native)
    assert tracer.console() == b"!"
    assert tracer.port_log() == [("out", 0x80, 1, 0x21)]
    tracer.reset(NO_BUDGET)
    assert tracer.console() == b""
    assert tracer.console_dropped == 0
    assert tracer.port_log() == []
    assert tracer.take_service() is None


def test_without_ports_no_port_hooks(native: bool) -> None:
    uc, tracer = run(service_program(), native)
    assert uc.reg_read(UC_X86_REG_ECX) == SERVICE_VALUE  # ran to the hlt
    assert tracer.instructions == 5
    assert tracer.take_service() is None
    assert tracer.console() == b""
    assert tracer.port_log() == []


def test_detach_removes_port_hooks(native: bool) -> None:
    uc, tracer = run_ports(counting_console_loop(3), native)
    tracer.detach()
    tracer.reset(NO_BUDGET)
    seen: list[int] = []
    uc.hook_add(UC_HOOK_INSN, lambda *args: seen.append(args[3]), None, 1, 0, UC_X86_INS_OUT)
    uc.emu_start(CODE, 0)
    assert seen == [3, 2, 1]
    assert tracer.console() == b""


def test_only_the_first_in_hook_answers(native: bool) -> None:
    # Pins the Unicorn behaviour attach_tracer warns about: OUT reaches every hook, IN only
    # the first one registered.
    uc = engine(b"\xe4\xe9\x89\xc3\xb0\x5a\xe6\xe9\xf4")  # in al, e9; mov ebx, eax; out; hlt
    outs: list[int] = []
    uc.hook_add(UC_HOOK_INSN, lambda *args: 0x42, None, 1, 0, UC_X86_INS_IN)
    uc.hook_add(UC_HOOK_INSN, lambda *args: outs.append(args[3]), None, 1, 0, UC_X86_INS_OUT)
    tracer = attach_tracer(uc, REGIONS, native=native, ports=PORTS)
    tracer.reset(NO_BUDGET)
    uc.emu_start(CODE, 0)
    assert uc.reg_read(UC_X86_REG_EBX) == 0x42
    assert outs == [0x5A]
    assert tracer.console() == b"\x5a"


def test_native_ports_use_no_python_callback(monkeypatch: pytest.MonkeyPatch) -> None:
    if not tracing.native_available():
        pytest.skip("kernel_emu._tracer is not built")
    uc = engine(counting_console_loop(1000))

    def no_python_hooks(*args: object, **kwargs: object) -> int:
        raise AssertionError("the native tracer registered a Python hook")

    monkeypatch.setattr(uc, "hook_add", no_python_hooks)
    tracer = attach_tracer(uc, REGIONS, native=True, ports=PORTS)
    tracer.reset(NO_BUDGET)
    uc.emu_start(CODE, 0)
    assert tracer.console() == counting_console_bytes(1000)
    # The binding keeps every Python callback it hands to Unicorn here.
    assert not getattr(uc, "_callbacks", {})


def mixed_port_program() -> bytes:
    body = b"".join(
        [
            b"\x89\xc8",  # mov eax, ecx
            b"\x04\x40",  # add al, 0x40
            b"\xe6\xe9",  # out 0xe9, al
            b"\x89\x07",  # mov [rdi], eax
            b"\x48\x81\xc7" + d(0x1000),  # add rdi, 0x1000
            b"\xff\xc9",  # dec ecx
        ]
    )
    return b"".join(
        [
            mov_rdi(DATA),
            b"\xb9" + d(20),  # mov ecx, 20
            body,
            b"\x75" + bytes([256 - len(body) - 2]),  # jnz body
            b"\xba" + d(0x3F8),  # mov edx, 0x3f8
            b"\xec",  # in al, dx
            b"\xe6\x80",  # out 0x80, al
            b"\xe5\xe9",  # in eax, 0xe9
            b"\xb8" + d(7),  # mov eax, 7
            b"\xe7\xf0",  # out 0xf0, eax: the driver answers eax = 8
            b"\x89\xc3",  # mov ebx, eax
            b"\xe6\xe9",  # out 0xe9, al
            b"\xb8" + d(9),  # mov eax, 9
            b"\xe7\xf0",  # out 0xf0, eax: the driver answers eax = 10
            b"\x89\x07",  # mov [rdi], eax
            b"\xef",  # out dx, eax
            b"\xeb\xfe",  # jmp $
        ]
    )


def drive_with_services(uc: Uc, tracer: GuestTracer) -> list[tuple[int, int, int]]:
    """Run to the end, answering each service request with its value + 1."""
    services = []
    rip = CODE
    while True:
        uc.emu_start(rip, 0)
        service = tracer.take_service()
        if service is None:
            return services
        rip = uc.reg_read(UC_X86_REG_RIP)
        services.append((service, tracer.instructions, rip))
        uc.reg_write(UC_X86_REG_RAX, service + 1)


def test_native_and_python_agree_on_ports() -> None:
    if not tracing.native_available():
        pytest.skip("kernel_emu._tracer is not built")
    code = mixed_port_program()
    budgets = [5, 2000, *range(140, 160)]
    outcomes = {}
    for native in (True, False):
        for budget in budgets:
            uc = engine(code)
            tracer = attach_tracer(uc, REGIONS, native=native, ports=PORTS)
            tracer.reset(budget)
            services = drive_with_services(uc, tracer)
            outcomes[native, budget] = (
                services,
                tracer.instructions,
                tracer.budget_exhausted,
                tracer.console(),
                tracer.console_dropped,
                tracer.port_log(),
                tracer.take_dirty(),
                tracer.recent_blocks(),
                bytes(tracer.coverage()),
                uc.reg_read(UC_X86_REG_RIP),
                uc.reg_read(UC_X86_REG_RAX),
                uc.reg_read(UC_X86_REG_RBX),
            )
    for budget in budgets:
        assert outcomes[True, budget] == outcomes[False, budget], budget
    # The full run exercised every kind of access.
    full = outcomes[True, 2000]
    loop_end = 2 + 20 * 7
    end = CODE + len(code)
    assert full[0] == [(7, loop_end + 6, end - 16), (9, loop_end + 10, end - 5)]
    assert full[1:3] == (2000, True)
    assert full[3] == bytes(0x40 + k for k in range(20, 0, -1)) + b"\x08"
    assert full[5] == [("in", 0x3F8, 1, 0xFF), ("out", 0x80, 1, 0xFF), ("out", 0x3F8, 4, 10)]
    assert full[6] == [(1, page) for page in range(21)]
    assert full[9:] == (end - 2, 10, 8)


# --- watches -------------------------------------------------------------------------------

PROLOGUE = b"\x55\x48\x89\xe5"  # push rbp; mov rbp, rsp
EPILOGUE = b"\x5d\xc3"  # pop rbp; ret
HLT = b"\xf4"
# A fake outermost frame above the stack: its saved rbp of 0 ends every frame-pointer walk.
OUTER_FRAME = STACK_TOP + 0x100
OUTER_RETURN = 0xFFFF_FFFF_8000_1234


def call(at: int, target: int) -> bytes:
    return b"\xe8" + struct.pack("<i", target - (at + 5))


def watch_run(
    code: bytes,
    native: bool,
    watch: list[int],
    budget: int = NO_BUDGET,
    rbp: int = 0,
    **kwargs: Any,
) -> tuple[Uc, GuestTracer]:
    uc = engine(code)
    uc.mem_write(OUTER_FRAME, q(0) + q(OUTER_RETURN))
    uc.reg_write(UC_X86_REG_RBP, rbp)
    tracer = attach_tracer(uc, REGIONS, native=native, **kwargs)
    tracer.watch(watch)
    tracer.reset(budget)
    uc.emu_start(CODE, 0)
    return uc, tracer


# main: mov rdi, A; mov rsi, B; mov rdx, C; mov ecx, D; call f; hlt
# f:    push rbp; mov rbp, rsp; mov rax, rdi; add rax, rsi; pop rbp; ret
MAIN = b"".join(
    [
        mov_rdi(0x1111_0000_0000_1111),
        b"\x48\xbe" + q(0x2222),  # mov rsi, imm64
        b"\x48\xba" + q(0x3333),  # mov rdx, imm64
        b"\xb9" + d(0x4444),  # mov ecx, imm32
    ]
)
CALL_SITE = CODE + len(MAIN)
AFTER_CALL = CALL_SITE + 5
F = AFTER_CALL + 1
F_BODY = PROLOGUE + b"\x48\x89\xf8" + b"\x48\x01\xf0" + EPILOGUE
F_RET = F + len(F_BODY) - 1
CALL_PROGRAM = MAIN + call(CALL_SITE, F) + HLT + F_BODY


def test_watch_records_entry_and_ret_with_registers(native: bool) -> None:
    uc, tracer = watch_run(CALL_PROGRAM, native, [F_RET, F])
    assert tracer.instructions == 5 + 6 + 1
    assert uc.reg_read(UC_X86_REG_RIP) == AFTER_CALL + 1  # the guest was never stopped
    entry, ret = tracer.take_events()
    # At f's first instruction: four movs and the call have run; rbp is still main's (0).
    assert entry == WatchEvent(
        address=F,
        instructions=5,
        rip=F,
        rsp=STACK_TOP - 8,
        rbp=0,
        rax=0,
        rdi=0x1111_0000_0000_1111,
        rsi=0x2222,
        rdx=0x3333,
        rcx=0x4444,
        r8=0,
        frames=(AFTER_CALL,),
    )
    # At the ret: push, mov, mov, add and pop have run too; rax holds the result.
    assert ret == WatchEvent(
        address=F_RET,
        instructions=10,
        rip=F_RET,
        rsp=STACK_TOP - 8,
        rbp=0,
        rax=0x1111_0000_0000_3333,
        rdi=0x1111_0000_0000_1111,
        rsi=0x2222,
        rdx=0x3333,
        rcx=0x4444,
        r8=0,
        frames=(AFTER_CALL,),
    )
    assert tracer.events_dropped == 0


def test_watch_event_is_frozen() -> None:
    event = WatchEvent(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, (12,))
    with pytest.raises(AttributeError):
        event.rax = 0  # type: ignore[misc]


def chain_program(tail: bytes = HLT) -> tuple[bytes, dict[str, int]]:
    """main calls a, a calls b, b calls c, then main jumps to ``tail``.

    a, b and c keep frame pointers.
    """
    a = CODE + 7
    b = a + 11
    c = b + 11
    end = c + 11
    code = b"".join(
        [
            call(CODE, a) + b"\xeb" + bytes([end - (CODE + 7)]),  # call a; jmp tail
            PROLOGUE + call(a + 4, b) + EPILOGUE,
            PROLOGUE + call(b + 4, c) + EPILOGUE,
            PROLOGUE + b"\xb8" + d(1) + EPILOGUE,  # mov eax, 1
            tail,
        ]
    )
    labels = {
        "a": a,
        "c": c,
        "c_ret": c + 10,
        "tail": end,
        "ret_main": CODE + 5,
        "ret_a": a + 9,
        "ret_b": b + 9,
    }
    return code, labels


def test_watch_frames_follow_the_frame_pointer_chain(native: bool) -> None:
    code, at = chain_program()
    _, tracer = watch_run(code, native, [at["a"], at["c"], at["c_ret"]], rbp=OUTER_FRAME)
    a_entry, c_entry, c_ret = tracer.take_events()
    assert a_entry.frames == (at["ret_main"], OUTER_RETURN)
    assert (a_entry.instructions, a_entry.rbp) == (1, OUTER_FRAME)
    chain = (at["ret_b"], at["ret_a"], at["ret_main"], OUTER_RETURN)
    # At c's entry rbp is b's frame; at c's ret, pop rbp has restored it.
    for event, instructions in ((c_entry, 7), (c_ret, 11)):
        assert event.frames == chain
        assert event.instructions == instructions
        assert event.rsp == STACK_TOP - 5 * 8
        assert event.rbp == STACK_TOP - 4 * 8
    assert c_ret.rax == 1


def walk_program() -> bytes:
    return b"\x90" + HLT  # nop (watched); hlt


def walk(native: bool, rsp: int, rbp: int, memory: dict[int, int]) -> tuple[int, ...]:
    uc = engine(walk_program())
    for address, value in memory.items():
        uc.mem_write(address, q(value))
    uc.reg_write(UC_X86_REG_RSP, rsp)
    uc.reg_write(UC_X86_REG_RBP, rbp)
    tracer = attach_tracer(uc, REGIONS, native=native)
    tracer.watch([CODE])
    tracer.reset(NO_BUDGET)
    uc.emu_start(CODE, 0)
    (event,) = tracer.take_events()
    assert (event.rsp, event.rbp) == (rsp, rbp)
    return event.frames


def frames_at(base: int, count: int, step: int = 0x40) -> dict[int, int]:
    """A chain of ``count`` rising frames at base, base + step, ...; the last saves rbp 0."""
    memory = {}
    for k in range(count):
        frame = base + k * step
        memory[frame] = frame + step if k + 1 < count else 0
        memory[frame + 8] = 0xF000 + k
    return memory


TOP = STACK_TOP - 0x800  # where the walk tests put [rsp]
UNMAPPED = RAM_SIZE + 0x1000


@pytest.mark.parametrize(
    ("rbp", "memory", "expected"),
    [
        pytest.param(0, {}, (0xAA,), id="rbp-zero"),
        pytest.param(STACK_TOP, frames_at(STACK_TOP, 3), (0xAA, 0xF000, 0xF001, 0xF002), id="3"),
        pytest.param(STACK_TOP, frames_at(STACK_TOP, 40), (0xAA, *range(0xF000, 0xF00F)), id="cap"),
        pytest.param(STACK_TOP + 4, frames_at(STACK_TOP + 4, 3), (0xAA,), id="misaligned-rbp"),
        pytest.param(
            STACK_TOP,
            {**frames_at(STACK_TOP, 3), STACK_TOP + 0x40: STACK_TOP + 0x44},
            (0xAA, 0xF000, 0xF001),
            id="misaligned-next",
        ),
        pytest.param(
            STACK_TOP,
            {**frames_at(STACK_TOP, 3), STACK_TOP + 0x40: STACK_TOP},
            (0xAA, 0xF000, 0xF001),
            id="falling",
        ),
        pytest.param(
            STACK_TOP,
            {**frames_at(STACK_TOP, 3), STACK_TOP + 0x40: STACK_TOP + 0x40},
            (0xAA, 0xF000, 0xF001),
            id="self-loop",
        ),
        pytest.param(UNMAPPED, {}, (0xAA,), id="rbp-unmapped"),
        pytest.param(RAM_SIZE - 8, {RAM_SIZE - 8: 0}, (0xAA,), id="frame-straddles-end"),
        pytest.param(
            STACK_TOP,
            {**frames_at(STACK_TOP, 3), STACK_TOP + 0x40: UNMAPPED},
            (0xAA, 0xF000, 0xF001),
            id="next-unmapped",
        ),
        pytest.param((1 << 64) - 8, {}, (0xAA,), id="rbp-top-of-space"),
    ],
)
def test_watch_frame_walk_rules(
    native: bool, rbp: int, memory: dict[int, int], expected: tuple[int, ...]
) -> None:
    assert walk(native, TOP, rbp, {TOP: 0xAA, **memory}) == expected


def test_watch_frame_walk_stops_at_unreadable_rsp(native: bool) -> None:
    assert walk(native, UNMAPPED, STACK_TOP, frames_at(STACK_TOP, 3)) == ()


def test_watch_frame_walk_is_capped() -> None:
    assert tracing.MAX_FRAMES == 16
    if tracing.native_available():
        from kernel_emu import _tracer

        assert _tracer.MAX_FRAMES == tracing.MAX_FRAMES
        assert _tracer.WATCH_MAX == tracing.WATCH_MAX == 32
        assert _tracer.EVENT_CAP == tracing.EVENT_CAP == 4096


def test_watch_reads_stack_memory_by_physical_address(native: bool) -> None:
    # Unicorn's uc_mem_read ignores paging: with the stack page remapped, [rsp] is read from
    # the physical page numbered like the virtual one.  The kernel is identity-mapped.
    uc = engine(CALL_PROGRAM)
    enable_paging(uc, {(STACK_TOP - 8) >> 12: 0x230})
    uc.mem_write(STACK_TOP - 8, q(0xFEED))
    tracer = attach_tracer(uc, REGIONS, native=native)
    tracer.watch([F])
    tracer.reset(NO_BUDGET)
    uc.emu_start(CODE, 0)
    (event,) = tracer.take_events()
    assert event.rsp == STACK_TOP - 8
    assert event.frames == (0xFEED,)
    assert uc.mem_read(0x230000 + ((STACK_TOP - 8) & 0xFFF), 8) == q(AFTER_CALL)


def test_watch_gives_one_event_per_execution(native: bool) -> None:
    n = 50
    _, tracer = watch_run(loop(n), native, [CODE + 5])  # dec ecx
    events = tracer.take_events()
    assert [e.instructions for e in events] == [1 + 2 * k for k in range(n)]
    assert [e.rcx for e in events] == list(range(n, 0, -1))
    assert {e.address for e in events} == {CODE + 5}


def test_watch_respects_the_budget(native: bool) -> None:
    # mov, (dec, jnz) x 3: the fourth dec is announced but does not run: no event for it.
    uc, tracer = watch_run(loop(100), native, [CODE + 5], budget=7)
    assert tracer.budget_exhausted
    assert [e.instructions for e in tracer.take_events()] == [1, 3, 5]
    tracer.reset(2)
    uc.emu_start(uc.reg_read(UC_X86_REG_RIP), 0)
    (event,) = tracer.take_events()
    assert (event.instructions, event.rcx) == (0, 97)


@pytest.mark.parametrize("where", ["announced", "end of block", "other code hook"])
def test_watch_after_a_service_stop_gives_one_event(
    native: bool, where: str, request: pytest.FixtureRequest
) -> None:
    # The instruction after a service OUT may be announced before the stop; it runs only
    # after the resume and must give exactly one event, counted like the instruction.
    pad = request.getfixturevalue("block_ending_pad") if where == "end of block" else 3
    uc = engine(padded_service_program(pad))
    if where == "other code hook":
        uc.hook_add(UC_HOOK_CODE, lambda *args: None)
    tracer = attach_tracer(uc, REGIONS, native=native, ports=PORTS)
    tracer.watch([CODE + pad + 2])  # inc ebx
    tracer.reset(NO_BUDGET)
    uc.emu_start(CODE, 0)
    assert tracer.take_service() == 0
    assert tracer.take_events() == []
    uc.emu_start(uc.reg_read(UC_X86_REG_RIP), 0)
    (event,) = tracer.take_events()
    assert (event.address, event.instructions) == (CODE + pad + 2, pad + 1)


def test_take_events_forgets_and_reset_clears(native: bool) -> None:
    uc, tracer = watch_run(CALL_PROGRAM, native, [F, F_RET])
    assert len(tracer.take_events()) == 2
    assert tracer.take_events() == []
    # Events of a later run without reset are appended after a take, counted on.
    uc.reg_write(UC_X86_REG_RSP, STACK_TOP)
    uc.emu_start(CODE, 0)
    assert [(e.address, e.instructions) for e in tracer.take_events()] == [(F, 17), (F_RET, 22)]
    uc.reg_write(UC_X86_REG_RSP, STACK_TOP)
    uc.emu_start(CODE, 0)
    tracer.reset(NO_BUDGET)
    assert tracer.take_events() == []
    # The watched set survives the reset.
    uc.reg_write(UC_X86_REG_RSP, STACK_TOP)
    uc.emu_start(CODE, 0)
    assert [(e.address, e.instructions) for e in tracer.take_events()] == [(F, 5), (F_RET, 10)]



def test_events_are_watch_events_whichever_tracer(native: bool) -> None:
    """The native tracer makes its events as WatchEvent itself: the same type, fields and
    values as the Python tracer's, frozen alike; it refuses a type that is no NamedTuple."""
    _, tracer = watch_run(CALL_PROGRAM, native, [F, F_RET])
    events = tracer.take_events()
    assert [type(e) for e in events] == [WatchEvent, WatchEvent]
    assert events[0].address == events[0].rip == F and events[1].rsp == events[0].rsp
    assert events[0] == WatchEvent(*events[0]) and events[0]._asdict()["frames"]
    with pytest.raises(AttributeError):
        events[0].rax = 0  # type: ignore[misc]
    if native:
        state = tracer._state  # type: ignore[attr-defined]
        with pytest.raises(TypeError):
            state.take_events(dict)
        with pytest.raises(TypeError):
            state.take_events(42)

def test_watch_replaces_the_set(native: bool) -> None:
    uc, tracer = watch_run(CALL_PROGRAM, native, [F, F_RET])
    tracer.take_events()
    for watched, expected in (([F_RET], [F_RET]), ([], []), ([CALL_SITE, F], [CALL_SITE, F])):
        tracer.watch(watched)
        tracer.reset(NO_BUDGET)
        uc.reg_write(UC_X86_REG_RSP, STACK_TOP)
        uc.emu_start(CODE, 0)
        assert [e.address for e in tracer.take_events()] == expected


def test_watch_without_watches_records_nothing(native: bool) -> None:
    _, tracer = run(CALL_PROGRAM, native)
    assert tracer.take_events() == []
    assert tracer.events_dropped == 0


def check_event_cap(native: bool) -> None:
    cap = tracing.EVENT_CAP
    n = cap + 37
    uc, tracer = watch_run(loop(n), native, [CODE + 5])
    assert tracer.instructions == 2 + 2 * n
    events = tracer.take_events()
    assert [e.instructions for e in events] == [1 + 2 * k for k in range(cap)]
    assert tracer.events_dropped == 37
    # A take makes room again; drops keep counting until reset.
    uc.emu_start(CODE, 0)
    assert len(tracer.take_events()) == cap
    assert tracer.events_dropped == 37 + 37
    tracer.reset(NO_BUDGET)
    assert tracer.events_dropped == 0


def test_events_are_capped_and_drops_counted(native: bool) -> None:
    check_event_cap(native)


def test_python_event_cap_is_read_at_run_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracing, "EVENT_CAP", 10)
    check_event_cap(native=False)


def test_watch_rejects_bad_sets(native: bool) -> None:
    _, tracer = run(b"\xf4", native)
    tracer.watch(range(CODE, CODE + tracing.WATCH_MAX))
    tracer.watch([CODE] * 100)  # duplicates count once
    with pytest.raises(ValueError):
        tracer.watch(range(CODE, CODE + tracing.WATCH_MAX + 1))
    with pytest.raises(ValueError):
        tracer.watch([-1])
    with pytest.raises(ValueError):
        tracer.watch([1 << 64])
    with pytest.raises(TypeError):
        tracer.watch([1.5])  # type: ignore[list-item]


def test_native_state_rejects_too_many_watches() -> None:
    if not tracing.native_available():
        pytest.skip("kernel_emu._tracer is not built")
    uc = engine(b"\xf4")
    tracer = attach_tracer(uc, REGIONS, native=True)
    state = tracer.state  # type: ignore[attr-defined]
    with pytest.raises(ValueError):
        state.watch(list(range(tracing.WATCH_MAX + 1)))
    state.watch([5, 3, 3, 9])
    assert state.watched() == (3, 5, 9)


def mixed_watch_program() -> tuple[bytes, list[int]]:
    """The call chain, then a loop calling f: many events with varied registers."""
    _, at = chain_program()
    # tail: mov ecx, 30; l: mov rdi, rcx; push rcx; call c; pop rcx; dec ecx; jnz l; hlt
    loop_at = at["tail"] + 5
    body = b"\x48\x89\xcf\x51" + call(loop_at + 4, at["c"]) + b"\x59\xff\xc9"
    code, at = chain_program(b"\xb9" + d(30) + body + b"\x75" + bytes([256 - len(body) - 2]) + HLT)
    return code, [at["a"], at["c"], at["c_ret"], loop_at]


def test_native_and_python_agree_on_watches() -> None:
    if not tracing.native_available():
        pytest.skip("kernel_emu._tracer is not built")
    code, watched = mixed_watch_program()
    outcomes = {}
    for native in (True, False):
        for budget in (NO_BUDGET, 3, 8, 11, 57, 150):
            _, tracer = watch_run(code, native, watched, budget, rbp=OUTER_FRAME)
            outcomes[native, budget] = (
                tracer.take_events(),
                tracer.events_dropped,
                tracer.instructions,
                tracer.recent_blocks(),
            )
    for key, outcome in outcomes.items():
        assert outcome == outcomes[False, key[1]], key
    events = outcomes[True, NO_BUDGET][0]
    assert len(events) == 3 + 30 * 3
    assert {len(e.frames) for e in events} == {2, 4}
    assert {e.rdi for e in events} == set(range(31))


def test_native_watch_uses_no_python_callback(monkeypatch: pytest.MonkeyPatch) -> None:
    if not tracing.native_available():
        pytest.skip("kernel_emu._tracer is not built")
    uc = engine(CALL_PROGRAM)

    def no_python_hooks(*args: object, **kwargs: object) -> int:
        raise AssertionError("the native tracer registered a Python hook")

    monkeypatch.setattr(uc, "hook_add", no_python_hooks)
    tracer = attach_tracer(uc, REGIONS, native=True)
    tracer.watch([F, F_RET])
    tracer.reset(NO_BUDGET)
    uc.emu_start(CODE, 0)
    assert len(tracer.take_events()) == 2
    assert not getattr(uc, "_callbacks", {})


# --- lifetime -----------------------------------------------------------------------------


def test_detach_stops_recording(native: bool) -> None:
    uc, tracer = run(loop(10), native)
    tracer.detach()
    tracer.detach()  # idempotent
    tracer.reset(NO_BUDGET)
    uc.emu_start(CODE, 0)
    assert tracer.instructions == 0
    assert tracer.take_dirty() == []


def test_two_tracers_on_one_engine(native: bool) -> None:
    uc = engine(loop(10))
    first = attach_tracer(uc, REGIONS, native=native)
    second = attach_tracer(uc, REGIONS, native=native)
    first.reset(NO_BUDGET)
    second.reset(NO_BUDGET)
    uc.emu_start(CODE, 0)
    assert first.instructions == second.instructions == 22
    first.detach()
    second.reset(NO_BUDGET)
    uc.emu_start(CODE, 0)
    assert second.instructions == 22


def test_dropped_tracer_keeps_hooks_safe(native: bool) -> None:
    # The engine owns the native state, so dropping the tracer cannot free memory a
    # registered hook still writes to; dropping both must not crash either.
    uc = engine(loop(10))
    attach_tracer(uc, REGIONS, native=native).reset(NO_BUDGET)
    gc.collect()
    uc.emu_start(CODE, 0)
    del uc
    gc.collect()


def test_attach_detach_churn(native: bool) -> None:
    for round_ in range(50):
        uc = engine(loop(3))
        tracer = attach_tracer(uc, REGIONS, native=native)
        tracer.reset(NO_BUDGET)
        uc.emu_start(CODE, 0)
        assert tracer.instructions == 8
        if round_ % 2:
            tracer.detach()
    gc.collect()


@pytest.mark.parametrize(
    "regions",
    [
        [(0x800, 0x1000)],
        [(0, 0x1800)],
        [(0, 0)],
        [(0, 0x2000), (0x1000, 0x1000)],
    ],
)
def test_bad_regions_are_rejected(native: bool, regions: list[tuple[int, int]]) -> None:
    uc = engine(b"\xf4")
    with pytest.raises(ValueError):
        attach_tracer(uc, regions, native=native)


def test_fallback_when_extension_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracing, "native_tracer", None)
    uc = engine(loop(2))
    with pytest.warns(RuntimeWarning):
        tracer = attach_tracer(uc, REGIONS)
    assert not tracer.native
    tracer.reset(NO_BUDGET)
    uc.emu_start(CODE, 0)
    assert tracer.instructions == 6
