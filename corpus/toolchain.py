"""Compile the seed templates with gcc and link them with a generated linker script.

A `Layout` says which output sections go into which PT_LOAD and where each segment starts;
`link` turns it into a linker script with an explicit PHDRS block (so ld emits exactly those
program headers) and returns the linked, unstripped executable.

File size matters more than usual: seeds are fuzzing inputs, and every padding byte is a byte
the fuzzer wastes mutations on. So by default a segment starts on a fresh page *at the same
offset within the page as its first file byte*, the trick ld's own DATA_SEGMENT_ALIGN uses:
segments never share a page, yet the file stays packed because p_offset and p_vaddr stay
congruent modulo the page size without any gap in the file.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kernel_emu.elflayout import PF_R, PF_W

TEMPLATE_DIR = Path(__file__).parent / "templates"
INIT_SOURCE = "init.c"
BLOB_SOURCE = "blobs.S"

# Any address past 2 GiB is out of reach of the default code model's 32-bit absolute
# relocations, which the non-PIC template code uses for its data addresses.
_SMALL_MODEL_LIMIT = 0x8000_0000

_CFLAGS = (
    "-static", "-nostdlib", "-ffreestanding", "-no-pie", "-fno-pic", "-O1",
    "-fno-asynchronous-unwind-tables", "-fno-unwind-tables", "-fno-stack-protector",
    "-fcf-protection=none", "-fno-ident",
)
_LDFLAGS = (
    "-Wl,--build-id=none", "-Wl,-z,noexecstack", "-Wl,-z,norelro",
    "-Wl,--no-warn-rwx-segments", "-Wl,--orphan-handling=error",
)


class ToolchainError(RuntimeError):
    """gcc is missing, or it refused a template or a layout. str() is one line; `detail`
    holds everything gcc said."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


@dataclass(frozen=True)
class OutputSection:
    """One output section: `inputs` are ld input-section patterns."""

    name: str
    inputs: str
    # Move the location counter to this address first. Inside a segment the gap is filled
    # in the file, so this places code or data at an exact address.
    at: int | None = None
    # NOBITS sections must come last in their segment (ld would otherwise turn them into
    # file bytes).
    nobits: bool = False


@dataclass(frozen=True)
class SegmentPlan:
    """One PT_LOAD: its p_flags and its output sections, in address order."""

    flags: int
    sections: tuple[OutputSection, ...]
    # Pad the file-backed part so that p_filesz is exactly this.
    file_size: int | None = None
    # Start the segment in this region (plus the in-page offset of its file bytes) instead
    # of at the next `Layout.step` boundary.
    region: int | None = None


@dataclass(frozen=True)
class Layout:
    """How to link one seed: its PT_LOADs, where they go and which templates fill them."""

    segments: tuple[SegmentPlan, ...]
    base: int = 0x400000
    # Segments after the first start at the next multiple of `step` (keeping the file
    # offset's remainder); None packs them back to back, sharing pages.
    step: int | None = 0x1000
    max_page_size: int = 0x1000
    entry: str = "_start"  # a symbol of the templates
    init_bss: int = 0x2000  # INIT_BSS of templates/init.c
    blobs: int = 0  # BLOB_COUNT of templates/blobs.S (0: not linked in)
    gnu_stack: bool = True
    note: bool = False
    # the PT_NOTE also holds the notes a glibc static program carries: the GNU ABI tag and
    # a SHA-1 build ID (a hash of the file's contents, so the output stays reproducible)
    gnu_notes: bool = False
    phdr: bool = False

    @property
    def loads(self) -> int:
        return len(self.segments)


def gcc_available() -> bool:
    return shutil.which("gcc") is not None


