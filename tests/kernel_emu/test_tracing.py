"""Guest tracing on hand-assembled x86-64 snippets: exact counts, budget, dirty pages, coverage.

Every behavioural test runs against both the native hooks and the Python fallback, and one
test runs a mixed program through both and compares every result.
"""

from __future__ import annotations

import gc
import struct
from collections import Counter

import pytest
from unicorn import UC_ARCH_X86, UC_MODE_64, Uc
from unicorn.x86_const import (
    UC_X86_REG_CR0,
    UC_X86_REG_CR3,
    UC_X86_REG_CR4,
    UC_X86_REG_ECX,
    UC_X86_REG_RAX,
    UC_X86_REG_RIP,
    UC_X86_REG_RSP,
)

from kernel_emu import tracing
from kernel_emu.tracing import (
    NO_BUDGET,
    OUTSIDE,
    UNKNOWN_PAGE,
    GuestTracer,
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
    code: bytes, native: bool, budget: int = NO_BUDGET, **kwargs: bool
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
    monkeypatch.setattr(tracing, "_tracer", None)
    uc = engine(loop(2))
    with pytest.warns(RuntimeWarning):
        tracer = attach_tracer(uc, REGIONS)
    assert not tracer.native
    tracer.reset(NO_BUDGET)
    uc.emu_start(CODE, 0)
    assert tracer.instructions == 6
