"""The ELF-aware mutator: robust on any bytes, bounded, deterministic, and able to reach the
loader's interesting corners without booting anything."""

from __future__ import annotations

import random
import struct
from collections import Counter
from pathlib import Path

import pytest

from fuzz.facts import HeapFacts, KernelFacts, facts_for
from fuzz.mutator import ElfMutator, heap_free_before, parse
from kernel_emu.image import load_image
from kernel_emu.profile import load_profile
from tests.elfs import build_elf, tools_available
from tests.reproducers import get_phdr, loads, set_header, set_phdr

ROOT = Path(__file__).resolve().parents[2]

EXAMPLES = Path(__file__).parents[2] / "fuzzfarm" / "examples"
THREE = (EXAMPLES / "three-segments.elf").read_bytes()
PHDR = 56
U64 = (1 << 64) - 1
# the seed build (BUGS.md): its heap, its segment table's entry size, and the allocator's
# threshold under which it hands a free block out whole
HEAP_SIZE = 0x100_0000
HEAP_HEADER = 40
SEGMENT_RECORD = 40
SEED_SPLIT_THRESHOLD = 160
SEED_HEAP = HeapFacts(0x30_0000, HEAP_SIZE, HEAP_HEADER)
_facts: dict[str, KernelFacts] = {}


def seed_facts() -> KernelFacts:
    """What the farm tells the mutator about the seed build: from its profile and image."""
    if "seed" not in _facts:
        profile = load_profile("seed")
        _facts["seed"] = facts_for(profile, load_image(profile.image, profile.kernel.load_base))
    return _facts["seed"]


def _phnum(elf: bytes) -> int:
    return struct.unpack_from("<H", elf, 0x38)[0]


def _phoff(elf: bytes) -> int:
    return struct.unpack_from("<Q", elf, 0x20)[0]


def _entries(elf: bytes) -> list[bytes]:
    off = _phoff(elf)
    return [elf[off + i * PHDR:off + (i + 1) * PHDR] for i in range(_phnum(elf))]


def _template(vaddr: int = 0x40_0000, fill: int = 0x41) -> bytes:
    """BUGS.md's common trigger template: one RWX PT_LOAD covering a 4 KiB file."""
    out = bytearray(0x1000)
    out[:16] = b"\x7fELF\x02\x01\x01" + bytes(9)
    struct.pack_into("<HHIQQQIHHHHHH", out, 16, 2, 62, 1, vaddr + 0x100, 64, 0, 0, 64, PHDR,
                     1, 0, 0, 0)
    struct.pack_into("<IIQQQQQQ", out, 64, 1, 7, 0, vaddr, vaddr, 0x1000, 0x1000, 0x1000)
    out[0x100:0x1000] = bytes([fill]) * 0xF00
    out[0x100:0x102] = b"\xeb\xfe"
    return bytes(out)


TEMPLATE = _template()


def seed_split_hit(data: bytes) -> bool:
    """Whether the seed loader accepts `data` and one of its segment buffers takes the heap's
    last free block whole (RX-01): it walks the table like collect_segments, checks each
    PT_LOAD like check_segment, then replays the allocations of BUGS.md's "Loader heap use"."""
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return False
    if struct.unpack_from("<HH", data, 16) != (2, 62):
        return False
    phoff = _phoff(data)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    end = phoff + phnum * PHDR
    if end > len(data) or phentsize == 0:
        return False
    memsz: list[int] = []
    for cursor in range(phoff, end, phentsize):
        if cursor + PHDR > len(data):
            return False
        p_type, _, off, vaddr, _, filesz, size, align = struct.unpack_from(
            "<IIQQQQQQ", data, cursor)
        if p_type != 1:
            continue
        if align == 0 or vaddr % align != off % align or (off + filesz) & U64 > len(data):
            return False
        if len(memsz) < phnum:
            memsz.append(size & 0xFFFF_FFFF)
    if not memsz:
        return False
    free = HEAP_SIZE - HEAP_HEADER
    for request in (SEGMENT_RECORD * phnum, 8 * len(memsz), *memsz):
        request = (max(request, 1) + 7) & ~7
        if request > free:
            return False  # out of memory, not the split path
        if free - request < SEED_SPLIT_THRESHOLD:
            return True  # the LoadedElf (at least) comes after and gets 0x300028
        free -= request + HEAP_HEADER
    return False