def versions() -> dict[str, str]:
    """First line of `gcc --version` and `ld --version`: the seeds are byte-identical only
    between machines where these (and LIEF) agree."""
    out = {}
    for tool in ("gcc", "ld"):
        try:
            result = subprocess.run([tool, "--version"], capture_output=True, text=True,
                                    check=False)
        except FileNotFoundError:
            out[tool] = "missing"
            continue
        lines = result.stdout.splitlines()
        out[tool] = lines[0].strip() if lines else "unknown"
    return out


def _hexa(value: int) -> str:
    return f"{value:#x}"


def linker_script(layout: Layout) -> str:
    """The ld script for `layout`."""
    if not layout.segments:
        raise ValueError("a layout needs at least one segment")
    phdrs: list[str] = []
    if layout.phdr:
        phdrs.append(f"  phdr PT_PHDR PHDRS FLAGS({PF_R});")
    for index, segment in enumerate(layout.segments):
        headers = " FILEHDR PHDRS" if index == 0 else ""
        phdrs.append(f"  seg{index} PT_LOAD{headers} FLAGS({segment.flags});")
    if layout.note:
        phdrs.append(f"  note PT_NOTE FLAGS({PF_R});")
    if layout.gnu_stack:
        phdrs.append(f"  stack PT_GNU_STACK FLAGS({PF_R | PF_W});")

    body = [f"  . = {_hexa(layout.base)} + SIZEOF_HEADERS;"]
    # An expression whose value is congruent to the current file offset: "." until a
    # segment ends in BSS, which moves "." but not the file offset.
    anchor = "."
    for index, segment in enumerate(layout.segments):
        if index > 0:
            body.append(_segment_start(layout, segment, anchor))
        anchor = _segment_body(layout, index, segment, body, anchor)
    # ld synthesises the GOT and IPLT sections even when nothing uses them (they stay
    # empty without PIC or IFUNCs); they would otherwise be orphans
    body.append("  /DISCARD/ : { *(.comment) *(.note .note.*) *(.eh_frame*) *(.got .got.plt) "
                "*(.igot.plt) *(.iplt) *(.rela.*) }")
    return (
        f"ENTRY({layout.entry})\n"
        "PHDRS\n{\n" + "\n".join(phdrs) + "\n}\n"
        "SECTIONS\n{\n" + "\n".join(body) + "\n}\n"
    )


def _segment_start(layout: Layout, segment: SegmentPlan, anchor: str) -> str:
    if segment.region is not None:
        mask = (layout.step or layout.max_page_size) - 1
        return f"  . = {_hexa(segment.region)} + ({anchor} & {_hexa(mask)});"
    if layout.step is None:
        return "  /* packed: this segment starts where the previous one ended */"
    mask = _hexa(layout.step - 1)
    return f"  . = ALIGN({_hexa(layout.step)}) + ({anchor} & {mask});"


def _segment_body(layout: Layout, index: int, segment: SegmentPlan, body: list[str],
                  anchor: str) -> str:
    """Appends the segment's sections to `body`; returns the anchor for the next segment."""
    target = f":seg{index}"
    progbits = [s for s in segment.sections if not s.nobits]
    nobits = [s for s in segment.sections if s.nobits]
    if segment.sections != (*progbits, *nobits):
        raise ValueError(f"segment {index}: NOBITS sections must come last")
    if index == 0 and layout.note:
        gnu = " *(.note.ABI-tag) *(.note.gnu.build-id)" if layout.gnu_notes else ""
        body.append(f"  .note : {{{gnu} *(.note.rustux) }} {target} :note")
    for section in progbits:
        if section.at is not None:
            body.append(f"  . = {_hexa(section.at)};")
        body.append(f"  {section.name} : {{ {section.inputs} }} {target}")
    if segment.file_size is not None:
        if segment.file_size < 1:
            raise ValueError(f"segment {index}: file_size must be positive")
        # The segment's first byte: the ELF header for segment 0, else its first section.
        start = _hexa(layout.base) if index == 0 else f"ADDR({segment.sections[0].name})"
        body.append(f"  . = {start} + {_hexa(segment.file_size - 1)};")
        body.append(f"  .pad.seg{index} : {{ BYTE(0xcc) }} {target}")
    if index == 0 or progbits or segment.file_size is not None:
        anchor = f"__seed_file_end_{index}"
        body.append(f"  {anchor} = .;")
    for section in nobits:
        if section.at is not None:
            raise ValueError(f"segment {index}: a NOBITS section cannot be placed with `at`")
        body.append(f"  {section.name} : {{ {section.inputs} }} {target}")
    return anchor


