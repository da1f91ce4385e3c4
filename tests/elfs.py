"""Small real ELFs built with gcc for tests, and a parser for what `readelf -lW` says of them.

The programs never run: the farm stops at the kernel's ring-3 entry, so `_start` only has to
exist and keep the const data, initialised data and BSS from being thrown away.

A linker script with an explicit PHDRS block fixes the number of PT_LOAD entries:
  1 load:  everything in one RWX segment (headers, text, rodata, data, bss)
  2 loads: headers + text + rodata (R E), data + bss (RW)
  3 loads: headers + text (R E), rodata (R), data + bss (RW)
  4 loads: headers + text (R E), rodata (R), data (RW), bss alone (RW, filesz 0)
With PHDRS the linker emits only the listed headers, so a PT_GNU_STACK (RW) entry is listed
too, as a non-LOAD header for readers to skip.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from kernel_emu.elflayout import PF_R, PF_W, PF_X

BASE_ADDRESS = 0x400000
PAGE_SIZE = 0x1000
DEFAULT_DATA = b"rustux farm test data\x00"

# Segment names per load count, and which one each output section goes into.
_LAYOUTS: dict[int, tuple[list[tuple[str, int]], dict[str, str]]] = {
    1: (
        [("all", PF_R | PF_W | PF_X)],
        {"text": "all", "rodata": "all", "data": "all", "bss": "all"},
    ),
    2: (
        [("text", PF_R | PF_X), ("data", PF_R | PF_W)],
        {"text": "text", "rodata": "text", "data": "data", "bss": "data"},
    ),
    3: (
        [("text", PF_R | PF_X), ("rodata", PF_R), ("data", PF_R | PF_W)],
        {"text": "text", "rodata": "rodata", "data": "data", "bss": "data"},
    ),
    4: (
        [("text", PF_R | PF_X), ("rodata", PF_R), ("data", PF_R | PF_W),
         ("bss", PF_R | PF_W)],
        {"text": "text", "rodata": "rodata", "data": "data", "bss": "bss"},
    ),
}

_SECTION_INPUTS = {
    "text": "*(.text.start) *(.text .text.*)",
    "rodata": "*(.rodata .rodata.*)",
    "data": "*(.data .data.*)",
    "bss": "*(.bss .bss.*) *(COMMON)",
}

_CFLAGS = [
    "-static", "-nostdlib", "-no-pie", "-fno-pic", "-ffreestanding", "-O1",
    "-fno-asynchronous-unwind-tables", "-fno-unwind-tables", "-fno-stack-protector",
    "-fcf-protection=none",
    "-Wl,--build-id=none", "-z", "noexecstack", "-Wl,-z,norelro",
    f"-Wl,-z,max-page-size={PAGE_SIZE:#x}", f"-Wl,-z,common-page-size={PAGE_SIZE:#x}",
]

_LOAD_LINE = re.compile(
    r"^\s*LOAD\s+(0x[0-9a-fA-F]+)\s+(0x[0-9a-fA-F]+)\s+(0x[0-9a-fA-F]+)"
    r"\s+(0x[0-9a-fA-F]+)\s+(0x[0-9a-fA-F]+)\s+([RWE ]+?)\s+(0x[0-9a-fA-F]+)\s*$"
)

_cache: dict[tuple[int, int, int, bytes], bytes] = {}


class ToolMissingError(RuntimeError):
    """gcc or readelf is not installed."""


def tools_available() -> bool:
    return shutil.which("gcc") is not None and shutil.which("readelf") is not None


def _linker_script(loads: int) -> str:
    segments, placement = _LAYOUTS[loads]
    phdrs = []
    for index, (name, flags) in enumerate(segments):
        # The first segment maps the ELF header and the phdr table, like ld's default layout.
        headers = " FILEHDR PHDRS" if index == 0 else ""
        phdrs.append(f"  {name} PT_LOAD{headers} FLAGS({flags});")
    phdrs.append(f"  stack PT_GNU_STACK FLAGS({PF_R | PF_W});")

    sections = [f"  . = {BASE_ADDRESS:#x} + SIZEOF_HEADERS;"]
    previous = ""
    for section in ("text", "rodata", "data", "bss"):
        segment = placement[section]
        if previous and segment != previous:
            # A fresh page per segment keeps two segments from sharing a page, which would
            # otherwise give both the same file page with different permissions.
            sections.append(f"  . = ALIGN({PAGE_SIZE:#x});")
        sections.append(f"  .{section} : {{ {_SECTION_INPUTS[section]} }} :{segment}")
        previous = segment
    sections.append("  /DISCARD/ : { *(.comment) *(.note .note.*) *(.eh_frame*) }")
    return (
        "ENTRY(_start)\n"
        "PHDRS\n{\n" + "\n".join(phdrs) + "\n}\n"
        "SECTIONS\n{\n" + "\n".join(sections) + "\n}\n"
    )


def _c_source(bss: int, text_pad: int, data: bytes) -> str:
    lines = [
        "static const char message[] __attribute__((used)) =",
        '    "rustux test init: this program is never run";',
    ]
    if data:
        body = ", ".join(str(byte) for byte in data)
        lines.append(
            f"unsigned char init_data[{len(data)}] __attribute__((used)) = {{ {body} }};"
        )
    if bss:
        lines.append(f"static unsigned char bss_area[{bss}] __attribute__((used));")
    if text_pad:
        # Padding goes after _start (its own input section sorts first) so the entry point
        # stays at the start of the text.
        lines.append(
            '__asm__(".pushsection .text.pad, \\"ax\\", @progbits\\n"'
            f'        ".fill {text_pad}, 1, 0xcc\\n"'
            '        ".popsection");'
        )
    refs = ['"r"(message)']
    if data:
        refs.append('"r"(init_data)')
    if bss:
        refs.append('"r"(bss_area)')
    lines += [
        '__attribute__((noreturn, section(".text.start"))) void _start(void)',
        "{",
        "    for (;;) {",
        f'        __asm__ volatile("" : : {", ".join(refs)} : "memory");',
        "    }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def _check_no_empty_segment(loads: int, bss: int, payload: bytes) -> None:
    # ld still emits a PHDRS entry with no sections, but as a LOAD at vaddr 0 whose offset is
    # wherever the file ended, which is not a layout any test means to describe.
    nonempty = {"text": True, "rodata": True, "data": bool(payload), "bss": bss > 0}
    segments, placement = _LAYOUTS[loads]
    for segment, _flags in segments:
        if not any(nonempty[section] for section, home in placement.items() if home == segment):
            raise ValueError(f"with loads={loads} the {segment} segment would be empty; "
                             "give it data or bss")


def _compile(work: Path, loads: int, bss: int, text_pad: int, data: bytes) -> bytes:
    if not tools_available():
        raise ToolMissingError("gcc and readelf are needed to build test ELFs")
    source = work / "init.c"
    script = work / "link.ld"
    output = work / "init.elf"
    source.write_text(_c_source(bss, text_pad, data))
    script.write_text(_linker_script(loads))
    result = subprocess.run(
        ["gcc", *_CFLAGS, "-T", str(script), "-o", str(output), str(source)],
        capture_output=True, text=True, check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"gcc failed ({result.returncode}):\n{result.stderr}")
    return output.read_bytes()


def build_elf(
    tmp_dir: Path,
    *,
    loads: int,
    bss: int = 0x2000,
    text_pad: int = 0,
    data: bytes | None = None,
    name: str = "t",
) -> Path:
    """Write a static gcc-built ELF with exactly `loads` PT_LOADs to tmp_dir/name.

    Each distinct (loads, bss, text_pad, data) is compiled once per process; later calls only
    write the cached bytes. `data` is the initialised .data payload (DEFAULT_DATA when None,
    no .data contents when empty). ValueError when a segment would be left with no sections
    (e.g. loads=4 with bss=0).
    """
    if loads not in _LAYOUTS:
        raise ValueError(f"loads must be 1 to 4, not {loads}")
    if bss < 0 or text_pad < 0:
        raise ValueError("bss and text_pad must not be negative")
    payload = DEFAULT_DATA if data is None else bytes(data)
    _check_no_empty_segment(loads, bss, payload)
    key = (loads, bss, text_pad, payload)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    image = _cache.get(key)
    if image is None:
        work = tmp_dir / f".{name}.build"
        work.mkdir(exist_ok=True)
        image = _compile(work, loads, bss, text_pad, payload)
        _cache[key] = image
    path = tmp_dir / name
    path.write_bytes(image)
    return path


def _flags_from_readelf(text: str) -> int:
    flags = 0
    if "R" in text:
        flags |= PF_R
    if "W" in text:
        flags |= PF_W
    if "E" in text:
        flags |= PF_X
    return flags


def readelf_loads(path: Path) -> list[dict[str, int]]:
    """PT_LOAD entries as `readelf -lW` prints them, with flags encoded as in p_flags."""
    if shutil.which("readelf") is None:
        raise ToolMissingError("readelf is needed to inspect test ELFs")
    result = subprocess.run(
        ["readelf", "-lW", str(path)], capture_output=True, text=True, check=True
    )
    loads: list[dict[str, int]] = []
    for line in result.stdout.splitlines():
        match = _LOAD_LINE.match(line)
        if match is None:
            continue
        offset, vaddr, _paddr, filesz, memsz, flags, _align = match.groups()
        loads.append({
            "vaddr": int(vaddr, 16),
            "memsz": int(memsz, 16),
            "filesz": int(filesz, 16),
            "offset": int(offset, 16),
            "flags": _flags_from_readelf(flags),
        })
    return loads


def build_static_program(tmp_dir: Path, name: str = "hello") -> Path:
    """A plain C program linked by gcc with `-static` against the C library, as anyone would
    build one: gcc's own program headers (on x86-64 Debian 12: four PT_LOADs among ten, the
    data segment not page-aligned). ToolMissingError when gcc or a static libc is missing."""
    if not tools_available():
        raise ToolMissingError("gcc and readelf are needed to build test ELFs")
    tmp_dir.mkdir(parents=True, exist_ok=True)
    source = tmp_dir / f"{name}.c"
    source.write_text('#include <stdio.h>\nint main(void) { puts("hello"); return 0; }\n')
    output = tmp_dir / name
    result = subprocess.run(["gcc", "-static", "-O1", "-o", str(output), str(source)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ToolMissingError(f"gcc -static failed (is libc6-dev installed?): "
                               f"{result.stderr.strip()[:200]}")
    return output
