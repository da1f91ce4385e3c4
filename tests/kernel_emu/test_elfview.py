"""elfview against readelf and pyelftools on real ELFs, and its never-raise guarantee."""

from __future__ import annotations

import io
import random
import struct
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from kernel_emu.elfview import (
    ELF64_PHDR_SIZE,
    MAX_PROBLEMS,
    PT_LOAD,
    ElfView,
    ProgramHeader,
    Segment,
    describe_header,
    load_segments,
    load_segments_python,
    read_elf,
)
from tests.elfs import build_elf, readelf_loads, tools_available

needs_gcc = pytest.mark.skipif(not tools_available(), reason="gcc and readelf are required")

# Byte offsets and widths of the ELF64 header fields a mutation may overwrite.
_EHDR_FIELDS = [(4, 1), (5, 1), (6, 1), (16, 2), (18, 2), (20, 4), (24, 8), (32, 8), (40, 8),
                (52, 2), (54, 2), (56, 2), (58, 2), (60, 2), (62, 2)]
# Offset and width of each Elf64_Phdr field.
_PHDR_FIELDS = [(0, 4), (4, 4), (8, 8), (16, 8), (24, 8), (32, 8), (40, 8), (48, 8)]
_EXTREMES = [0, 1, 0x38, 0x7F, 0xFF, 0xFFFF, 0xFFFF_FFFF, 1 << 63, (1 << 64) - 1,
             (1 << 64) - 0x38, (1 << 64) - 1 - 0x1000]


@pytest.fixture(scope="module")
def elf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("elfs")


def _pyelftools_loads(image: bytes) -> list[dict[str, int]]:
    elf = ELFFile(io.BytesIO(image))
    return [
        {
            "vaddr": seg["p_vaddr"],
            "memsz": seg["p_memsz"],
            "filesz": seg["p_filesz"],
            "offset": seg["p_offset"],
            "flags": seg["p_flags"],
        }
        for seg in elf.iter_segments()
        if seg["p_type"] == "PT_LOAD"
    ]


def _patch(image: bytes, offset: int, width: int, value: int) -> bytes:
    out = bytearray(image)
    out[offset:offset + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
    return bytes(out)


def _check_invariants(view: ElfView, data: bytes) -> None:
    assert isinstance(view, ElfView)
    # the lean reader every run uses (natively where built, and its Python reference) must
    # agree with the full one on any bytes
    lean = load_segments(data)
    assert lean == view.load_segments == load_segments_python(data)
    assert all(type(seg) is Segment for seg in lean)
    assert load_segments(bytearray(data)) == load_segments(memoryview(data)) == lean
    assert all(isinstance(p, str) for p in view.problems)
    assert len(view.problems) <= MAX_PROBLEMS + 1
    assert len(view.program_headers) <= min(view.phnum, 65535)
    assert [ph.index for ph in view.program_headers] == list(range(len(view.program_headers)))
    if view.program_headers:
        assert view.phoff + len(view.program_headers) * ELF64_PHDR_SIZE <= len(data)
    loads = view.load_segments
    assert len(loads) == sum(ph.p_type == PT_LOAD for ph in view.program_headers)
    assert all(isinstance(value, int) for seg in loads for value in seg.to_json().values())
    if view.is_loadable_candidate:
        assert len(view.program_headers) == view.phnum > 0
    rows = describe_header(view)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in rows)


# --- real ELFs -------------------------------------------------------------------------------


@needs_gcc
@pytest.mark.parametrize("loads", [1, 2, 3, 4])
def test_agrees_with_readelf_and_pyelftools(elf_dir: Path, loads: int) -> None:
    path = build_elf(elf_dir, loads=loads, name=f"loads{loads}")
    image = path.read_bytes()
    view = read_elf(image)

    segments = [seg.to_json() for seg in view.load_segments]
    assert segments == readelf_loads(path)
    assert segments == _pyelftools_loads(image)
    assert len(segments) == loads
    assert view.is_loadable_candidate
    assert view.problems == ()

    header = ELFFile(io.BytesIO(image)).header
    assert view.entry == header["e_entry"]
    assert view.phoff == header["e_phoff"]
    assert view.phnum == header["e_phnum"]
    assert view.shoff == header["e_shoff"]
    assert view.shnum == header["e_shnum"]


