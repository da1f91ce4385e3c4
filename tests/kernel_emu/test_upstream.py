"""The upstream build: public Rustux's allocator and loader mechanics under the emulator, and
the fixed build on the same inputs."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from kernel_emu.executor import Executor
from kernel_emu.profile import load_profile
from tests.elfs import ToolMissingError, build_elf, build_static_program, readelf_loads

HEAP_BASE_PAYLOAD = 0x300028  # the upstream heap's base plus its 40-byte header


@pytest.fixture(scope="module")
def executors() -> dict[str, Executor]:
    return {k: Executor(load_profile(k)) for k in ("upstream", "fixed")}


@pytest.fixture(scope="module")
def static_program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        return build_static_program(tmp_path_factory.mktemp("static"))
    except ToolMissingError as e:
        pytest.skip(str(e))


def _phdr_types(data: bytes) -> list[int]:
    phoff, = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    return [struct.unpack_from("<I", data, phoff + i * phentsize)[0] for i in range(phnum)]


def test_a_gcc_static_program_gets_vaddr_0x300028_with_its_cause(
        executors: dict[str, Executor], static_program: Path) -> None:
    data = static_program.read_bytes()
    assert len(_phdr_types(data)) > 4  # what makes the program header Vec grow
    result = executors["upstream"].run(data)
    assert result.verdict == "crash"
    assert result.segments[0]["vaddr"] == HEAP_BASE_PAYLOAD
    cause, *consequences = result.findings
    # the cause: an allocation handed out over a live one, and the free that allowed it
    assert cause.cls == "heap-corruption" and cause.field == "allocation.overlap"
    assert "returned 0x300028" in cause.evidence[0]
    assert cause.evidence[1].startswith("the free before it:")
    assert "LinkedListAllocator::deallocate" in cause.evidence[1]
    assert "LinkedListAllocator::allocate" in cause.frames[0]
    assert cause.signature().split(" | ")[1].startswith(
        "rustux::mm::heap::LinkedListAllocator::allocate")
    # the consequence: the segment table's head overwritten with a pointer
    vaddr = next(f for f in consequences if f.field == "segments[0].vaddr")
    assert vaddr.cls == "vaddr-corruption"
    assert "kernel loaded vaddr 0x300028" in vaddr.evidence[0]
    # the upstream mapping refuses the address that is not page-aligned
    assert result.reject_reason == "segment address not page-aligned"


def test_the_fixed_build_loads_the_same_program_cleanly(
        executors: dict[str, Executor], static_program: Path) -> None:
    result = executors["fixed"].run(static_program.read_bytes())
    assert result.verdict == "ok", result.findings
    assert result.stop == "until"
    assert result.segments == readelf_loads(static_program)


def test_one_pt_load_panics_reading_segment_2(executors: dict[str, Executor],
                                              tmp_path: Path) -> None:
    result = executors["upstream"].run(build_elf(tmp_path, loads=1).read_bytes())
    assert result.verdict == "crash"
    classes = [(f.cls, f.field) for f in result.findings]
    # the heap is already wrong before the panic: the cause comes first
    assert classes[0] == ("heap-corruption", "allocation.overlap")
    panic = next(f for f in result.findings if f.cls == "kernel-panic")
    assert "index out of bounds: the len is 1 but the index is 2" in panic.evidence[0]


def test_the_heap_walk_reads_headers_that_count_themselves(executors: dict[str, Executor],
                                                           tmp_path: Path) -> None:
    """Upstream blocks claim more than they hold: the walk must not call the first block's
    size (the whole heap, header included) a block running past the heap's end."""
    result = executors["upstream"].run(build_elf(tmp_path, loads=3).read_bytes())
    assert not any(f.field in ("block.size", "heap.size") for f in result.findings), \
        result.findings
    assert result.heap_blocks, "the free list was not walked"
    assert all(b["free"] and b["magic_ok"] for b in result.heap_blocks)


