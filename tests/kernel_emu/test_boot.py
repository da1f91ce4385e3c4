"""Boots of the real Rustux images under the emulator, with gcc-built and patched ELFs."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from kernel_emu.errors import HarnessError
from kernel_emu.executor import Executor
from kernel_emu.klog import parse_log
from kernel_emu.machine import PAGE
from kernel_emu.oracles import _segment_findings
from kernel_emu.profile import load_profile
from tests.elfs import build_elf, readelf_loads
from tests.reproducers import REPRODUCERS, get_phdr, loads, set_header, set_phdr, split_trigger


@pytest.fixture(scope="module")
def executors() -> dict[str, Executor]:
    return {k: Executor(load_profile(k)) for k in ("seed", "fixed")}


@pytest.mark.parametrize("kernel", ["seed", "fixed"])
@pytest.mark.parametrize("loads", [1, 2, 3, 4])
def test_gcc_elf_loads_as_readelf_says(executors: dict[str, Executor], tmp_path: Path,
                                       kernel: str, loads: int) -> None:
    path = build_elf(tmp_path, loads=loads, bss=0x3000)
    result = executors[kernel].run(path.read_bytes())
    assert result.verdict == "ok", result.findings
    assert result.stop == "until"
    want = readelf_loads(path)
    assert len(want) == loads
    assert result.segments == want
    assert result.expected_segments == want


def test_snapshot_used(executors: dict[str, Executor]) -> None:
    for ex in executors.values():
        assert ex.use_snapshot, ex.notes
        assert ex.snapshot_instructions > 0


def test_seed_trigger_corrupts_vaddr(executors: dict[str, Executor], base_elf: bytes) -> None:
    data = split_trigger(base_elf)
    seed = executors["seed"].run(data)
    assert seed.verdict == "crash"
    assert seed.segments[0]["vaddr"] == 0x300028
    classes = [f.cls for f in seed.findings]
    assert classes[0] == "heap-corruption"
    assert "vaddr-corruption" in classes[1:]
    # the table as a whole (its entry 0 is the LoadedElf written over it), then the field
    assert [f.field for f in seed.findings if f.cls == "vaddr-corruption"][:2] == \
        ["segments", "segments[0].vaddr"]
    vaddr = next(f for f in seed.findings if f.field == "segments[0].vaddr")
    assert "kernel loaded vaddr 0x300028" in vaddr.evidence[0]
    fixed = executors["fixed"].run(data)
    assert fixed.verdict in ("ok", "rejected"), fixed.findings


def test_seed_trigger_signature_is_input_independent(executors: dict[str, Executor],
                                                     base_elf: bytes) -> None:
    sigs = {executors["seed"].run(split_trigger(base_elf, leftover)).signature
            for leftover in (0, 40, 80, 152)}
    assert len(sigs) == 1 and None not in sigs


@pytest.mark.parametrize("rep", REPRODUCERS, ids=[r.bug for r in REPRODUCERS])
def test_known_bug_reproducers(executors: dict[str, Executor], base_elf: bytes, rep) -> None:
    data = rep.make(base_elf)
    seed = executors["seed"].run(data)
    assert seed.crash_class == rep.expected, (seed.findings, seed.log[-600:])
    fixed = executors["fixed"].run(data)
    assert fixed.verdict in ("ok", "rejected"), (fixed.findings, fixed.log[-600:])


def test_heap_damage_is_charged_to_the_block_it_follows_wherever_the_run_stops(
        base_elf: bytes) -> None:
    # RX-05 overflows a segment buffer and the run panics in the allocator; RX-13 overflows
    # the build ID's buffer and the kernel enters user mode: each bucket names the block that
    # was overflowed (its redzone changed before the next allocator call or the end of the
    # run), the heap walk's damaged header follows as a consequence charged to the same
    # block, and a run made again to watch that header (fuzzfarm boot) agrees
    job = Executor(load_profile("seed"), explain=False)
    boot = Executor(load_profile("seed"), explain=True)
    for bug, block, stop in (("RX-05", "load_segments", "halt"),
                             ("RX-13", "keep_build_id", "until")):
        data = next(r for r in REPRODUCERS if r.bug == bug).make(base_elf)
        fast, explained = job.run(data), boot.run(data)
        assert fast.stop == stop
        assert fast.signature == explained.signature, bug
        assert f"{block} <" in fast.signature and fast.signature.endswith("| block.overflow")
        assert "bytes after allocation of" in fast.findings[0].evidence[0]
        walked = next(f for f in fast.findings if f.field in ("block.magic", "block.size"))
        assert any("in or right after allocation #" in e for e in walked.evidence)
        assert walked.signature() == fast.signature.replace("block.overflow", "block header")
        assert any(e.startswith("last written by ") for f in explained.findings
                   for e in f.evidence)


def test_a_misread_program_header_table_is_one_finding_whatever_its_shape(
        executors: dict[str, Executor], base_elf: bytes) -> None:
    # a stride the seed walks by, short of 56: fewer entries, each read across two headers.
    # The stride is the cause (kernel_emu.causes); the misread table its first consequence
    results = [executors["seed"].run(set_header(base_elf, phentsize=stride))
               for stride in (40, 48, 55)]
    assert {r.signature for r in results} == {"unchecked-field | ELF header | e_phentsize"}
    assert {r.findings[1].signature() for r in results} == {
        "vaddr-corruption | segment table | segments"}
    # the same count with an entry wrong in several fields is the same misreading; an entry
    # wrong in one field only is that field's
    want = [{"vaddr": 0x400000, "memsz": 0x1000, "filesz": 0x1000, "offset": 0, "flags": 5},
            {"vaddr": 0x401000, "memsz": 0x2000, "filesz": 0x1000, "offset": 0x1000,
             "flags": 6}]

    def table(*rows: str) -> list[str | None]:
        log = parse_log("[elf] segments count=2\n" + "".join(
            f"[elf] seg {i} {row}\n" for i, row in enumerate(rows)))
        return [f.field for f in _segment_findings(log, want, [])]

    first = "vaddr=0x400000 memsz=0x1000 filesz=0x1000 offset=0x0 flags=0x5"
    assert table(first, "vaddr=0x401000 memsz=0x2000 filesz=0x1000 offset=0x1000 "
                        "flags=0x6") == []
    assert table(first, "vaddr=0x1000 memsz=0x401000 filesz=0x2000 offset=0x1000 "
                        "flags=0x6") == ["segments", "segments[1].vaddr"]
    assert table(first, "vaddr=0x401000 memsz=0x2000 filesz=0x1000 offset=0x1000 "
                        "flags=0x7") == ["segments[1].flags"]
    # two wrong fields are two bugs (a truncated size, flags written over), not a misreading
    assert table(first, "vaddr=0x401000 memsz=0x1000 filesz=0x1000 offset=0x1000 "
                        "flags=0x7") == ["segments[1].memsz"]


def test_segment_table_findings_share_a_bucket_wherever_the_kernel_stops(
        executors: dict[str, Executor], base_elf: bytes) -> None:
    # a truncated memsz (RX-03) on the first and on the last segment: one enters user mode,
    # the other is refused once the table is printed (its segment now overlaps the kernel)
    last = loads(base_elf)[-1]
    entered = set_phdr(base_elf, last, memsz=(1 << 32) + 0x3000)
    refused = set_phdr(base_elf, 0, memsz=(1 << 32) + 0x131, vaddr=0x10_0000, paddr=0x10_0000,
                       offset=0)
    a, b = executors["seed"].run(entered), executors["seed"].run(refused)
    assert (a.stop, b.stop) == ("until", "halt") and b.reject_reason
    assert a.signature == b.signature == "vaddr-corruption | segment table | segments[n].memsz"


def test_leaks_are_judged_only_where_the_kernel_settles(executors: dict[str, Executor],
                                                       base_elf: bytes) -> None:
    # the fixed build frees or keeps every block it allocates, refused or not; the seed's
    # second build ID is allocated in keep_build_id and left with nothing pointing at it
    leaky = next(r for r in REPRODUCERS if r.bug == "RX-14").make(base_elf)
    for data in (base_elf, leaky, set_phdr(base_elf, loads(base_elf)[-1], memsz=0x200_0000)):
        fixed = executors["fixed"].run(data)
        assert not any(f.cls == "memory-leak" for f in fixed.findings), fixed.findings
    seed = executors["seed"].run(leaky)
    assert seed.findings[0].field == "allocation.leak"
    assert "keep_build_id" in seed.signature and "still live" in seed.findings[0].evidence[0]


def _garble(rng: random.Random, base: bytes) -> bytes:
    data = bytearray(base)
    for _ in range(rng.randint(1, 12)):
        choice = rng.random()
        if len(data) < 16:
            break
        if choice < 0.5:
            i = rng.randrange(min(len(data), 512))
            data[i] = rng.randrange(256)
        elif choice < 0.8:
            i = rng.randrange(0, min(len(data), 512) - 8)
            data[i:i + 8] = rng.choice([0, 1, 0xFFFF, 0x300028, 2**63, 2**64 - 1,
                                        0x1000_0000]).to_bytes(8, "little")
        else:
            data = data[:rng.randrange(len(data) + 1)]
    return bytes(data)


def test_random_and_garbled_inputs_never_raise(executors: dict[str, Executor],
                                               base_elf: bytes) -> None:
    rng = random.Random(1234)
    verdicts: dict[str, int] = {}
    for i in range(2000):
        if i % 4 == 0:
            data = rng.randbytes(rng.randrange(0, 300))
        elif i % 4 == 1:
            data = b"\x7fELF" + rng.randbytes(rng.randrange(0, 200))
        else:
            data = _garble(rng, base_elf)
        kernel = "seed" if i % 2 else "fixed"
        try:
            result = executors[kernel].run(data)
        except HarnessError as e:  # the harness must cope with any bytes
            pytest.fail(f"harness error on input {i}: {e}")
        verdicts[result.verdict] = verdicts.get(result.verdict, 0) + 1
    assert verdicts.get("rejected", 0) > 500
    assert verdicts.get("ok", 0) + verdicts.get("crash", 0) > 0


def test_snapshot_agrees_with_full_boot(base_elf: bytes) -> None:
    rng = random.Random(99)
    inputs = [base_elf, b"", b"not an elf"] + [rep.make(base_elf) for rep in REPRODUCERS]
    inputs += [_garble(rng, base_elf) for _ in range(24)]
    for kernel in ("seed", "fixed", "upstream"):
        profile = load_profile(kernel)
        snap = Executor(profile)
        full = Executor(profile, snapshot=False)
        assert snap.use_snapshot
        crashes = 0
        # a second pass over the same inputs catches state leaking from one run to the next
        for data in inputs + inputs[::-1]:
            a, b = snap.run(data), full.run(data)
            assert a.comparable() == b.comparable()
            crashes += a.verdict == "crash"
        if kernel == "seed":
            assert crashes >= len(REPRODUCERS)


def _custom_profile(tmp_path: Path, **changes: str) -> Path:
    """A copy of the seed profile with some `key = value` lines replaced."""
    text = (Path(load_profile("seed").source)).read_text()
    image = load_profile("seed").image
    text = text.replace('image = "../images/seed.efi"', f'image = "{image}"')
    for key, value in changes.items():
        lines = [f"{key} = {value}" if line.startswith(f"{key} =") else line
                 for line in text.splitlines()]
        text = "\n".join(lines) + "\n"
    path = tmp_path / "custom.toml"
    path.write_text(text)
    return path


def test_snapshot_falls_back_when_kernel_reads_ramdisk_early(tmp_path: Path,
                                                             base_elf: bytes) -> None:
    # a snapshot point after the loader has read bin/init cannot be restored per input
    path = _custom_profile(tmp_path, snapshot_symbol='"rustux::user::enter"')
    ex = Executor(load_profile(str(path)))
    assert not ex.use_snapshot
    assert any("reads its input" in note for note in ex.notes)
    result = ex.run(base_elf)
    assert result.verdict == "ok" and not result.snapshot
    assert any("full boots" in n for n in result.notes)


def test_small_firmware_stack_overflows_into_guard(tmp_path: Path, base_elf: bytes) -> None:
    path = _custom_profile(tmp_path, firmware_stack_size="0x1000")
    result = Executor(load_profile(str(path))).run(base_elf)
    assert result.crash_class == "stack-overflow", result.findings
    assert "firmware stack guard page" in result.findings[0].evidence[0]


def test_a_stray_read_of_a_guard_page_is_a_page_fault(base_elf: bytes) -> None:
    """A copy from a wild source address runs into the firmware stack's guard page, far from
    where the stack pointer is: the page fault it is, filed with that copy's other faults, and
    not a stack overflow. Here the file offset wraps around to low RAM, and offset + size
    wraps back past the loader's check."""
    ex = Executor(load_profile("seed"))
    file_at = int(ex.run(base_elf).log.split("bin/init at ")[1].split(",")[0], 16)
    data = loads(base_elf)[-1]
    vaddr = get_phdr(base_elf, data)["vaddr"]
    source = PAGE + ((vaddr + file_at) & (PAGE - 1))  # offset and vaddr agree modulo a page
    offset = (source - file_at) % (1 << 64)
    wild = set_phdr(base_elf, data, offset=offset,
                    filesz=(len(base_elf) - 64 - offset) % (1 << 64), memsz=0xF00000)
    result = ex.run(wild)
    assert result.crash_class == "cpu-fault", result.findings
    assert "[guard:firmware-stack]" in result.findings[0].evidence[0]
    assert result.findings[0].frames[0].startswith("memcpy")