@needs_gcc
@pytest.mark.parametrize(
    ("loads", "bss", "text_pad", "data"),
    [
        (1, 0, 0, None),
        (2, 0x10000, 0x1800, b"\x01" * 5000),
        (3, 0, 0x3000, b"abc"),
        (4, 0x123, 0, b"x"),
        (4, 0x40000, 0x2345, bytes(range(256)) * 20),
    ],
    ids=["one-rwx-no-bss", "two-big-data", "three-small-data", "four-tiny", "four-big"],
)
def test_variants_agree_with_readelf(
    elf_dir: Path, loads: int, bss: int, text_pad: int, data: bytes | None
) -> None:
    path = build_elf(elf_dir, loads=loads, bss=bss, text_pad=text_pad, data=data,
                     name=f"v{loads}_{bss:x}_{text_pad:x}")
    view = read_elf(path.read_bytes())
    expected = readelf_loads(path)
    assert [seg.to_json() for seg in view.load_segments] == expected
    assert len(expected) == loads
    assert view.problems == ()
    # BSS only ever adds memory; the last writable load carries it.
    last = view.load_segments[-1]
    if bss:
        assert last.memsz >= last.filesz + bss
    else:
        assert last.memsz == last.filesz


@needs_gcc
def test_build_elf_rejects_an_empty_segment(elf_dir: Path) -> None:
    with pytest.raises(ValueError, match="empty"):
        build_elf(elf_dir, loads=4, bss=0)


@needs_gcc
def test_describe_header_of_a_real_elf(elf_dir: Path) -> None:
    view = read_elf(build_elf(elf_dir, loads=3, name="loads3").read_bytes())
    rows = dict(describe_header(view))
    assert rows["magic"] == "ok"
    assert rows["class"] == "ELF64 (0x2)"
    assert rows["machine"] == "x86-64 (0x3e)"
    assert rows["type"] == "EXEC (0x2)"
    assert rows["entry"] == f"0x{view.entry:x}"
    assert rows["PT_LOAD segments"] == "0x3"
    assert rows["loadable candidate"] == "yes"


# --- hand-made hostile headers ---------------------------------------------------------------


def _minimal_elf(*, phnum: int = 1, phoff: int = 64, phentsize: int = 56,
                 phdrs: list[tuple[int, ...]] | None = None, size: int = 0x200) -> bytes:
    """A hand-packed ELF64 header and table, zero-padded to at least `size` bytes."""
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header = ident + struct.pack(
        "<HHIQQQIHHHHHH", 2, 62, 1, 0x401000, phoff, 0, 0, 64, phentsize, phnum, 64, 0, 0
    )
    table = phdrs if phdrs is not None else [(PT_LOAD, 5, 0, 0x400000, 0x400000, 0x100, 0x100,
                                              0x1000)]
    body = b"".join(struct.pack("<IIQQQQQQ", *ph) for ph in table)
    return (header + body).ljust(size, b"\0")


def test_minimal_elf_reads_cleanly() -> None:
    view = read_elf(_minimal_elf())
    assert view.is_loadable_candidate
    assert view.problems == ()
    assert view.program_headers == (
        ProgramHeader(0, PT_LOAD, 5, 0, 0x400000, 0x400000, 0x100, 0x100, 0x1000),
    )
    assert view.load_segments == (Segment(0x400000, 0x100, 0x100, 0, 5),)


@pytest.mark.parametrize(
    "data",
    [b"", b"\x7f", b"\x7fEL", b"\x7fELF", b"\x7fELF\x02\x01", b"MZ" + bytes(100),
     b"\x7fELF" + bytes(60), b"\xff" * 64, b"\x7fELF" + b"\xff" * 60],
)
def test_degenerate_inputs(data: bytes) -> None:
    view = read_elf(data)
    _check_invariants(view, data)
    assert view.problems
    assert not view.is_loadable_candidate


def test_non_bytes_input_is_reported_not_raised() -> None:
    view = read_elf(12345)  # type: ignore[arg-type]
    assert not view.is_elf
    assert view.problems


def test_phnum_xnum_reads_only_what_fits() -> None:
    data = _minimal_elf(phnum=0xFFFF, size=0)
    view = read_elf(data)
    _check_invariants(view, data)
    assert len(view.program_headers) == 1
    assert any("PN_XNUM" in p for p in view.problems)
    assert any("program header 1 lies past the end of the file" in p for p in view.problems)
    assert not view.is_loadable_candidate


