"""The seed corpus: small static x86-64 executables that every Rustux build loads.

Each seed starts as the C template (plus, for layouts with many segments, the blob template)
compiled and linked by gcc with a generated linker script (`corpus.toolchain`), then goes
through LIEF, which edits what a linker script cannot say directly (entry point, p_align,
p_memsz, extra segments) and strips the symbols. The catalogue covers 1 to 20 PT_LOADs,
BSS, several alignments, entry points away from the start of the text, segment sizes at page
boundaries and large BSS. Seeds stay clear of the allocator's edge cases on purpose: finding
those is the fuzzer's job, not the corpus's.

Every seed is meant to be a valid program any loader should take. `_check` enforces what
follows from the ELF alone (a well-formed ELF64 executable whose segments agree with their
file data and whose entry is in executable code), and `build_seeds` boots every seed on a
reference kernel (the `fixed` build unless told otherwise), which must load it and enter user
mode, so a catalogue edit that would make a seed a crash reproducer fails here. Nothing about
one kernel's memory layout or allocator is written into this module: what a kernel reserves
is the kernel's to say when it boots the seed.

`write_seeds` regenerates the whole corpus; the output depends only on the templates, gcc,
binutils and LIEF (no timestamps, no paths of the build machine; the one seed with a build
ID has ld's SHA-1 of its contents).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lief

from corpus.toolchain import (
    Layout,
    OutputSection,
    SegmentPlan,
    Toolchain,
    ToolchainError,
    versions,
)
from kernel_emu.elflayout import (
    ELF64_EHDR,
    ELF64_PHDR_SIZE,
    ELFCLASS64,
    ELFDATA2LSB,
    EM_X86_64,
    ET_EXEC,
    PF_R,
    PF_W,
    PF_X,
    PT_LOAD,
)
from kernel_emu.elfview import read_elf

SEED_DIR = Path(__file__).parent / "seeds"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1

PAGE = 0x1000

# the kernel every seed must load cleanly on (a target profile name or file)
REFERENCE_KERNEL = "fixed"

Edit = Callable[[lief.ELF.Binary], None]
RawEdit = Callable[[bytes], bytes]


class SeedError(RuntimeError):
    """A seed of the catalogue does not come out as the catalogue says."""


@dataclass(frozen=True)
class SeedSpec:
    name: str
    description: str
    layout: Layout
    edits: tuple[Edit, ...] = ()
    # applied to the bytes LIEF wrote, for changes LIEF keeps from making
    raw_edits: tuple[RawEdit, ...] = ()
    # PT_LOADs the edits add to those of the layout
    added_loads: int = 0


@dataclass(frozen=True)
class SeedInfo:
    """One manifest entry."""

    file: str
    sha256: str
    size: int
    loads: int
    phnum: int
    entry: str
    description: str


# ------------------------------------------------------------------------------------------
# LIEF edits


def _loads(binary: lief.ELF.Binary) -> list[lief.ELF.Segment]:
    return [s for s in binary.segments if s.type == lief.ELF.Segment.TYPE.LOAD]


def entry_at_symbol(symbol: str) -> Edit:
    def edit(binary: lief.ELF.Binary) -> None:
        binary.header.entrypoint = binary.get_symbol(symbol).value

    return edit


def set_alignments(*aligns: int) -> Edit:
    """p_align of the PT_LOADs in order; the last value repeats for the rest."""

    def edit(binary: lief.ELF.Binary) -> None:
        for index, segment in enumerate(_loads(binary)):
            segment.alignment = aligns[min(index, len(aligns) - 1)]

    return edit


def set_memsz(index: int, memsz: int) -> Edit:
    def edit(binary: lief.ELF.Binary) -> None:
        _loads(binary)[index].virtual_size = memsz

    return edit


def gnu_stack_to_empty_load(vaddr: int) -> Edit:
    """Turns PT_GNU_STACK into a PT_LOAD with p_filesz = p_memsz = 0."""

    def edit(binary: lief.ELF.Binary) -> None:
        stack = next(s for s in binary.segments if s.type == lief.ELF.Segment.TYPE.GNU_STACK)
        stack.type = lief.ELF.Segment.TYPE.LOAD
        stack.flags = lief.ELF.Segment.FLAGS.R
        stack.file_offset = 0
        stack.virtual_address = vaddr
        stack.physical_address = vaddr
        stack.physical_size = 0
        stack.virtual_size = 0
        stack.alignment = PAGE

    return edit


# pause; jmp back to the pause
_SPIN = bytes([0xF3, 0x90, 0xEB, 0xFC])


def add_code_segment(vaddr: int) -> Edit:
    """Appends a new R+X PT_LOAD through LIEF and enters there. LIEF moves the program
    header table to make room, so the seed also has e_phoff far from 64 and a PT_LOAD that
    maps the relocated table."""

    def edit(binary: lief.ELF.Binary) -> None:
        segment = lief.ELF.Segment()
        segment.type = lief.ELF.Segment.TYPE.LOAD
        segment.flags = lief.ELF.Segment.FLAGS.R | lief.ELF.Segment.FLAGS.X
        segment.alignment = PAGE
        segment.virtual_address = vaddr
        code = _SPIN + bytes(0x3C)
        segment.content = list(code)
        added = binary.add(segment)
        # LIEF sizes the new segment to a whole page; only the code is meant to be in it
        added.physical_size = added.virtual_size = len(code)
        binary.header.entrypoint = added.virtual_address

    return edit


def drop_section_headers(data: bytes) -> bytes:
    """No section header table, and the file ends where the last segment's bytes end."""
    view = read_elf(data)
    end = view.phdr_offset(view.phnum)
    for ph in view.program_headers:
        end = max(end, ph.offset + ph.filesz)
    out = bytearray(data[:end])
    for name in ("e_shoff", "e_shnum", "e_shstrndx"):
        ELF64_EHDR[name].write(out, 0)
    return bytes(out)