def test_bug_in_an_observer_is_a_harness_error(monkeypatch: pytest.MonkeyPatch,
                                               base_elf: bytes) -> None:
    ex = Executor(load_profile("seed"))

    def broken(*_args: object) -> None:
        raise KeyError("observer bug")

    monkeypatch.setattr("kernel_emu.executor.replay", broken)
    with pytest.raises(HarnessError, match="internal error"):
        ex.run(base_elf)
    monkeypatch.undo()
    # the next input starts from the snapshot again, unharmed
    assert ex.run(base_elf).verdict == "ok"


def test_profile_naming_missing_symbol_is_a_harness_error(tmp_path: Path) -> None:
    path = _custom_profile(tmp_path, alloc_symbol='"rustux::no::such"')
    with pytest.raises(HarnessError, match="no symbol"):
        Executor(load_profile(str(path)))


def test_pure_python_tracer_gives_the_same_results(executors: dict[str, Executor],
                                                   base_elf: bytes) -> None:
    slow = Executor(load_profile("seed"), native=False)
    assert not slow.tracer.native and executors["seed"].tracer.native
    small_crashes = [r.make(base_elf) for r in REPRODUCERS if r.bug in ("RX-05", "RX-07")]
    for data in (base_elf, b"junk", *small_crashes):
        assert slow.run(data).comparable() == executors["seed"].run(data).comparable()


