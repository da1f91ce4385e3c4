"""A UEFI image loaded as a firmware loads it: anywhere, with its base relocations applied."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import lief
import pytest

from kernel_emu.errors import ImageError
from kernel_emu.image import KernelImage
from kernel_emu.peload import REL_DIR64, apply_relocations, load_pe

IMAGES = Path(__file__).parents[2] / "kernel_emu" / "images"
SEED = IMAGES / "seed.efi"


def _relocation_sites(path: Path) -> list[int]:
    binary = lief.PE.parse(str(path))
    assert binary is not None
    dir64 = lief.PE.RelocationEntry.BASE_TYPES.DIR64
    return sorted(block.virtual_address + entry.position for block in binary.relocations
                  for entry in block.entries if entry.type == dir64)


def test_two_load_addresses_differ_exactly_at_the_relocations() -> None:
    low = load_pe(SEED.read_bytes(), SEED, 0x10_0000)
    high = load_pe(SEED.read_bytes(), SEED, 0x7654_3000)
    delta = 0x7654_3000 - 0x10_0000
    sites = _relocation_sites(SEED)
    assert low.relocations == high.relocations == len(sites) > 10
    assert high.entry - low.entry == delta
    changed = []
    for a, b in zip(low.segments, high.segments, strict=True):
        assert (b.vaddr - a.vaddr, b.memsz, b.flags) == (delta, a.memsz, a.flags)
        for at in range(0, len(a.data) - 7):
            if a.data[at:at + 8] != b.data[at:at + 8] and (a.vaddr - low.base + at) in sites:
                (x,), (y,) = struct.unpack_from("<Q", a.data, at), struct.unpack_from(
                    "<Q", b.data, at)
                assert y - x == delta
                changed.append(a.vaddr - low.base + at)
        # nothing else differs: every differing byte lies in a relocated quadword
        for at, (x, y) in enumerate(zip(a.data, b.data, strict=True)):
            if x != y:
                rva = a.vaddr - low.base + at
                assert any(site <= rva < site + 8 for site in sites), hex(rva)
    assert sorted(changed) == sites


def test_at_its_preferred_base_nothing_is_relocated() -> None:
    loaded = load_pe(SEED.read_bytes(), SEED)
    assert loaded.base == loaded.preferred_base and loaded.relocations == 0


def test_symbols_and_code_move_with_the_image() -> None:
    a, b = KernelImage(SEED, 0x10_0000), KernelImage(SEED, 0x40_0000)
    name = "rustux::mm::heap::LinkedListAllocator::allocate"
    assert b.symbol(name).address - a.symbol(name).address == 0x30_0000
    assert a.describe(a.entry) == "efi_main" and b.describe(b.entry) == "efi_main"
    assert a.text_ranges[0][0] == 0x10_1000


def test_a_uefi_image_without_its_link_map_is_refused(tmp_path: Path) -> None:
    shutil.copy(SEED, tmp_path / "seed.efi")
    with pytest.raises(ImageError, match="link map"):
        KernelImage(tmp_path / "seed.efi", 0x10_0000)


@pytest.mark.parametrize("table, message", [
    (struct.pack("<II", 0x1000, 4), "bad size"),
    (struct.pack("<II", 0x1000, 0x100), "bad size"),
    (struct.pack("<IIH", 0x1000, 10, 5 << 12), "type 5"),
    (struct.pack("<IIH", 0xF000, 10, REL_DIR64 << 12 | 0xFFC), "outside the image"),
])
def test_a_malformed_relocation_table_is_refused(table: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        apply_relocations(bytearray(0x2000), table, 0x1000)


@pytest.mark.parametrize("base", [0x10_0001, 0xFFFF_FFFF_FFFF_F000])
def test_an_impossible_load_address_is_refused(base: int) -> None:
    with pytest.raises(ImageError, match="cannot load"):
        load_pe(SEED.read_bytes(), SEED, base)


def test_bytes_that_are_no_pe_are_refused() -> None:
    for raw in (b"MZ", b"MZ" + bytes(100), SEED.read_bytes()[:300]):
        with pytest.raises(ImageError):
            load_pe(raw, Path("x.efi"), 0x10_0000)


def _prolog_layout(code: bytes, address: int) -> tuple[int, int] | None:
    """(saved rbp, return address) relative to rbp, read from the prolog's instructions."""
    import capstone

    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    pushes: list[str] = []
    alloc = 0
    for insn in md.disasm(code, address):
        if insn.mnemonic == "push":
            pushes.append(insn.op_str)
        elif insn.mnemonic == "sub" and insn.op_str.startswith("rsp, "):
            alloc += int(insn.op_str.split(", ")[1], 0)
        elif insn.mnemonic == "lea" and insn.op_str.startswith("rbp, [rsp"):
            inside = insn.op_str.split("[")[1].rstrip("]")
            offset = int(inside.split("+")[1], 0) if "+" in inside else 0
            above = alloc - offset
            return above + 8 * (len(pushes) - 1 - pushes.index("rbp")), above + 8 * len(pushes)
        else:
            return None
    return None


def test_unwind_entries_agree_with_the_prologs() -> None:
    image = KernelImage(SEED, 0x10_0000)
    code = {s.vaddr: s.data for s in image.segments if s.flags & 1}
    (text_base, text), = code.items()
    assert len(image.unwind) > 20
    checked = 0
    for start, end, saved_rbp, ret in image.unwind:
        assert text_base <= start < end <= text_base + len(text)
        layout = _prolog_layout(text[start - text_base:start - text_base + 64], start)
        if layout is not None:
            assert layout == (saved_rbp, ret), image.describe(start)
            checked += 1
    assert checked >= len(image.unwind) // 2
    name = "rustux::mm::heap::LinkedListAllocator::allocate"
    allocate = image.symbol(name).address
    assert any(e[0] == allocate for e in image.unwind)


def test_the_tracers_refuse_an_unsorted_unwind_table() -> None:
    from kernel_emu.executor import Executor
    from kernel_emu.profile import load_profile

    for native in (True, False):
        executor = Executor(load_profile("seed"), native=native)
        with pytest.raises(ValueError, match="sorted"):
            executor.tracer.unwind([(0x2000, 0x3000, 0, 8), (0x1000, 0x1800, 0, 8)])