# ------------------------------------------------------------------------------------------
# layouts

TEXT = OutputSection(".text", "*(.text.start) *(.text .text.*) *(.far.text)")
NEAR_TEXT = OutputSection(".text", "*(.text.start) *(.text .text.*)")
FAR_TEXT = OutputSection(".far.text", "*(.far.text)")
RODATA = OutputSection(".rodata", "*(.rodata .rodata.*)")
DATA = OutputSection(".data", "*(.data .data.*)")
BSS = OutputSection(".bss", "*(.bss .bss.*) *(COMMON)", nobits=True)

RX = PF_R | PF_X
RW = PF_R | PF_W
RWX = PF_R | PF_W | PF_X


def basic_segments(loads: int) -> tuple[SegmentPlan, ...]:
    """The shapes of a small gcc program with 1 to 4 PT_LOADs."""
    if loads == 1:
        return (SegmentPlan(RWX, (TEXT, RODATA, DATA, BSS)),)
    if loads == 2:
        return (SegmentPlan(RX, (TEXT, RODATA)), SegmentPlan(RW, (DATA, BSS)))
    if loads == 3:
        return (SegmentPlan(RX, (TEXT,)), SegmentPlan(PF_R, (RODATA,)),
                SegmentPlan(RW, (DATA, BSS)))
    if loads == 4:
        return (SegmentPlan(RX, (TEXT,)), SegmentPlan(PF_R, (RODATA,)),
                SegmentPlan(RW, (DATA,)), SegmentPlan(RW, (BSS,)))
    raise ValueError(f"basic layouts have 1 to 4 segments, not {loads}")


_BLOB_FLAGS = (RX, PF_R, RW, RW)


def blob_segment(index: int) -> SegmentPlan:
    """The segment of blob `index`, whose kind cycles as templates/blobs.S describes."""
    kind = index % 4
    sections: list[OutputSection] = []
    if kind != 3:
        sections.append(OutputSection(f".blob.{index}", f"*(.blob.{index})"))
    if kind in (2, 3):
        sections.append(OutputSection(f".blob.{index}.bss", f"*(.blob.{index}.bss)",
                                      nobits=True))
    return SegmentPlan(_BLOB_FLAGS[kind], tuple(sections))


def many_segments(loads: int) -> tuple[SegmentPlan, ...]:
    """Text, rodata, `loads - 3` blob segments, then data + BSS. The C program's BSS goes
    last because its 32-byte alignment would break the packing of a segment after it."""
    if loads < 4:
        raise ValueError("layouts with blobs need at least 4 segments")
    blobs = tuple(blob_segment(i) for i in range(loads - 3))
    return (SegmentPlan(RX, (TEXT,)), SegmentPlan(PF_R, (RODATA,)), *blobs,
            SegmentPlan(RW, (DATA, BSS)))


def many(loads: int, **options: Any) -> Layout:
    return Layout(segments=many_segments(loads), blobs=loads - 3, **options)


def basic(loads: int, **options: Any) -> Layout:
    return Layout(segments=basic_segments(loads), **options)


def _page_sized(size: int) -> Layout:
    """Text, data and BSS segments of `size` bytes each, starting on page boundaries."""
    return Layout(
        segments=(SegmentPlan(RX, (TEXT, RODATA), file_size=size),
                  SegmentPlan(RW, (DATA,), file_size=size),
                  SegmentPlan(RW, (BSS,))),
        init_bss=size,
    )


