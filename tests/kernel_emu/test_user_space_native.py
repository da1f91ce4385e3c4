"""The user-space oracle's native judge says what each check finds, and the findings worded
from it are the Python oracle's (the reference), for runs into ring 3 as the kernel leaves
them and for the same runs with their page tables, user memory or `iretq` frame written over;
what the judge cannot follow is left to the reference."""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fuzz.mutator import ElfMutator
from kernel_emu import oracles, pagewalk, userspace
from kernel_emu.executor import Executor
from kernel_emu.machine import PAGE, Machine
from kernel_emu.profile import load_profile
from tests.kernel_emu.speedups import count_calls

SEEDS = sorted((Path(__file__).parents[2] / "corpus" / "seeds").glob("*.elf"))
P, W, U, PS, NX = 1, 2, 4, 0x80, 1 << 63


def _entries(m: Machine, cr3: int, vaddr: int) -> list[int]:
    """The addresses of the entries that map `vaddr`, from the top level down to its leaf
    (fewer when a level is not present)."""
    table, out = cr3 & pagewalk.ADDR_MASK, []
    for level in (4, 3, 2, 1):
        at = table + ((vaddr >> (12 + 9 * (level - 1))) & 511) * 8
        out.append(at)
        entry = m.u64(at)
        if not entry & P or level == 1 or (level in (2, 3) and entry & PS):
            break
        table = entry & pagewalk.ADDR_MASK
    return out


def _spoil(rng: random.Random, m: Machine, args: dict[str, Any]) -> list[tuple[int, bytes]]:
    """Write over one thing the oracle looks at; returns what to put back."""
    cr3, rsp = m.reg("cr3"), m.reg("rsp")
    leaves = pagewalk.walk_user(m, cr3, None)
    tables = sorted(_tables(m, cr3))
    kernel = [lo for lo, _, _ in userspace.kernel_ranges(args["image"], args["prof"],
                                                        args["kstack_base"])]
    frames = [*kernel, *tables, 0x10_0000, rng.randrange(1 << 40) & ~(PAGE - 1)]
    kind = rng.randrange(5)
    if kind == 0 and leaves:  # an entry on the way to a user page: its rights or its frame
        leaf = rng.choice(leaves)
        at = rng.choice(_entries(m, cr3, leaf.vaddr))
        entry = m.u64(at)
        if rng.random() < 0.6:
            entry ^= rng.choice((P, W, U, NX, PS))
        else:
            entry = (entry & ~pagewalk.ADDR_MASK) | rng.choice(frames)
        return _put(m, at, struct.pack("<Q", entry))
    if kind == 1 and tables:  # a user page nobody asked for
        table = rng.choice(tables)
        at = table + 8 * rng.randrange(512)
        return _put(m, at, struct.pack("<Q", rng.choice(frames) | P | U | rng.choice((0, W))))
    if kind == 2:  # a byte of a segment, near either end of its file bytes or in its BSS
        segs = [s for s in args["expected"] if s["memsz"]]
        if segs:
            seg = rng.choice(segs)
            vaddr = seg["vaddr"] + rng.choice((0, seg["filesz"] - 1, seg["filesz"],
                                               rng.randrange(seg["memsz"])))
            mp = pagewalk.translate(m, cr3, vaddr)
            if mp is not None and m.bank_for(mp.paddr + vaddr - mp.vaddr) is not None:
                at = mp.paddr + vaddr - mp.vaddr
                return _put(m, at, bytes([m.read(at, 1)[0] ^ (1 << rng.randrange(8))]))
    if kind == 3:  # the iretq frame: where it enters, in which ring, with which stack
        slot = rng.choice((0, 8, 24))
        value = m.u64(rsp + slot)
        value = value ^ 3 if slot == 8 else rng.choice(
            (value + PAGE * rng.randrange(-4, 5), rng.choice(frames), 0xFFFF_8000_0000_0000,
             value ^ (1 << rng.randrange(48))))
        return _put(m, rsp + slot, struct.pack("<Q", value & (1 << 64) - 1))
    return []  # kind 4, or nothing to spoil: the address space as the kernel left it


def _tables(m: Machine, cr3: int) -> set[int]:
    tables: set[int] = set()
    pagewalk.walk_user(m, cr3, tables)
    return tables


def _put(m: Machine, at: int, data: bytes) -> list[tuple[int, bytes]]:
    if m.bank_for(at, len(data)) is None:
        return []
    old = m.read(at, len(data))
    m.write(at, data)
    return [(at, old)]


