"""Counting instructions per translated block (kernel_emu/native/blockcount.h) gives every
count, stop, event and Result exactly as the code hook on every instruction does.

Each test runs the same thing both ways and compares: a hand-assembled loop stopped at every
instruction count, a watched instruction inside blocks counted whole, a fault part-way through
a block, and the seed kernel's runs of mutated inputs, bug reproducers, hangs and faults."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from unicorn import UC_ARCH_X86, UC_MODE_64, Uc, UcError
from unicorn.x86_const import (
    UC_X86_REG_RAX,
    UC_X86_REG_RBX,
    UC_X86_REG_RCX,
    UC_X86_REG_RDX,
    UC_X86_REG_RIP,
)

from kernel_emu.executor import Executor
from kernel_emu.profile import load_profile
from kernel_emu.tracing import NativeTracer, attach_tracer
from tests.reproducers import REPRODUCERS

BASE = 0x1000
# mov ecx, 20; L: add eax, 1; inc ebx; nop; dec ecx; jnz L; add eax, 5; <tail>; add eax, 7; hlt
HEAD = bytes.fromhex("b914000000" "83c001" "ffc3" "90" "ffc9" "75f6" "83c005")
LOOP = BASE + 5
WATCHED = BASE + 10  # the nop, three instructions into the loop's block
LOAD_UNMAPPED = bytes.fromhex("488b142500002000")  # mov rdx, [0x200000]
END_TAIL = bytes.fromhex("83c007" "f4")
END_TAIL_AT = BASE + len(HEAD) + 3  # its hlt
ROOT = Path(__file__).parents[2]


def _machine(code: bytes, blocks: bool,
             until: int = BASE + 0x80) -> tuple[Uc, NativeTracer, int]:
    """`until` by default is never reached: hlt stops the guest, in a block counted whole."""
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, 0x10000)
    uc.mem_write(BASE, code)
    tracer = attach_tracer(uc, [(0, 0x10000)], native=True, coverage=True)
    assert isinstance(tracer, NativeTracer)
    tracer.watch([WATCHED])
    if blocks:
        tracer.count_blocks([(BASE, BASE + 0x100)], [], until)
        assert tracer.counts_blocks
    return uc, tracer, until


def _run(uc: Uc, tracer: NativeTracer, until: int, budget: int) -> dict[str, Any]:
    tracer.end_run()
    tracer.reset(budget)
    for reg in (UC_X86_REG_RAX, UC_X86_REG_RBX, UC_X86_REG_RCX):
        uc.reg_write(reg, 0)
    error = None
    try:
        uc.emu_start(BASE, until)
    except UcError as e:
        error = str(e)
        assert tracer.settle(uc.reg_read(UC_X86_REG_RIP))
    return {"instructions": tracer.instructions, "exhausted": tracer.budget_exhausted,
            "rip": uc.reg_read(UC_X86_REG_RIP), "rax": uc.reg_read(UC_X86_REG_RAX),
            "rbx": uc.reg_read(UC_X86_REG_RBX), "error": error,
            "events": [(e.address, e.instructions) for e in tracer.take_events()],
            "blocks": tracer.recent_blocks(), "coverage": bytes(tracer.coverage())}


def test_a_loop_stopped_at_every_count_gives_the_same_state() -> None:
    code = HEAD + END_TAIL
    exact, blocks = _machine(code, False), _machine(code, True)
    total = _run(*exact, 10**6)["instructions"]
    assert total == 1 + 20 * 5 + 3  # hlt included
    for budget in range(total + 2):
        assert _run(*blocks, budget) == _run(*exact, budget), budget
    counts = blocks[1].block_counts()
    assert counts is not None and counts["counted"] > 0 and counts["points"] > 0
    assert not counts["inexact"]


def test_a_fault_part_way_through_a_block_is_counted_to_the_faulting_instruction() -> None:
    code = HEAD + LOAD_UNMAPPED + END_TAIL
    exact, blocks = _machine(code, False), _machine(code, True)
    want = _run(*exact, 10**6)
    assert want["error"] is not None and want["rip"] == BASE + len(HEAD)
    assert _run(*blocks, 10**6) == want
    # and stopped by a budget before it, in the block that faults
    for budget in range(want["instructions"] - 3, want["instructions"] + 1):
        assert _run(*blocks, budget) == _run(*exact, budget), budget


# the address of each instruction of HEAD + END_TAIL
INSTRUCTIONS = [BASE, LOOP, LOOP + 3, WATCHED, WATCHED + 1, WATCHED + 3, WATCHED + 5,
                WATCHED + 8, WATCHED + 11]


@pytest.mark.parametrize("blocks", [False, True], ids=["per-instruction", "per-block"])
def test_the_tracers_exit_stops_where_unicorns_until_does(blocks: bool) -> None:
    """`exit_at` in place of emu_start's `until`: at every instruction, at a block's start
    or inside it, the watched one included, with budgets that end before, at and after it,
    the same count, registers, events, recent blocks and coverage as `until` gives."""
    code = HEAD + END_TAIL
    for stop in INSTRUCTIONS:
        # both count blocks for runs to `stop`: one stopped there by Unicorn, one by the tracer
        want_uc, want_tracer, _ = _machine(code, blocks, until=stop)
        uc, tracer, _ = _machine(code, blocks, until=stop)
        tracer.exit_at(stop)
        first = _run(want_uc, want_tracer, stop, 10**6)["instructions"]
        # from the largest budget down: the runs that reach it before those that do not
        for budget in sorted({0, 1, max(first - 1, 0), first, first + 1, 10**6}, reverse=True):
            want = _run(want_uc, want_tracer, stop, budget)
            got = _run(uc, tracer, 0, budget)  # `until` has no effect once exits are taken
            assert got == want, (hex(stop), budget)
            assert tracer.exited == (not want["exhausted"] and want["rip"] == stop)
        assert tracer.exited == (stop == BASE)  # the last one, budget 0, reaches only BASE
        tracer.detach()
        assert _run(uc, tracer, LOOP, 10**6)["rip"] == LOOP  # and `until` stops it again


def _job_inputs(base: bytes) -> list[bytes]:
    rng = random.Random(11)
    seeds = [p.read_bytes() for p in sorted((ROOT / "corpus" / "seeds").glob("*.elf"))]
    out = [base, b"", b"junk", *(r.make(base) for r in REPRODUCERS)]
    for _ in range(120):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randrange(1, 9)):
            where = rng.randrange(min(len(data), 0x200)) if rng.random() < 0.8 \
                else rng.randrange(len(data))
            data[where] = rng.randrange(256)
        out.append(bytes(data))
    return out


@pytest.mark.parametrize("kernel", ["seed", "fixed"])
def test_kernel_runs_are_the_same_counted_per_block(kernel: str) -> None:
    """As a fuzzing job runs them (coverage on, the watchdog stopping stalled runs): every
    Result, coverage map and recent-block ring the same, for runs that halt, enter ring 3,
    fault, hang and are stopped by the watchdog."""
    base = (ROOT / "fuzzfarm" / "examples" / "three-segments.elf").read_bytes()
    profile = load_profile(kernel)
    exact = Executor(profile, coverage=True, watchdog=200_000, count_blocks=False)
    blocks = Executor(profile, coverage=True, watchdog=200_000)
    assert isinstance(blocks.tracer, NativeTracer) and blocks.tracer.counts_blocks
    stops = set()
    for data in _job_inputs(base):
        want = exact.run(data)
        got = blocks.run(data)
        assert got.to_json() == want.to_json(), data[:64]
        assert blocks.coverage_map() == exact.coverage_map()
        assert blocks.tracer.recent_blocks() == exact.tracer.recent_blocks()
        stops.add((str(want.stop), bool(exact.stalled_at)))
    assert {("until", False), ("halt", False)} <= stops
    if kernel == "seed":
        assert ("budget", True) in stops  # the watchdog's stop, mid-block
    counts = blocks.tracer.block_counts()
    assert counts is not None and counts["counted"] > 1000 and counts["restarts"] > 0


@pytest.mark.parametrize("kernel", ["seed", "seed-elf"])
def test_full_boots_are_the_same_counted_per_block(kernel: str) -> None:
    """As triage boots them (a new machine each time, the profile's whole budget): the boot
    runs per instruction to the snapshot point and per block from there (an ELF build's boot
    copies code before it), with every Result and recent-block ring the same."""
    base = (ROOT / "fuzzfarm" / "examples" / "three-segments.elf").read_bytes()
    profile = load_profile(kernel)
    exact = Executor(profile, snapshot=False, count_blocks=False, cycles_to_budget=True)
    blocks = Executor(profile, snapshot=False, cycles_to_budget=True)
    stops = set()
    for data in _job_inputs(base)[:60]:
        want = exact.run(data)
        got = blocks.run(data)
        assert got.to_json() == want.to_json(), data[:64]
        assert blocks.tracer.recent_blocks() == exact.tracer.recent_blocks()
        assert isinstance(blocks.tracer, NativeTracer) and blocks.tracer.counts_blocks
        stops.add(str(want.stop))
    assert {"until", "halt", "budget"} <= stops


def test_a_boot_that_never_passes_the_snapshot_point_runs_whole() -> None:
    """A profile whose snapshot point comes after the kernel reads its input (here: the panic
    handler, which an input that does not panic never reaches at all): no snapshot, and full
    boots are not split there, so they still stop at the success address, as per
    instruction."""
    seed = load_profile("seed")
    profile = replace(seed, kernel=replace(seed.kernel,
                                           snapshot_symbol="__rustc::rust_begin_unwind"))
    base = (ROOT / "fuzzfarm" / "examples" / "three-segments.elf").read_bytes()
    exact = Executor(profile, snapshot=False, count_blocks=False)
    blocks = Executor(profile)  # its snapshot fails: full boots
    assert blocks.snapshot is None and "snapshot disabled" in blocks.notes[0]
    want = {k: v for k, v in exact.run(base).to_json().items() if k != "notes"}
    assert want["stop"] == "until"
    for executor in (blocks, Executor(profile, snapshot=False)):
        got = executor.run(base).to_json()
        assert {k: v for k, v in got.items() if k != "notes"} == want


@pytest.mark.parametrize("blocks", [False, True], ids=["per-instruction", "per-block"])
def test_the_tracers_probes_arm_a_search_only_where_it_may_stop(blocks: bool) -> None:
    """`start_probes`: at 10, 20, 40 and 80 instructions (per block: at the first block entry
    from there on) a probe is made with no stop, and arms a search at the block the guest is
    in, the loop's, unless that block is one the search must not stop at or CR3 is not the
    tables it was given. The search then stops the guest at the loop's next arrival with the
    registers it compares unchanged (rdx; rax changes in every iteration: no stop)."""
    code = HEAD + END_TAIL
    uc, tracer, until = _machine(code, blocks)
    # the same tuple and frozenset again are handed to the tracer once, and kept
    keep, never = (UC_X86_REG_RDX,), frozenset([LOOP])
    cases = [([UC_X86_REG_RDX], [], 0, LOOP), ([UC_X86_REG_RDX], [LOOP], 0, None),
             ([UC_X86_REG_RDX], [], 0x5000, None), ([UC_X86_REG_RAX], [], 0, None),
             (keep, never, 0, None), (keep, never, 0, None), (keep, frozenset(), 0, LOOP)]
    for registers, no_stop, pml4, stop in cases:
        tracer.end_run()
        tracer.reset(10)
        for reg in (UC_X86_REG_RAX, UC_X86_REG_RBX, UC_X86_REG_RCX, UC_X86_REG_RDX):
            uc.reg_write(reg, 0)
        tracer.start_probes(10, pml4, registers, 4, no_stop)
        tracer.extend(10, 10**6)  # a probe's count: below the limit
        uc.emu_start(BASE, until)
        rip = uc.reg_read(UC_X86_REG_RIP)
        counts = [at for at, _ in tracer.probe_log()]
        _, made, searches, address = tracer.probe
        if stop is None:
            # no stop at all: the probes at every doubling, then the hlt
            assert rip == END_TAIL_AT + 1 and not tracer.stop_hit, (registers, no_stop, pml4)
            assert len(counts) == made and searches == (registers == [UC_X86_REG_RAX]) * made
            if blocks:  # each from the first block entry on, the next at twice that count
                wanted = [10] + [2 * at for at in counts[:-1]]
                assert all(0 <= at - want < 5 for at, want in zip(counts, wanted, strict=True))
                assert counts[-1] <= 104 < 2 * counts[-1]
            else:
                assert counts == [10, 20, 40, 80]
        else:
            assert rip == stop and tracer.stop_hit and address == stop
            assert made == 1 and searches == 1