def _garbled(rng: random.Random, bases: list[bytes]) -> bytes:
    kind = rng.randrange(8)
    base = rng.choice(bases)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200)))
    if kind == 1:
        return base[:rng.randrange(len(base) + 1)]
    if kind == 2:
        return b"\x7fELF" + bytes(rng.randrange(256) for _ in range(rng.randrange(0, 120)))
    out = bytearray(base.ljust(64, b"\0"))
    if kind == 3:  # hostile table geometry
        struct.pack_into("<H", out, 0x38, rng.choice((0, 1, 0x7FFF, 0xFFFF)))
        struct.pack_into("<H", out, 0x36, rng.choice((0, 1, 56, 57, 0xFFFF)))
    elif kind == 4:
        struct.pack_into("<Q", out, 0x20, rng.choice((0, 1, len(out) - 1, len(out), U64)))
    else:  # random bytes over the header and the table
        for _ in range(rng.randrange(1, 16)):
            out[rng.randrange(min(len(out), 0x200))] = rng.randrange(256)
    return bytes(out)


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    found = [THREE, TEMPLATE, (EXAMPLES / "vaddr-0x300028.elf").read_bytes()]
    if tools_available():
        work = tmp_path_factory.mktemp("elfs")
        found += [build_elf(work, loads=n, name=f"l{n}").read_bytes() for n in (1, 2, 4)]
    return found


# robustness -------------------------------------------------------------------------------
def test_never_raises_and_respects_max_size(bases: list[bytes]) -> None:
    mutator = ElfMutator(raise_errors=True)
    rng = random.Random(1)
    pool = list(bases)
    for i in range(6000):
        data = _garbled(rng, pool) if rng.random() < 0.5 else rng.choice(pool)
        max_size = rng.choice((0, 1, 63, 64, 65, 200, len(data), len(data) + 100, 4096, 65536))
        out = mutator.mutate(data, max_size, rng.randrange(1 << 32))
        assert isinstance(out, bytes)
        assert len(out) <= max_size
        other = rng.choice(pool)
        mixed = mutator.crossover(data, other, max_size, i)
        assert isinstance(mixed, bytes)
        assert len(mixed) <= max_size
        # feed results back so that mutations of mutations get exercised too
        if out and rng.random() < 0.3:
            pool.append(out)
            if len(pool) > 300:
                pool.pop(rng.randrange(len(bases), len(pool)))


def test_every_operation_survives_hostile_inputs(bases: list[bytes]) -> None:
    mutator = ElfMutator()
    rng = random.Random(2)
    for name in mutator.operations:
        for seed in range(300):
            data = _garbled(rng, bases)
            max_size = rng.choice((64, len(data), len(data) + 4096))
            out = mutator.apply(name, data, max_size, seed)
            assert out is None or len(out) <= max_size


def test_falls_back_when_byte_mutation_misbehaves() -> None:
    def broken(data: bytes, max_size: int) -> bytes:
        raise RuntimeError("libFuzzer is unhappy")

    def too_long(data: bytes, max_size: int) -> bytes:
        return data * 3 + b"x" * 100

    for byte_mutate in (broken, too_long):
        mutator = ElfMutator(byte_mutate)
        for seed in range(500):
            for data in (b"", b"not an elf at all", THREE):
                assert len(mutator.mutate(data, 100, seed)) <= 100


def test_non_elf_input_goes_to_byte_mutation_or_gets_a_header() -> None:
    calls: list[bytes] = []

    def byte_mutate(data: bytes, max_size: int) -> bytes:
        calls.append(data)
        return data[::-1]

    mutator = ElfMutator(byte_mutate)
    outputs = [mutator.mutate(b"plain text, not an ELF", 4096, seed) for seed in range(200)]
    assert calls and all(c == b"plain text, not an ELF" for c in calls)
    planted = [o for o in outputs if o[:4] == b"\x7fELF"]
    assert planted, "an ELF header is planted now and then"
    view = parse(planted[0])
    assert view is not None and view.count == 1 and view.loads() == [0]