def test_running_out_of_physical_pages_is_out_of_memory(tmp_path: Path, base_elf: bytes) -> None:
    # 32 MiB of RAM leaves ~12 MiB of frames once the heap and kernel stack are carved out;
    # a 14 MiB segment fits the 16 MiB heap but not the frames
    path = _custom_profile(tmp_path, ram_size="0x2000000")
    data = set_phdr(base_elf, loads(base_elf)[-1], memsz=0xE0_0000)
    result = Executor(load_profile(str(path))).run(data)
    assert result.crash_class == "out-of-memory", result.findings
    assert "out of physical pages" in result.findings[0].evidence[0]


def test_oracles_on_a_user_address_space_changed_after_the_run(base_elf: bytes) -> None:
    """Real state at the ring-3 entry, then one page-table entry rewritten by hand: the page
    oracles must notice a user page over kernel memory and an entry that is not executable."""
    from kernel_emu import oracles, pagewalk
    from kernel_emu.elfview import load_segments

    ex = Executor(load_profile("seed"))
    segments = load_segments(base_elf)
    assert ex.run(base_elf).verdict == "ok"
    observed = ex.last_observations
    assert observed is not None and observed.stop == "until"
    cr3 = ex.machine.reg("cr3")
    text = [s for s in segments if s.flags & 1][0]
    entry_page = ex.machine.u64(ex.machine.reg("rsp")) & ~0xFFF

    def pte_of(vaddr: int) -> int:
        table = cr3
        for shift in (39, 30, 21):
            table = ex.machine.u64((table & ~0xFFF) + ((vaddr >> shift) & 0x1FF) * 8) & \
                0x000F_FFFF_FFFF_F000
        return table + ((vaddr >> 12) & 0x1FF) * 8

    data_page = [s for s in segments if s.flags & 2][0].vaddr & ~0xFFF
    pte = pte_of(data_page)
    ex.machine.put_u64(pte, (ex.machine.u64(pte) & ~0x000F_FFFF_FFFF_F000) | 0x30_0000)
    result = oracles.assess(observed, ex.image, ex.profile, segments)
    assert result.crash_class == "kernel-mapping", result.findings
    assert "which is kernel heap" in result.findings[0].evidence[0]

    # the same user page now maps the page table that maps it
    ex.machine.put_u64(pte, (ex.machine.u64(pte) & ~0x000F_FFFF_FFFF_F000) | (pte & ~0xFFF))
    result = oracles.assess(observed, ex.image, ex.profile, segments)
    assert result.crash_class == "kernel-mapping", result.findings
    assert "a page table of this address space" in result.findings[0].evidence[0]

    assert text.vaddr & ~0xFFF <= entry_page
    pte = pte_of(entry_page)
    ex.machine.put_u64(pte, ex.machine.u64(pte) | (1 << 63))  # NX on the entry page
    result = oracles.assess(observed, ex.image, ex.profile, segments)
    assert any(f.cls == "bad-entry" and "not executable" in f.evidence[0]
               for f in result.findings)
    assert pagewalk.translate(ex.machine, cr3, entry_page).executable is False