def catalogue() -> list[SeedSpec]:
    """Every seed, in manifest order."""
    seeds: list[SeedSpec] = []

    def add(name: str, description: str, layout: Layout, *edits: Edit,
            raw: tuple[RawEdit, ...] = (), added_loads: int = 0) -> None:
        seeds.append(SeedSpec(name, description, layout, edits, raw, added_loads))

    # how many PT_LOADs
    add("loads-01-rwx", "one RWX PT_LOAD holding headers, text, rodata, data and BSS",
        basic(1))
    add("loads-01-phnum1", "one RWX PT_LOAD and no other program header (e_phnum 1)",
        basic(1, gnu_stack=False))
    add("loads-02", "text+rodata (R-X) and data+BSS (RW-), the usual static layout",
        basic(2))
    add("loads-02-no-bss", "text+rodata and data, no BSS anywhere (p_memsz = p_filesz)",
        basic(2, init_bss=0))
    add("loads-03", "text, rodata and data+BSS in three PT_LOADs", basic(3))
    add("loads-04-bss-alone", "four PT_LOADs, the last one BSS only (p_filesz 0)", basic(4))
    for loads in (6, 8, 12, 16, 17, 20):
        add(f"loads-{loads:02d}",
            f"{loads} PT_LOADs cycling code, rodata, data+BSS and BSS-only segments",
            many(loads))

    # entry points
    add("entry-mid-text", "entry moved by LIEF to a function in the middle of .text",
        basic(2), entry_at_symbol("init_main"))
    add("entry-second-code-segment", "entry in a second R-X PT_LOAD after the rodata",
        Layout(segments=(SegmentPlan(RX, (NEAR_TEXT,)), SegmentPlan(PF_R, (RODATA,)),
                         SegmentPlan(RX, (FAR_TEXT,)), SegmentPlan(RW, (DATA, BSS))),
               entry="far_entry"))
    add("entry-page-end", "entry 4 bytes before the end of the first page, which is where "
        "the text segment ends (p_filesz 0x1000)",
        Layout(segments=(SegmentPlan(RX, (NEAR_TEXT, RODATA,
                                          OutputSection(".far.text", "*(.far.text)",
                                                        at=0x400FFC))),
                         SegmentPlan(RW, (DATA, BSS))),
               entry="far_entry"))
    add("entry-last-segment", "12 PT_LOADs, entry in the code blob of the 11th",
        many(12, entry="blob_code_8"))

    # alignments
    add("align-2m", "p_align 0x200000, segments 2 MiB apart",
        basic(3, step=0x200000, max_page_size=0x200000))
    add("align-64k", "p_align 0x10000, segments 64 KiB apart",
        basic(4, step=0x10000, max_page_size=0x10000))
    add("align-8", "p_align 8 on page-separated segments", basic(3), set_alignments(8))
    add("align-1", "one RWX PT_LOAD with p_align 1", basic(1), set_alignments(1))
    add("align-packed-16", "segments packed back to back, sharing pages (the kernel gives "
        "a shared page the rights of both), p_align 0x10",
        basic(3, step=None, max_page_size=0x10), set_alignments(0x10))
    add("align-mixed", "packed segments with p_align 0x200000, 0x1000, 0x10 and 1",
        basic(4, step=None, max_page_size=0x10), set_alignments(0x200000, PAGE, 0x10, 1))

    # sizes at page boundaries
    add("page-exact", "text, data and BSS segments of exactly one page each",
        _page_sized(PAGE))
    add("page-minus-one", "text, data and BSS segments of 0xfff bytes", _page_sized(PAGE - 1))
    add("page-plus-one", "text, data and BSS segments of 0x1001 bytes, one byte into a "
        "second page", _page_sized(PAGE + 1))
    add("bss-crosses-page", "data ends 8 bytes before a page boundary, BSS runs 8 bytes past "
        "it (p_filesz 0xff8, p_memsz 0x1008)",
        Layout(segments=(SegmentPlan(RX, (TEXT, RODATA), file_size=PAGE),
                         SegmentPlan(RW, (DATA,), file_size=PAGE - 8),
                         SegmentPlan(RW, (BSS,)))),
        set_memsz(1, PAGE + 8))
    add("segment-straddles-page", "an 8-byte data segment in the last 8 bytes of a page, "
        "its 8 bytes of BSS in the next",
        Layout(segments=(SegmentPlan(RX, (TEXT, RODATA), file_size=PAGE - 8),
                         SegmentPlan(RW, (DATA, BSS))),
               init_bss=8))
    add("bss-1m", "1 MiB of BSS behind a few bytes of data", basic(2, init_bss=0x10_0000))
    add("bss-tiny", "a BSS-only PT_LOAD of 1 byte", basic(4), set_memsz(3, 1))


    # where the segments are
    add("base-low", "segments at 0x10000, below the kernel image", basic(2, base=0x1_0000))
    add("base-above-4g", "segments above 4 GiB", basic(3, base=0x1_0000_0000))
    add("base-high-user", "segments near the top of the user half, below the user stack",
        basic(3, base=0x7FFF_0000_0000))
    add("segments-far-apart", "data+BSS 64 TiB above the text",
        Layout(segments=(SegmentPlan(RX, (TEXT, RODATA)),
                         SegmentPlan(RW, (DATA, BSS), region=0x4000_0000_0000))))

    # more program headers and file shapes
    add("phdr-note", "PT_PHDR and PT_NOTE besides the PT_LOADs",
        basic(2, phdr=True, note=True))
    add("gnu-notes", "a PT_NOTE as glibc static programs have it: the GNU ABI tag and a SHA-1 "
        "build ID, then a vendor note", basic(2, note=True, gnu_notes=True))
    add("empty-load", "a PT_LOAD with p_filesz = p_memsz = 0 (LIEF turned PT_GNU_STACK "
        "into it)", basic(2), gnu_stack_to_empty_load(0x90_0000), added_loads=1)
    add("lief-added-segment", "LIEF added a code segment and entered it, moving the "
        "program header table into a PT_LOAD of its own; no section headers", basic(2),
        add_code_segment(0x80_0000), raw=(drop_section_headers,), added_loads=2)
    add("no-section-headers", "no section header table; the file ends with the last "
        "segment's bytes", basic(3), raw=(drop_section_headers,))
    return seeds