# determinism ------------------------------------------------------------------------------
def test_deterministic_for_a_seed() -> None:
    a, b = ElfMutator(), ElfMutator()
    for seed in range(300):
        assert a.mutate(THREE, 65536, seed) == b.mutate(THREE, 65536, seed)
        assert a.crossover(THREE, TEMPLATE, 65536, seed) == \
            b.crossover(THREE, TEMPLATE, 65536, seed)
    distinct = {a.mutate(THREE, 65536, seed) for seed in range(300)}
    assert len(distinct) > 250
    salted = ElfMutator(seed=7)
    assert any(salted.mutate(THREE, 65536, s) != a.mutate(THREE, 65536, s) for s in range(20))
    assert salted.mutate(THREE, 65536, 3) == ElfMutator(seed=7).mutate(THREE, 65536, 3)


def test_mutation_mix() -> None:
    calls = 0

    def byte_mutate(data: bytes, max_size: int) -> bytes:
        nonlocal calls
        calls += 1
        return data

    mutator = ElfMutator(byte_mutate)
    changed = sum(mutator.mutate(THREE, 65536, seed) != THREE for seed in range(2000))
    assert 300 < calls < 700  # about a quarter goes to libFuzzer's own mutation
    assert changed >= 2000 - calls - 100


# each family changes what it is meant to ---------------------------------------------------
def _each(name: str, data: bytes = THREE, seeds: int = 200, max_size: int = 65536,
          facts: KernelFacts | None = None) -> list[bytes]:
    mutator = ElfMutator(facts=facts)
    outs = [mutator.apply(name, data, max_size, seed) for seed in range(seeds)]
    return [o for o in outs if o is not None]


def test_drop_removes_one_entry() -> None:
    before = Counter(_entries(THREE))
    outs = _each("drop")
    assert outs
    for out in outs:
        assert _phnum(out) == _phnum(THREE) - 1
        assert Counter(_entries(out)) <= before


def test_insert_adds_one_entry_and_can_move_the_table() -> None:
    outs = _each("insert")
    assert outs
    moved = 0
    for out in outs:
        assert _phnum(out) == _phnum(THREE) + 1
        assert Counter(_entries(THREE)) <= Counter(_entries(out))
        moved += _phoff(out) != _phoff(THREE)
        if _phoff(out) != _phoff(THREE):
            assert _phoff(out) >= len(THREE) and _phoff(out) % 8 == 0
            assert out[64:len(THREE)] == THREE[64:]
    assert moved > len(outs) // 2
    # a fresh PT_LOAD is page aligned and lies above every existing segment
    fresh = [e for out in outs for e in _entries(out) if e not in _entries(THREE)]
    assert any(struct.unpack_from("<I", e)[0] == 1 and struct.unpack_from("<Q", e, 16)[0]
               >= 0x404000 for e in fresh)


def test_duplicate_and_reorder_keep_the_count() -> None:
    for out in _each("duplicate"):
        assert _phnum(out) == _phnum(THREE)
        assert max(Counter(_entries(out)).values()) >= 2
    reordered = _each("reorder")
    assert reordered
    for out in reordered:
        assert sorted(_entries(out)) == sorted(_entries(THREE))
    assert any(_entries(out) != _entries(THREE) for out in reordered)


def test_phnum_changes_the_count_and_sometimes_grows_the_table() -> None:
    outs = _each("phnum", seeds=300)
    counts = {_phnum(out) for out in outs}
    assert {0, 1, 16, 17, 0xFFFF} <= counts
    grown = [o for o in outs if _phoff(o) >= len(THREE)]
    assert grown
    for out in grown:
        assert _phoff(out) + _phnum(out) * PHDR <= len(out)


def test_header_field_and_ident_edits_stay_in_the_header() -> None:
    for name, lo, hi in (("header_field", 16, 64), ("ident", 4, 16)):
        outs = _each(name)
        assert any(out != THREE for out in outs)
        for out in outs:
            diff = [i for i in range(len(THREE)) if out[i] != THREE[i]]
            assert len(out) == len(THREE)
            assert all(lo <= i < hi for i in diff), (name, diff)
    entries = {struct.unpack_from("<Q", o, 0x18)[0]
               for o in _each("header_field", seeds=400, facts=seed_facts())}
    assert {0, 0xFFFF_8000_0000_0000, 0x300028} & entries