def test_phnum_xnum_with_a_full_table_is_capped() -> None:
    # filesz > memsz makes every entry a problem.
    phdr = (PT_LOAD, 6, 0, 0x400000, 0, 0x20, 0x10, 0)
    data = _minimal_elf(phnum=0xFFFF, phdrs=[phdr] * 0x10000)
    view = read_elf(data)
    assert len(view.program_headers) == 0xFFFF
    # One problem per header would be useless; the list stays short.
    assert len(view.problems) == MAX_PROBLEMS + 1
    assert view.problems[-1].startswith("... and ")


@pytest.mark.parametrize("phoff", [(1 << 64) - 1, (1 << 64) - 56, 1 << 63, 0x10000, 0x200])
def test_phoff_past_the_end(phoff: int) -> None:
    data = _minimal_elf(phoff=phoff)
    view = read_elf(data)
    _check_invariants(view, data)
    assert view.phoff == phoff
    assert view.program_headers == ()
    assert any("past the end of the file" in p for p in view.problems)


@pytest.mark.parametrize("phentsize", [0, 1, 55])
def test_phentsize_too_small_for_an_entry_reads_56_apart(phentsize: int) -> None:
    data = _minimal_elf(phentsize=phentsize, phnum=2, phdrs=[
        (PT_LOAD, 5, 0, 0x400000, 0x400000, 0x100, 0x100, 0x1000),
        (PT_LOAD, 6, 0x1000, 0x401000, 0x401000, 0, 0x2000, 0x1000),
    ])
    view = read_elf(data)
    assert [seg.vaddr for seg in view.load_segments] == [0x400000, 0x401000]
    assert any("e_phentsize" in p for p in view.problems)


@pytest.mark.parametrize("phentsize", [57, 0x70, 0x100])
def test_larger_phentsize_is_the_stride(phentsize: int) -> None:
    """Entries are e_phentsize apart; the bytes after each Elf64_Phdr are padding."""
    first = struct.pack("<IIQQQQQQ", PT_LOAD, 5, 0, 0x400000, 0x400000, 0x100, 0x100, 0x1000)
    second = struct.pack("<IIQQQQQQ", PT_LOAD, 6, 0x1000, 0x401000, 0x401000, 0, 0x2000,
                         0x1000)
    table = first.ljust(phentsize, b"\xee") + second.ljust(phentsize, b"\xee")
    data = (_minimal_elf(phentsize=phentsize, phnum=2, phdrs=[])[:64] + table).ljust(0x400,
                                                                                   b"\0")
    view = read_elf(data)
    assert [seg.vaddr for seg in view.load_segments] == [0x400000, 0x401000]
    assert any("e_phentsize" in p for p in view.problems)


def test_huge_phentsize_reads_what_fits() -> None:
    data = _minimal_elf(phentsize=0xFFFF, phnum=2, size=0x400)
    view = read_elf(data)
    assert len(view.program_headers) == 1
    assert any("past the end of the file" in p for p in view.problems)


def test_phnum_zero() -> None:
    data = _minimal_elf(phnum=0)
    view = read_elf(data)
    assert view.program_headers == ()
    assert not view.is_loadable_candidate
    assert any("no program headers" in p for p in view.problems)


def test_overflowing_segment_ranges_are_reported() -> None:
    top = (1 << 64) - 1
    data = _minimal_elf(phnum=3, phdrs=[
        (PT_LOAD, 5, top, 0x400000, 0x400000, 0x10, 0x10, 0x1000),
        (PT_LOAD, 5, 0, top - 0xF, 0, 0x10, 0x20, 0x1000),
        (PT_LOAD, 5, 0x100, 0x400000, 0, 0x20, 0x10, 0x1000),
    ])
    view = read_elf(data)
    problems = "\n".join(view.problems)
    assert "program header 0 (LOAD): p_offset + p_filesz overflows 64 bits" in problems
    assert "program header 1 (LOAD): p_vaddr + p_memsz overflows 64 bits" in problems
    assert "program header 2 (LOAD): p_filesz 0x20 exceeds p_memsz 0x10" in problems
    assert "program header 2 (LOAD): p_vaddr and p_offset differ modulo" in problems
    assert len(view.load_segments) == 3


