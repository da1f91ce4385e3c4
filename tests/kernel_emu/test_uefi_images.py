"""The guest as a UEFI application: the committed PE32+ images and their link maps are what
the source builds to, they are real UEFI applications, and real firmware starts them."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import lief
import pytest

from kernel_emu import qemu, uefi_build
from kernel_emu.image import clean_rust_name, demangle
from kernel_emu.linkmap import LinkMapError, parse_link_map, read_link_map
from kernel_emu.profile import load_profile

IMAGES = Path(uefi_build.__file__).parent / "images"
VARIANTS = ("seed", "fixed", "upstream")
ALL = (*VARIANTS, uefi_build.SHIM)  # the kernels and the boot shim


def _entry(variant: str) -> dict:
    # named as the profiles: the UEFI builds are the built-in seed and fixed
    return json.loads((IMAGES / "manifest.json").read_text())[variant]


def _names(variant: str) -> dict[str, int]:
    symbols = read_link_map(IMAGES / _entry(variant)["map"])
    return {clean_rust_name(demangle(s.name)): s.rva for s in symbols}


@pytest.mark.parametrize("variant", ALL)
def test_manifest_describes_the_committed_uefi_image(variant: str) -> None:
    entry = _entry(variant)
    data = (IMAGES / entry["file"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == entry["sha256"] and entry["size"] == len(data)
    assert hashlib.sha256((IMAGES / entry["map"]).read_bytes()).hexdigest() == \
        entry["map_sha256"]
    assert hashlib.sha256((IMAGES / entry["debug"]).read_bytes()).hexdigest() == \
        entry["debug_sha256"]
    assert not any(flag.startswith("/") or "/tmp" in flag for flag in entry["flags"])


@pytest.mark.parametrize("variant", ALL)
def test_the_image_is_a_relocatable_uefi_application(variant: str) -> None:
    binary = lief.PE.parse(str(IMAGES / _entry(variant)["file"]))
    assert binary is not None
    assert binary.header.machine == lief.PE.Header.MACHINE_TYPES.AMD64
    assert binary.optional_header.magic == lief.PE.PE_TYPE.PE32_PLUS
    assert binary.optional_header.subsystem == lief.PE.OptionalHeader.SUBSYSTEM.EFI_APPLICATION
    # base relocations: the firmware may load it anywhere
    assert sum(len(block.entries) for block in binary.relocations) > 0
    assert binary.optional_header.addressof_entrypoint == _names(variant)["efi_main"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_link_map_names_what_the_profile_needs(variant: str) -> None:
    profile = load_profile(variant)
    names = _names(variant)
    for name in (profile.kernel.success_symbol, profile.kernel.snapshot_symbol,
                 profile.kernel.stack_base_symbol, profile.heap.alloc_symbol,
                 profile.heap.dealloc_symbol, profile.heap.free_list_symbol):
        assert name in names, name


def test_a_file_that_is_no_link_map_is_refused(tmp_path: Path) -> None:
    with pytest.raises(LinkMapError):
        parse_link_map("hello\nworld\n")
    with pytest.raises(LinkMapError, match="cannot read"):
        read_link_map(tmp_path / "absent.map")


def test_symbol_sizes_reach_the_next_symbol() -> None:
    symbols = read_link_map(IMAGES / _entry("seed")["map"])
    code = [s for s in symbols if s.code]
    assert all(s.size >= 0 for s in symbols)
    # consecutive functions of .text do not overlap
    for a, b in zip(code, code[1:], strict=False):
        if a.rva != b.rva:
            assert a.rva + a.size <= b.rva, (a, b)


def test_uefi_images_match_source(tmp_path: Path) -> None:
    """Skipped only without the UEFI toolchain, or with another version of it than the one
    the images were built with: with it, an image or map that differs byte for byte fails."""
    missing = uefi_build.missing_toolchain()
    if missing:
        pytest.skip(f"cannot build the UEFI images here: {missing}")
    found = uefi_build.find_uefi_rustc()
    assert found is not None
    version = uefi_build.rustc_version(found[0])
    if version != _entry("seed")["rustc"]:
        pytest.skip(f"the UEFI images were built with {_entry('seed')['rustc']}, "
                    f"this machine has {version}")
    for variant in ALL:
        rebuilt = uefi_build.build(variant, tmp_path, progress=lambda _line: None)
        assert rebuilt["sha256"] == _entry(variant)["sha256"], variant
        assert rebuilt["map_sha256"] == _entry(variant)["map_sha256"], variant
        assert rebuilt["debug_sha256"] == _entry(variant)["debug_sha256"], variant


@pytest.mark.parametrize("variant", ALL)
def test_the_dwarf_companion_is_the_image_s_code_with_line_tables(variant: str) -> None:
    entry = _entry(variant)
    image = lief.PE.parse(str(IMAGES / entry["file"]))
    debug = lief.PE.parse(str(IMAGES / entry["debug"]))
    assert image is not None and debug is not None

    def named(pe: lief.PE.Binary) -> dict[str, bytes]:
        return {(s.coff_string.string if s.coff_string is not None else s.name):
                bytes(s.content) for s in pe.sections}

    assert named(image)[".text"] == named(debug)[".text"]
    assert {".debug_line", ".debug_info"} <= set(named(debug))
    assert not any(s.startswith(".debug") for s in named(image))  # the image carries none
    # no path of the machine that built it: the guest sources are named `rustux/...`
    raw = (IMAGES / entry["debug"]).read_bytes()
    assert b"rustux" in raw and not re.search(rb"/(home|root|tmp|work|usr)/", raw)


def test_source_lines_of_a_uefi_image_wherever_it_is_loaded() -> None:
    from dashboard.kernelinfo import image_lines
    from kernel_emu.image import load_image

    heap = (Path(uefi_build.GUEST_DIR) / "src" / "mm" / "heap.rs").read_text().splitlines()
    for base in (0x100000, 0x5eaa000):
        image = load_image(IMAGES / "seed.efi", base)
        allocate = image.symbol("rustux::mm::heap::LinkedListAllocator::allocate")
        line = image_lines(image).lookup(allocate.address)
        assert line is not None and line.file == "src/mm/heap.rs"
        assert "fn allocate" in heap[line.line - 1]


@pytest.mark.slow
def test_real_firmware_starts_the_uefi_image() -> None:
    """QEMU + OVMF load the PE32+ image, apply its relocations and enter efi_main: the kernel
    prints its banner with the handle and system table the firmware passed, reads a memory map
    of a real machine's size (a pool buffer: it outgrows the one on the stack) and leaves boot
    services."""
    missing = qemu.missing()
    if missing:
        pytest.skip(missing)
    result = qemu.boot(IMAGES / _entry("seed")["file"], timeout=120,
                       done=lambda log: "[mm] page allocator" in log or "[PANIC]" in log)
    lines = result.log.splitlines()
    print(f"\nOVMF to the page allocator in {result.seconds:.1f} s: {lines[0]}; "
          f"{lines[1] if len(lines) > 1 else ''}")
    m = re.fullmatch(r"\[boot\] Rustux efi_main image_handle=(0x[0-9a-f]+) "
                     r"system_table=(0x[0-9a-f]+)", lines[0])
    assert m, result.log
    assert int(m.group(1), 16) and int(m.group(2), 16)
    exited = re.search(r"^\[boot\] boot services exited, memory map has (\d+) entries$",
                       result.log, re.M)
    assert exited and int(exited.group(1)) > 4096 // 48, result.log[-2000:]
    assert "[mm] page allocator" in result.log, result.log[-2000:]