def test_phdr_field_edits_touch_one_entry() -> None:
    off = _phoff(THREE)
    # the rarest of the values below comes in ~0.4% of the edits
    outs = _each("phdr_field", seeds=2000, facts=seed_facts())
    values: set[int] = set()
    for out in outs:
        diff = [i for i in range(len(THREE)) if out[i] != THREE[i]]
        assert len({(i - off) // PHDR for i in diff}) <= 1
        assert all(off <= i < off + _phnum(THREE) * PHDR for i in diff)
        for i in loads(out):
            values.update(get_phdr(out, i).values())
    assert {0, 0x1000, 0x300028, 0xFFFF_8000_0000_0000, 1 << 32} <= values


def _fields(elf: bytes) -> dict[tuple[str, int], tuple[int, int]]:
    """Every header and program header field, read where THREE has them: (value, width)."""
    out = {}
    for name, off, fmt in (("e_entry", 0x18, "<Q"), ("e_phoff", 0x20, "<Q"),
                           ("e_phentsize", 0x36, "<H"), ("e_phnum", 0x38, "<H")):
        out[(name, -1)] = (struct.unpack_from(fmt, elf, off)[0], struct.calcsize(fmt))
    base = _phoff(THREE)
    for i in range(_phnum(THREE)):
        for k, (off, fmt) in enumerate(((0, "<I"), (4, "<I"), (8, "<Q"), (16, "<Q"), (24, "<Q"),
                                        (32, "<Q"), (40, "<Q"), (48, "<Q"))):
            out[(str(k), i)] = (struct.unpack_from(fmt, elf, base + i * PHDR + off)[0],
                                struct.calcsize(fmt))
    return out


def test_arith_moves_one_field_by_a_small_delta() -> None:
    allowed = {1, 2, 3, 4, 7, 8, 16, 40, 48, 56, 64, 160, 168, 0xFFF, 0x1000, 0x1_0000, 1 << 32}
    allowed |= set(range(1, 64))
    old = _fields(THREE)
    outs = _each("arith", seeds=400)
    moved = 0
    for out in outs:
        assert len(out) == len(THREE)
        new = _fields(out)
        changed = [k for k in old if old[k] != new[k]]
        # (a delta wider than a 16-bit field leaves it as it was)
        assert len(changed) <= 1
        moved += len(changed)
        for key in changed:
            (was, width), (now, _) = old[key], new[key]
            modulus = 1 << (8 * width)
            assert (now - was) % modulus in allowed or (was - now) % modulus in allowed, key
    assert moved > len(outs) * 0.9


def test_relation_breaks_the_invariants_the_loader_relies_on() -> None:
    seen: set[str] = set()
    for out in _each("relation", data=TEMPLATE, seeds=400):
        ph = get_phdr(out, 0)
        if ph["filesz"] > ph["memsz"]:
            seen.add("filesz>memsz")
        if ph["offset"] + ph["filesz"] > U64:
            seen.add("offset wraps")
        if ph["vaddr"] + ph["memsz"] > U64 or (ph["vaddr"] < 1 << 32 < ph["vaddr"] + ph["memsz"]):
            seen.add("vaddr wraps")
        if ph["memsz"] >> 32:
            seen.add("memsz high bits")
        if ph["align"] == 0 or ph["vaddr"] % max(ph["align"], 1) != ph["offset"] % max(
                ph["align"], 1):
            seen.add("align")
        if ph["vaddr"] >= 0xFFFF_8000_0000_0000:
            seen.add("kernel half")
        if not ph["flags"] & 1:
            seen.add("not executable")
    assert seen == {"filesz>memsz", "offset wraps", "vaddr wraps", "memsz high bits", "align",
                    "kernel half", "not executable"}


def test_heap_fit_leaves_a_few_bytes_of_the_heap() -> None:
    assert not _each("heap_fit", seeds=20), "no heap to fit without a profile"
    outs = _each("heap_fit", seeds=300, facts=seed_facts())
    assert outs
    near = 0
    for out in outs:
        idx = loads(out)
        memsz = [get_phdr(out, i)["memsz"] for i in idx]
        changed = [k for k, i in enumerate(idx) if memsz[k] != get_phdr(THREE, i)["memsz"]]
        if not changed:
            continue
        k = changed[0]
        for table in (_phnum(out), len(idx)):
            left = heap_free_before(SEED_HEAP, SEGMENT_RECORD, table, memsz, k) - \
                ((memsz[k] & 0xFFFF_FFFF) + 7 & ~7)
            if 0 <= left < SEED_SPLIT_THRESHOLD:
                near += 1
                break
    assert near > len(outs) // 2


def test_flip_segment_stays_inside_segment_data() -> None:
    ranges = [(p["offset"], p["offset"] + p["filesz"])
              for p in (get_phdr(THREE, i) for i in loads(THREE))]
    outs = _each("flip_segment")
    assert outs
    for out in outs:
        diff = [i for i in range(len(THREE)) if out[i] != THREE[i]]
        assert diff and len(out) == len(THREE)
        assert all(any(a <= i < b for a, b in ranges) for i in diff)


def test_resize_segment_keeps_later_segments_consistent() -> None:
    outs = _each("resize_segment", seeds=300)
    sizes = {len(out) - len(THREE) for out in outs}
    assert any(s > 0 for s in sizes) and any(s < 0 for s in sizes)
    for out in outs:
        assert _phnum(out) == _phnum(THREE)
        resized = [i for i in loads(THREE)
                   if get_phdr(out, i)["filesz"] != get_phdr(THREE, i)["filesz"]]
        assert len(resized) == 1
        for i in loads(THREE):
            old, new = get_phdr(THREE, i), get_phdr(out, i)
            assert (new["offset"] - old["offset"]) % 0x1000 == 0
            # compared past the ELF header and the table, whose offset fields moved along
            start = max(64 + _phnum(THREE) * PHDR - old["offset"], 0)
            keep = min(old["filesz"], new["filesz"])
            if i != resized[0]:
                assert new["filesz"] == old["filesz"]
            assert out[new["offset"] + start:new["offset"] + keep] == \
                THREE[old["offset"] + start:old["offset"] + keep]


def test_note_edits_one_note_header_or_owner_in_place() -> None:
    notes = (ROOT / "corpus" / "seeds" / "gnu-notes.elf").read_bytes()
    # the seed's PT_NOTE: the ABI tag, the SHA-1 build ID, the vendor note
    start = get_phdr(notes, next(i for i in range(_phnum(notes))
                                 if get_phdr(notes, i)["type"] == 4))["offset"]
    heads = [start, start + 12 + 4 + 16, start + 12 + 4 + 16 + 12 + 4 + 20]
    outs = _each("note", data=notes, seeds=300)
    assert len(outs) > 100
    kinds = Counter()
    for out in outs:
        assert len(out) == len(notes)
        diff = [i for i in range(len(notes)) if out[i] != notes[i]]
        # inside one note's header, or its name
        assert diff and any(all(h <= i < h + 12 + 8 for i in diff) for h in heads), diff
        for h in heads:
            if any(h <= i < h + 12 for i in diff):
                kinds[(min(diff) - h) // 4] += 1
    assert set(kinds) == {0, 1, 2}  # name size, description size, type
    # the description sizes a build ID check is about: a byte more than SHA-1's is among them
    sizes = {struct.unpack_from("<I", out, heads[1] + 4)[0] for out in outs}
    assert 21 in sizes or 24 in sizes
    # nothing to edit without a PT_NOTE
    assert _each("note") == []


# crossover --------------------------------------------------------------------------------
def test_crossover_takes_segments_and_their_data_from_b() -> None:
    other = _template(vaddr=0x80_0000, fill=0x5A)
    mutator = ElfMutator()
    b_seg = get_phdr(other, 0)
    b_data = other[:b_seg["filesz"]]
    found = 0
    for seed in range(100):
        out = mutator.crossover(THREE, other, 65536, seed)
        for entry in _entries(out):
            t, flags, off, vaddr, _, filesz, memsz, align = struct.unpack("<IIQQQQQQ", entry)
            if (vaddr, memsz, flags) == (b_seg["vaddr"], b_seg["memsz"], b_seg["flags"]):
                assert filesz == b_seg["filesz"]
                assert out[off:off + filesz] == b_data
                assert off % 0x1000 == 0  # congruent with vaddr for the page alignment
                found += 1
    assert found >= 90


def test_crossover_of_non_elf_is_a_splice() -> None:
    mutator = ElfMutator()
    a, b = b"A" * 300, b"B" * 300
    for seed in range(200):
        out = mutator.crossover(a, b, 400, seed)
        assert len(out) <= 400
        assert out == b"A" * out.count(b"A") + b"B" * out.count(b"B")
    assert mutator.crossover(b"", b"", 10, 1) == b""


# reaching the seed kernel's RX-01 ------------------------------------------------------------
def test_reaches_the_heap_split_region_without_booting() -> None:
    assert not seed_split_hit(THREE)
    assert seed_split_hit((EXAMPLES / "vaddr-0x300028.elf").read_bytes())
    i = loads(THREE)[-1]
    free = heap_free_before(SEED_HEAP, SEGMENT_RECORD, _phnum(THREE),
                            [get_phdr(THREE, k)["memsz"] for k in loads(THREE)],
                            len(loads(THREE)) - 1)
    assert seed_split_hit(set_phdr(THREE, i, memsz=free - 100))
    assert not seed_split_hit(set_phdr(THREE, i, memsz=free - 168))
    assert not seed_split_hit(set_header(set_phdr(THREE, i, memsz=free - 100), phentsize=0))

    mutator = ElfMutator(facts=seed_facts())
    hits = [seed for seed in range(20_000) if seed_split_hit(mutator.mutate(THREE, 65536, seed))]
    assert len(hits) >= 20, len(hits)


def test_split_hits_boot_to_the_planted_corruption() -> None:
    from kernel_emu.executor import Executor
    from kernel_emu.profile import load_profile

    mutator = ElfMutator(facts=seed_facts())
    candidates = []
    for seed in range(5000):
        out = mutator.mutate(THREE, 65536, seed)
        if seed_split_hit(out):
            candidates.append(out)
            if len(candidates) == 2:
                break
    executor = Executor(load_profile("seed"))
    for data in candidates:
        result = executor.run(data)
        assert result.verdict == "crash"
        assert "vaddr-corruption" in {f.cls for f in result.findings}, result.findings


def test_program_header_reads_agree_with_field_by_field_reads() -> None:
    """The table read at once (PT_LOAD indexes, entries) gives what reading each entry's
    fields one by one gives, whatever the stride, the table's offset or a cut-short end."""
    rng = random.Random(11)
    checked = 0  # tables read by whole words
    for _ in range(400):
        data = bytearray(THREE)
        phentsize = rng.choice((56, 56, 60, 64, 57, 100, 0, 3))
        phnum = rng.randrange(0, 40)
        phoff = rng.choice((64, 64, 65, 66, 0x100, len(data) - 100, len(data) - 56))
        struct.pack_into("<QHH", data, 0x20, phoff, 0, 0)
        struct.pack_into("<HH", data, 0x36, phentsize, phnum)
        data.extend(rng.randbytes(rng.randrange(0, 3000)))
        for _ in range(rng.randrange(0, 30)):
            at = rng.randrange(len(data) - 4)
            struct.pack_into("<I", data, at, rng.choice((1, 1, 2, 6, 0x6474E551)))
        del data[len(data) - rng.randrange(0, 60):]
        elf = parse(bytes(data))
        if elf is None:
            continue
        checked += elf.count > 0 and elf.stride % 4 == 0
        expect_loads = [i for i in range(elf.count) if elf.get(i, "p_type") == 1]
        assert elf.loads() == expect_loads
        entries = elf.entries()
        assert entries == [bytes(elf.buf[elf.at(i):elf.at(i) + PHDR]) for i in range(elf.count)]
        assert all(elf.entry_bytes(i) == entries[i] for i in range(elf.count))
    assert checked > 100