def test_elf32_and_big_endian_report_header_only() -> None:
    elf32 = b"\x7fELF" + bytes([1, 1, 1]) + bytes(9) + struct.pack(
        "<HHIIIIIHHHHHH", 2, 3, 1, 0x8048000, 52, 0, 0, 52, 32, 1, 40, 0, 0
    ) + bytes(32)
    view = read_elf(elf32)
    assert (view.elf_class, view.machine, view.entry, view.phnum) == (1, 3, 0x8048000, 1)
    assert view.program_headers == ()
    assert not view.is_loadable_candidate

    big = bytearray(_minimal_elf())
    big[5] = 2
    big[16:64] = struct.pack(">HHIQQQIHHHHHH", 2, 62, 1, 0x401000, 64, 0, 0, 64, 56, 1, 64, 0, 0)
    view = read_elf(bytes(big))
    assert (view.data, view.machine, view.entry, view.phnum) == (2, 62, 0x401000, 1)
    assert view.program_headers == ()
    assert any("big-endian" in p for p in view.problems)


# --- never raise -----------------------------------------------------------------------------


def test_random_bytes_never_raise() -> None:
    rng = random.Random(0x5EED)
    prefixes = [b"", b"\x7fELF", b"\x7fELF\x02\x01\x01", b"\x7fELF\x01\x02"]
    for i in range(5000):
        length = rng.choice([0, 1, 3, 4, 5, 16, 52, 63, 64, 65, 120, 200, 1000, 4096])
        data = prefixes[i % len(prefixes)] + rng.randbytes(length)
        _check_invariants(read_elf(data), data)


def _mutate(rng: random.Random, image: bytes) -> bytes:
    kind = rng.randrange(5)
    if kind == 0:
        flipped = bytearray(image)
        for _ in range(rng.randint(1, 16)):
            bit = rng.randrange(len(flipped) * 8)
            flipped[bit // 8] ^= 1 << (bit % 8)
        return bytes(flipped)
    if kind == 1:
        return image[:rng.randrange(len(image) + 1)]
    if kind == 2:
        offset, width = rng.choice(_EHDR_FIELDS)
    else:
        # Aim at the real table most of the time, and at random positions otherwise.
        phoff = struct.unpack_from("<Q", image, 32)[0]
        phnum = struct.unpack_from("<H", image, 56)[0]
        field_offset, width = rng.choice(_PHDR_FIELDS)
        index = rng.randrange(max(phnum, 1) + 1)
        offset = phoff + index * ELF64_PHDR_SIZE + field_offset
        if kind == 4 or offset + width > len(image):
            offset = rng.randrange(len(image) - width + 1)
    value = rng.choice([*_EXTREMES, rng.getrandbits(8 * width), len(image), len(image) - 56])
    out = _patch(image, offset, width, value)
    if rng.random() < 0.2:
        out = out[:rng.randrange(len(out) + 1)]
    return out


@needs_gcc
def test_mutated_real_elfs_never_raise(elf_dir: Path) -> None:
    rng = random.Random(0xE1F)
    images = [build_elf(elf_dir, loads=n, name=f"loads{n}").read_bytes() for n in (1, 2, 3, 4)]
    compared = 0
    for i in range(5000):
        data = _mutate(rng, images[i % len(images)])
        view = read_elf(data)
        _check_invariants(view, data)
        # pyelftools as a second opinion where both read the same table the same way: it
        # strides by e_phentsize and follows extended numbering, so only the plain case counts.
        if (i % 5 == 0 and view.is_loadable_candidate and view.phentsize == ELF64_PHDR_SIZE
                and view.phnum != 0xFFFF):
            try:
                theirs = _pyelftools_loads(data)
            except Exception:  # noqa: BLE001 - pyelftools may reject what elfview reports
                continue
            assert [seg.to_json() for seg in view.load_segments] == theirs
            compared += 1
    assert compared > 100


def test_extreme_headers_never_raise() -> None:
    base = _minimal_elf(phnum=2, phdrs=[
        (PT_LOAD, 5, 0, 0x400000, 0x400000, 0x100, 0x100, 0x1000),
        (PT_LOAD, 6, 0x1000, 0x401000, 0x401000, 0, 0x2000, 0x1000),
    ])
    for offset, width in _EHDR_FIELDS + [(64 + o, w) for o, w in _PHDR_FIELDS]:
        for value in _EXTREMES:
            data = _patch(base, offset, width, value)
            _check_invariants(read_elf(data), data)