def test_native_page_walk_matches_the_python_walk(executors: dict[str, Executor],
                                                  base_elf: bytes) -> None:
    from kernel_emu import pagewalk

    assert pagewalk.native_walker is not None, "the native walker is not built"
    inputs = [base_elf] + [r.make(base_elf) for r in REPRODUCERS if r.bug in
                           ("RX-03", "RX-04", "RX-08")]
    for data in inputs:
        ex = executors["seed"]
        result = ex.run(data)
        assert result.stop == "until"
        cr3 = ex.machine.reg("cr3")
        native_tables: set[int] = set()
        python_tables: set[int] = set()
        native = pagewalk.walk_user(ex.machine, cr3, native_tables)
        python = pagewalk.walk_user_python(ex.machine, cr3, python_tables)
        assert native == python
        assert native and native_tables == python_tables
        runs = pagewalk.walk_user(ex.machine, cr3, runs=True)
        assert runs == pagewalk.coalesce(python)
        assert len(runs) < len(python)  # the segments' consecutive pages do merge
        assert [run.leaf(k) for run in runs for k in range(run.count)] == python
        # a single address's walk agrees with the whole walk, leaf by leaf
        for leaf in python:
            for vaddr in (leaf.vaddr, leaf.vaddr + leaf.size - 1):
                assert pagewalk.translate(ex.machine, cr3, vaddr) == leaf
        assert pagewalk.translate(ex.machine, cr3, 0) is None