def _run_gcc(args: list[str], cwd: Path) -> None:
    try:
        result = subprocess.run(["gcc", *args], cwd=cwd, capture_output=True, text=True,
                                check=False)
    except FileNotFoundError as e:
        raise ToolchainError("gcc not found: the seed templates are compiled with gcc") from e
    if result.returncode != 0:
        lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        first = next((line for line in lines if "error" in line), None)
        summary = first or (lines[0] if lines else f"exit status {result.returncode}")
        raise ToolchainError(f"gcc failed: {summary}", result.stderr)


class Toolchain:
    """Compiles the templates once per set of flags and links layouts against them, all in
    one private working directory (use it as a context manager)."""

    def __init__(self, template_dir: Path = TEMPLATE_DIR) -> None:
        if not gcc_available():
            raise ToolchainError("gcc not found: the seed templates are compiled with gcc")
        sources = {}
        for source in (INIT_SOURCE, BLOB_SOURCE):
            path = template_dir / source
            if not path.is_file():
                raise ToolchainError(f"template {path.name} is missing from {template_dir}")
            sources[source] = path.read_bytes()
        self._tmp = tempfile.TemporaryDirectory(prefix="seeds-")
        self._work = Path(self._tmp.name)
        self._objects: dict[tuple[str, tuple[str, ...]], str] = {}
        for source, text in sources.items():
            # Compiled under its bare name in the work directory, so that no path of this
            # machine ends up in the object files.
            (self._work / source).write_bytes(text)

    def __enter__(self) -> Toolchain:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._tmp.cleanup()

    def _object(self, source: str, flags: tuple[str, ...]) -> str:
        key = (source, flags)
        name = self._objects.get(key)
        if name is None:
            name = f"obj{len(self._objects)}.o"
            _run_gcc([*_CFLAGS, *flags, "-c", source, "-o", name], self._work)
            self._objects[key] = name
        return name

    def link(self, layout: Layout) -> bytes:
        """The executable for `layout`, symbols included (the caller strips them)."""
        flags: tuple[str, ...] = ()
        if _highest_address(layout) >= _SMALL_MODEL_LIMIT:
            flags = ("-mcmodel=large",)
        gnu = ("-DGNU_NOTES",) if layout.gnu_notes else ()
        objects = [self._object(INIT_SOURCE,
                                (*flags, *gnu, f"-DINIT_BSS={layout.init_bss:#x}"))]
        if layout.blobs:
            objects.append(self._object(BLOB_SOURCE, (f"-DBLOB_COUNT={layout.blobs}",)))
        script = self._work / "layout.ld"
        script.write_text(linker_script(layout))
        page = f"{layout.max_page_size:#x}"
        build_id = ("-Wl,--build-id=sha1",) if layout.gnu_notes else ()
        _run_gcc([*_CFLAGS, *flags, *_LDFLAGS, *build_id, f"-Wl,-z,max-page-size={page}",
                  f"-Wl,-z,common-page-size={page}", "-T", script.name, "-o", "init.elf",
                  *objects], self._work)
        return (self._work / "init.elf").read_bytes()


def _highest_address(layout: Layout) -> int:
    addresses = [layout.base]
    for segment in layout.segments:
        if segment.region is not None:
            addresses.append(segment.region)
        addresses += [s.at for s in segment.sections if s.at is not None]
    return max(addresses)