def _elf(phdrs: list[tuple[int, ...]], phoff: int = 64) -> bytes:
    header = b"\x7fELF\x02\x01\x01" + bytes(9) + struct.pack(
        "<HHIQQQIHHHHHH", 2, 62, 1, 0x400100, phoff, 0, 0, 64, 56, len(phdrs), 64, 0, 0)
    table = b"".join(struct.pack("<IIQQQQQQ", *p) for p in phdrs)
    return (header + table).ljust(0x1000, b"\0")


def test_a_free_list_that_loops_is_seen_by_the_heap_walk(executors: dict[str, Executor]) -> None:
    """Five program headers and no PT_LOAD: every free the loader makes is of a live pointer,
    yet the first block is marked free twice and heads a list that points back to itself."""
    note = (4, 4, 0, 0, 0, 0, 0, 4)
    result = executors["upstream"].run(_elf([note] * 5))
    first = result.findings[0]
    assert (first.cls, first.field) == ("heap-corruption", "free_list")
    assert "loops back to 0x300000" in first.evidence[0]
    assert executors["fixed"].run(_elf([note] * 5)).reject_reason == "no loadable segments"


def test_a_program_header_offset_that_wraps_panics(executors: dict[str, Executor]) -> None:
    load = (1, 7, 0, 0x400000, 0x400000, 0x1000, 0x1000, 0x1000)
    data = bytearray(_elf([load]))
    struct.pack_into("<Q", data, 32, (1 << 64) - 1)
    result = executors["upstream"].run(bytes(data))
    assert result.crash_class == "kernel-panic"
    assert "slice_index_fail" in (result.signature or "")
    assert executors["fixed"].run(bytes(data)).verdict == "rejected"


def test_the_input_replaces_the_embedded_program(executors: dict[str, Executor],
                                                 tmp_path: Path) -> None:
    """Upstream reads bin/init from a blob in its own image: each input is written there (and
    what a longer input left behind is cleared), never handed over by the firmware."""
    ex = executors["upstream"]
    image = ex.image
    blob = image.symbol(ex.profile.input.symbol).address
    assert image.start <= blob < image.end
    longer = build_elf(tmp_path, loads=3, bss=0x3000, name="long").read_bytes() + bytes(5000)
    shorter = build_elf(tmp_path, loads=2, name="short").read_bytes()
    for data in (longer, shorter):
        result = ex.run(data)
        line = next(x for x in result.log.splitlines() if x.startswith("[elf] bin/init at "))
        assert line.endswith(f", {len(data)} bytes"), line
        assert int(line.split()[3].rstrip(","), 16) == blob + ex.profile.input.data_offset
    tail = ex.machine.read(blob + 8 + len(shorter), len(longer) - len(shorter))
    assert tail == bytes(len(tail))


def test_an_input_larger_than_the_blob_is_an_input_error(
        executors: dict[str, Executor]) -> None:
    from kernel_emu.errors import InputError

    with pytest.raises(InputError, match="embedded init program"):
        executors["upstream"].run(bytes(executors["upstream"].profile.input.capacity + 1))


def test_an_embedded_input_needs_its_symbol(tmp_path: Path) -> None:
    from kernel_emu.errors import ProfileError
    from kernel_emu.profile import load_profile_file

    source = load_profile("upstream").source
    text = source.read_text().replace('image = "../images/upstream.efi"',
                                      f'image = "{load_profile("upstream").image}"')
    bad = text.replace('symbol = "rustux::loader::embedded::EMBEDDED_INIT"\n', "")
    (tmp_path / "bad.toml").write_text(bad)
    with pytest.raises(ProfileError, match="embedded input needs"):
        load_profile_file(tmp_path / "bad.toml")
    (tmp_path / "odd.toml").write_text(text.replace('channel = "embedded"', 'channel = "tape"'))
    with pytest.raises(ProfileError, match="channel must be one of"):
        load_profile_file(tmp_path / "odd.toml")