def _compare(kernel: str, runs: int, spoils: int, seed: int,
             monkeypatch: pytest.MonkeyPatch) -> tuple[int, int, int, int]:
    """(address spaces compared, clean ones, ones with findings, ones the native judge left
    to the reference)."""
    assert userspace.native_walker is not None, "the native walker is not built"
    rng = random.Random(seed)
    counts = [0, 0, 0]
    real: Callable[..., list[Any]] = userspace.user_space_findings
    python = count_calls(monkeypatch, userspace, "user_space_findings_python")
    deferred = 0

    def both(m: Machine, image: Any, prof: Any, log: Any, expected: Any, frames: Any,
             kstack_base: Any, file: bytes = b"", segments: Any = None) -> list[Any]:
        nonlocal deferred
        args = {"image": image, "prof": prof, "expected": expected, "kstack_base": kstack_base}
        found: list[Any] = []
        for spoil in range(spoils + 1):
            undo = _spoil(rng, m, args) if spoil else []
            try:
                before = python[0]
                got = real(m, image, prof, log, expected, frames, kstack_base, file, segments)
                deferred += python[0] - before
                with monkeypatch.context() as patch:
                    patch.setattr(userspace, "native_walker", None)
                    want = real(m, image, prof, log, expected, frames, kstack_base, file,
                                segments)
            finally:
                for at, old in reversed(undo):
                    m.write(at, old)
            assert got == want, (kernel, spoil, [f.field for f in want])
            counts[0] += 1
            counts[1 if not want else 2] += 1
            if not spoil:
                found = got  # the run's own findings, as the kernel left it
        return found

    monkeypatch.setattr(oracles, "user_space_findings", both)
    ex = Executor(load_profile(kernel), explain=False, causes=False)
    seeds = [p.read_bytes() for p in SEEDS]
    mutator = ElfMutator(None, seed=seed)
    for data in seeds:
        ex.run(data)
    for _ in range(runs):
        ex.run(mutator.mutate(rng.choice(seeds), 32768, rng.randrange(1 << 32)))
    return counts[0], counts[1], counts[2], deferred


@pytest.mark.parametrize("kernel", ["seed", "fixed-elf"])
def test_the_native_judge_finds_what_the_python_oracle_finds(
        kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """...and words nearly all of it without the reference: the speed-up is real, not a
    judge that always defers."""
    compared, clean, found, deferred = _compare(kernel, 150, 6, 5, monkeypatch)
    assert compared > 300 and clean > 100 and found > 100, (compared, clean, found)
    assert deferred < found / 10, (deferred, found)


def test_a_clean_address_space_is_recognised_natively(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs the Python oracle finds nothing in are (nearly) all recognised without it: the
    speed-up is real, not a check that always defers."""
    ex = Executor(load_profile("seed"), explain=False, causes=False)
    python = count_calls(monkeypatch, userspace, "user_space_findings_python")
    ring3 = 0
    for path in SEEDS:
        result = ex.run(path.read_bytes())
        if result.stop == "until" and not result.findings:
            ring3 += 1
    assert ring3 >= 10 and python == [0], (ring3, python)


def test_an_entry_that_is_the_only_finding_is_made_without_the_python_oracle(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A run into ring 3 whose `iretq` would enter where user mode cannot run, and which is
    clean otherwise: its one finding is made without the whole Python oracle, and is the
    one that oracle makes."""
    calls: list[tuple[Any, ...]] = []
    real = userspace.user_space_findings

    def keep(*args: Any) -> list[Any]:
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(oracles, "user_space_findings", keep)
    ex = Executor(load_profile("seed"), explain=False, causes=False)
    python = count_calls(monkeypatch, userspace, "user_space_findings_python")
    checked = 0
    for path in SEEDS:
        calls.clear()
        result = ex.run(path.read_bytes())
        if result.stop != "until" or result.findings:
            continue
        (args,) = calls
        m = args[0]
        rsp = m.reg("rsp")
        rip = m.u64(rsp)
        # kernel code (mapped, not for user mode), an unmapped page, the user stack (not
        # executable)
        for bad in (m.reg("rip"), 0x5A5A_0000_0000, m.u64(rsp + 24) - 8):
            m.write(rsp, struct.pack("<Q", bad))
            before = python[0]
            got = real(*args)
            assert python[0] == before, "the Python oracle ran"
            with monkeypatch.context() as patch:
                patch.setattr(userspace, "native_walker", None)
                want = real(*args)
            assert got == want and [f.field for f in got] == ["entry.rip"], (bad, want)
            checked += 1
        m.write(rsp, struct.pack("<Q", rip))
    assert checked >= 9, checked