# ------------------------------------------------------------------------------------------
# building


def _finish(spec: SeedSpec, linked: bytes) -> bytes:
    binary = lief.ELF.parse(linked)
    if binary is None:
        raise SeedError(f"{spec.name}: LIEF cannot parse what gcc linked")
    for edit in spec.edits:
        edit(binary)
    # the symbols were only needed by the edits
    binary.strip()
    binary.remove_section(".strtab", clear=True)
    data = bytes(binary.write_to_bytes())
    for raw_edit in spec.raw_edits:
        data = raw_edit(data)
    return data


def build_seed(spec: SeedSpec, toolchain: Toolchain) -> bytes:
    data = _finish(spec, toolchain.link(spec.layout))
    _check(spec, data)
    return data


def _check(spec: SeedSpec, data: bytes) -> None:
    """What a seed must satisfy as an ELF file, before any kernel sees it."""

    def fail(why: str) -> SeedError:
        return SeedError(f"{spec.name}: {why}")

    view = read_elf(data)
    if not view.is_elf or view.elf_class != ELFCLASS64 or view.data != ELFDATA2LSB:
        raise fail("not a little-endian ELF64 file")
    if (view.e_type, view.machine, view.phentsize) != (ET_EXEC, EM_X86_64, ELF64_PHDR_SIZE):
        raise fail("not an x86-64 ET_EXEC with 56-byte program headers")
    phdrs = view.program_headers
    if len(phdrs) != view.phnum:
        raise fail("the program header table runs past the end of the file")
    entry = view.entry
    loads = [p for p in phdrs if p.p_type == PT_LOAD]
    want = spec.layout.loads + spec.added_loads
    if len(loads) != want:
        raise fail(f"{len(loads)} PT_LOADs, the catalogue expects {want}")
    for index, load in enumerate(loads):
        offset, vaddr, filesz, memsz, align = (load.offset, load.vaddr, load.filesz,
                                               load.memsz, load.align)
        where = f"PT_LOAD {index}"
        if align == 0:
            raise fail(f"{where}: p_align 0 (the seed build takes a remainder by it)")
        if align > 1 and vaddr % align != offset % align:
            raise fail(f"{where}: p_vaddr and p_offset disagree modulo p_align")
        if filesz > memsz or offset + filesz > len(data):
            raise fail(f"{where}: p_filesz above p_memsz or past the end of the file")
        if vaddr + memsz > 1 << 47:
            raise fail(f"{where}: reaches past the lower half of the address space")
    if not any(p.flags & PF_X and p.vaddr <= entry < p.vaddr + p.memsz for p in loads):
        raise fail(f"entry {entry:#x} is not inside an executable PT_LOAD")