def test_a_damaged_block_header_is_charged_to_the_block_before_it(
        executors: dict[str, Executor], base_elf: bytes) -> None:
    """A header found written over after the run: the finding (and its signature) names the
    allocation whose block it follows, not where the run then happened to stop (a panic in
    the allocator, a fault, ring 3), so one overflow makes one bucket however far it runs; a
    run made again watching the header adds who wrote it last, without moving the bucket."""
    i = loads(base_elf)[0]
    signatures = set()
    explaining = Executor(load_profile("seed"), explain=True)
    for memsz in (0x8, 0x40, 0x100):
        data = set_phdr(base_elf, i, memsz=memsz)
        fast = executors["seed"].run(data)
        result = explaining.run(data)
        header = next(f for f in result.findings if f.field in ("block.magic", "block.size"))
        assert header.evidence[-1].startswith("last written by memcpy"), header.evidence
        assert header.frames == fast.findings[0].frames
        signatures.add(header.signature())
    assert len(signatures) == 1
    sig = signatures.pop()
    assert " | rustux::mm::heap::LinkedListAllocator::allocate < rustux::loader::elf::" \
        "load_segments" in sig and sig.endswith("block header")
    # the same input, booted in full: the same finding
    full = Executor(load_profile("seed"), snapshot=False, explain=True).run(
        set_phdr(base_elf, i, memsz=0x40))
    assert any(f.signature() == sig for f in full.findings)


def test_ring_3_entered_without_its_stack_is_a_bad_entry(executors: dict[str, Executor],
                                                         base_elf: bytes) -> None:
    # the seed's level-1 table of the last segment (just below 1 GiB, where the stack's pages
    # have its level-2 index) takes the stack's entries, and those the segment holds already
    # are not mapped again: the stack ends up nowhere (RX-15)
    i = loads(base_elf)[-1]
    at = 0x3FE0_0000 + 0x1FB000
    data = set_phdr(base_elf, i, vaddr=at, paddr=at)
    seed = executors["seed"].run(data)
    stack = next(f for f in seed.findings if f.field == "entry.rsp")
    assert stack.cls == "bad-entry" and "whose page is not mapped" in stack.evidence[0]
    assert executors["fixed"].run(data).verdict == "ok"


def test_damage_in_a_block_freed_again_is_charged_to_what_lived_there() -> None:
    from kernel_emu.allocations import Allocation
    from kernel_emu.oracles import _culprit

    table = Allocation(1, 0x302720, 0x60)  # grown, then freed on a refusal
    after = Allocation(2, 0x3026D0, 0x28)  # live, just before it
    # the spot lies in the freed table, past the live block's payload
    assert _culprit([after], 0x302750, 40, [table]) is table
    # inside a live payload, the live block; nothing freed: the one it follows, as before
    assert _culprit([after], 0x3026E0, 40, [table]) is after
    assert _culprit([after], 0x302750, 40, []) is after
    # a freed block handed out again is its new owner's
    again = Allocation(3, 0x302720, 0x60)
    assert _culprit([after, again], 0x302750, 40, [table]) is again