def check_loads(built: Sequence[tuple[SeedInfo, bytes]],
                kernel: str = REFERENCE_KERNEL) -> None:
    """Boots every seed on `kernel` (a target profile): each must load and enter user mode."""
    from kernel_emu.errors import HarnessError
    from kernel_emu.executor import Executor
    from kernel_emu.profile import load_profile

    try:
        executor = Executor(load_profile(kernel))
    except HarnessError as e:
        raise SeedError(f"cannot boot the seeds on {kernel}: {e}") from e
    for info, data in built:
        result = executor.run(data)
        if result.verdict != "ok":
            why = result.signature or f"rejected: {result.reject_reason}"
            raise SeedError(f"{info.file}: does not load cleanly on {kernel} ({why})")


def seed_info(spec: SeedSpec, data: bytes) -> SeedInfo:
    view = read_elf(data)
    phdrs = view.program_headers
    entry = view.entry
    return SeedInfo(
        file=f"{spec.name}.elf",
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        loads=sum(1 for p in phdrs if p.p_type == PT_LOAD),
        phnum=len(phdrs),
        entry=f"{entry:#x}",
        description=spec.description,
    )


def build_seeds(specs: Sequence[SeedSpec] | None = None,
                kernel: str | None = REFERENCE_KERNEL) -> list[tuple[SeedInfo, bytes]]:
    """Every seed of the catalogue (or of `specs`) with its manifest entry, in memory, each
    checked to load cleanly on `kernel` (None: not booted)."""
    specs = catalogue() if specs is None else specs
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise SeedError("two seeds share a name")
    with Toolchain() as toolchain:
        out = []
        for spec in specs:
            data = build_seed(spec, toolchain)
            out.append((seed_info(spec, data), data))
    if kernel is not None:
        check_loads(out, kernel)
    return out


@dataclass(frozen=True)
class Manifest:
    """What manifest.json holds: the seeds, and the tools that made them (the bytes are only
    reproducible with the same ones)."""

    seeds: list[SeedInfo]
    toolchain: dict[str, str]
    format: int = MANIFEST_FORMAT

    def to_json(self) -> dict[str, Any]:
        return {"format": self.format, "toolchain": self.toolchain,
                "seeds": [asdict(info) for info in self.seeds]}


def toolchain_versions() -> dict[str, str]:
    return {**versions(), "lief": str(lief.__version__)}


def read_manifest(seed_dir: Path = SEED_DIR) -> Manifest:
    path = seed_dir / MANIFEST
    raw = json.loads(path.read_text())
    if not isinstance(raw, dict) or raw.get("format") != MANIFEST_FORMAT:
        raise SeedError(f"{path}: not a format {MANIFEST_FORMAT} seed manifest")
    return Manifest(seeds=[SeedInfo(**entry) for entry in raw["seeds"]],
                    toolchain=dict(raw.get("toolchain", {})))


def write_seeds(out_dir: Path = SEED_DIR) -> list[SeedInfo]:
    """(Re)generates every seed into `out_dir` with its manifest.json. Seeds an earlier
    manifest there listed but the catalogue no longer has are removed; other files are
    left alone."""
    built = build_seeds()
    out_dir.mkdir(parents=True, exist_ok=True)
    previous: list[SeedInfo] = []
    if (out_dir / MANIFEST).is_file():
        try:
            previous = read_manifest(out_dir).seeds
        except (ValueError, KeyError, TypeError, SeedError):
            previous = []
    for info, data in built:
        (out_dir / info.file).write_bytes(data)
    current = {info.file for info, _ in built}
    for old in previous:
        # only ever a plain name inside out_dir, whatever an old manifest says
        stale = out_dir / Path(old.file).name
        if old.file not in current and stale.suffix == ".elf" and stale.is_file():
            stale.unlink()
    seeds = [info for info, _ in built]
    manifest = Manifest(seeds=seeds, toolchain=toolchain_versions())
    (out_dir / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    return seeds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fuzzfarm seeds",
        description="Regenerate the seed corpus (gcc-built ELFs edited with LIEF) and its "
                    "manifest.json.")
    parser.add_argument("--out", type=Path, default=SEED_DIR,
                        help="directory to write the seeds to (default: the package's "
                             "corpus/seeds)")
    args = parser.parse_args(argv)
    out: Path = args.out
    if out.exists() and not out.is_dir():
        print(f"error: {out} exists and is not a directory", file=sys.stderr)
        return 2
    try:
        infos = write_seeds(out)
    except ToolchainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write seeds to {out}: {e.strerror or e}", file=sys.stderr)
        return 2
    except SeedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    total = sum(info.size for info in infos)
    print(f"wrote {len(infos)} seeds ({total} bytes) and {MANIFEST} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
