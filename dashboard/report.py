"""What the bucket page shows of one Result: the kernel log with the lines that matter marked,
the reproducer's ELF headers with the disagreeing fields marked, segments side by side and a
picture of the heap. Everything here is data for templates, which escape it.

A Result comes from Redis and an ELF from the fuzzer: both are read defensively (a missing or
mistyped field shows as absent, never as an error page).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from kernel_emu.elfview import PT_LOAD, describe_header, read_elf

SEG_FIELDS = ("vaddr", "memsz", "filesz", "offset", "flags")
LOG_LINES_SHOWN = 3000
PHDRS_SHOWN = 64
HEAP_BLOCKS_SHOWN = 256
_SEG_LINE = re.compile(r"^\[elf\] seg (\d+) (.*)$")
_SEG_VALUE = re.compile(r"(\w+)=(0x[0-9a-fA-F]+)")
_COUNT_LINE = re.compile(r"^\[elf\] segments count=(\d+)")
_FIELD = re.compile(r"^segments\[(\d+)\]\.(\w+)$")
_HEX = re.compile(r"0x[0-9a-fA-F]+")


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


@dataclass
class FindingView:
    number: int
    cls: str
    evidence: list[str]
    frames: list[str]
    field: str | None
    pc: int | None
    signature: str


def findings(report: dict[str, Any]) -> list[FindingView]:
    out = []
    for i, f in enumerate(_dicts(report.get("findings")), 1):
        out.append(FindingView(
            i, str(f.get("class", "?")),
            [str(e) for e in f.get("evidence", []) if isinstance(e, str)]
            if isinstance(f.get("evidence"), list) else [],
            [str(x) for x in f.get("frames", []) if isinstance(x, str)]
            if isinstance(f.get("frames"), list) else [],
            f["field"] if isinstance(f.get("field"), str) else None,
            _int(f.get("pc")), str(f.get("signature", ""))))
    return out


def field_marks(found: list[FindingView]) -> dict[str, list[int]]:
    """Field name → numbers of the findings that name it."""
    marks: dict[str, list[int]] = {}
    for f in found:
        if f.field:
            marks.setdefault(f.field, []).append(f.number)
    return marks


# the kernel log -------------------------------------------------------------------------------

@dataclass
class LogLine:
    number: int
    text: str
    reasons: list[str] = field(default_factory=list)

    @property
    def marked(self) -> bool:
        return bool(self.reasons)


def mark_log(report: dict[str, Any]) -> tuple[list[LogLine], int]:
    """The log's lines with why each matters; and how many lines were left out."""
    text = report.get("log") if isinstance(report.get("log"), str) else ""
    expected = _dicts(report.get("expected_segments"))
    classes = {f.cls for f in findings(report)}
    lines = text.splitlines()
    out = []
    for n, line in enumerate(lines[:LOG_LINES_SHOWN], 1):
        entry = LogLine(n, line)
        if m := _SEG_LINE.match(line):
            index = int(m.group(1))
            got = {k: int(v, 16) for k, v in _SEG_VALUE.findall(m.group(2))}
            want = expected[index] if index < len(expected) else None
            if want is None:
                entry.reasons.append(f"the ELF has no PT_LOAD segment {index}")
            else:
                for key in SEG_FIELDS:
                    if key in got and _int(want.get(key)) is not None and got[key] != want[key]:
                        entry.reasons.append(f"{key}: ELF says {want[key]:#x}")
        elif m := _COUNT_LINE.match(line):
            if int(m.group(1)) != len(expected):
                entry.reasons.append(f"the ELF has {len(expected)} PT_LOAD segments")
        elif line.startswith("rejected: "):
            entry.reasons.append("the kernel rejected the input")
        elif line.startswith("[PANIC]"):
            entry.reasons.append("kernel panic")
        elif line.startswith("[user] enter") and "bad-entry" in classes:
            entry.reasons.append("entry to user mode (see bad-entry)")
        out.append(entry)
    return out, max(0, len(lines) - LOG_LINES_SHOWN)


# segments and ELF headers -----------------------------------------------------------------------

@dataclass
class Cell:
    text: str
    marks: list[int] = field(default_factory=list)  # finding numbers
    differs: bool = False


def segment_rows(report: dict[str, Any], marks: dict[str, list[int]]) -> list[dict[str, Any]]:
    """Per index: expected and loaded values of each field."""
    expected = _dicts(report.get("expected_segments"))
    loaded = _dicts(report.get("segments"))
    rows = []
    for i in range(max(len(expected), len(loaded))):
        want = expected[i] if i < len(expected) else {}
        got = loaded[i] if i < len(loaded) else {}
        cells = []
        for key in SEG_FIELDS:
            w, g = _int(want.get(key)), _int(got.get(key))
            differs = w is not None and g is not None and w != g
            cells.append((key,
                          Cell("—" if w is None else f"{w:#x}"),
                          Cell("—" if g is None else f"{g:#x}",
                               marks.get(f"segments[{i}].{key}", []), differs)))
        rows.append({"index": i, "cells": cells, "missing": not want or not got})
    return rows


@dataclass
class ElfTables:
    header: list[tuple[str, Cell]]
    columns: list[str]
    rows: list[dict[str, Any]]
    hidden: int
    problems: list[str]
    size: int


# a table that is not the ELF's ("segments") is the program header table as a whole
_HEADER_MARKS = {"phoff": ("segments",), "phnum": ("segments",),
                 "phentsize": ("segments",), "entry": ("entry.rip",)}
PHDR_COLUMNS = ("type", "flags", "offset", "vaddr", "paddr", "filesz", "memsz", "align")


def elf_tables(data: bytes, marks: dict[str, list[int]]) -> ElfTables:
    """The ELF header and program headers as elfview reads them. A finding's field
    `segments[i].key` is the i-th PT_LOAD entry's `key` (the kernel numbers only those)."""
    view = read_elf(data)
    header = []
    for name, value in describe_header(view):
        nums = [n for f in _HEADER_MARKS.get(name, ()) for n in marks.get(f, [])]
        header.append((name, Cell(value, nums)))
    rows = []
    load_index = 0
    for ph in view.program_headers[:PHDRS_SHOWN]:
        load = ph.p_type == PT_LOAD
        cells = {}
        for col in PHDR_COLUMNS:
            value = ph.type_name if col == "type" else f"{getattr(ph, col):#x}"
            nums = marks.get(f"segments[{load_index}].{col}", []) if load else []
            cells[col] = Cell(value, nums)
        rows.append({"index": ph.index, "load": load_index if load else None, "cells": cells})
        load_index += load
    return ElfTables(header, list(PHDR_COLUMNS), rows,
                     max(0, len(view.program_headers) - PHDRS_SHOWN), list(view.problems),
                     len(data))


# the heap ------------------------------------------------------------------------------------

@dataclass
class HeapBox:
    x: int
    y: int
    width: int
    addr: str
    size: str
    state: str  # used, free, bad-magic
    marks: list[int]


@dataclass
class HeapPicture:
    boxes: list[HeapBox]
    width: int
    height: int
    row_height: int
    hidden: int


def heap_picture(report: dict[str, Any], found: list[FindingView],
                 width: int = 960) -> HeapPicture | None:
    """Heap blocks in address order as boxes whose width grows with log2 of the block size
    (a linear scale would leave the small blocks next to a 16 MiB one invisible). A block an
    address in a heap finding's evidence falls into is marked with that finding."""
    blocks = _dicts(report.get("heap_blocks"))
    if not blocks:
        return None
    addresses = [(f.number, int(h, 16)) for f in found if f.cls == "heap-corruption"
                 for e in f.evidence for h in _HEX.findall(e)]
    boxes = []
    x = y = 0
    row = 44
    for b in blocks[:HEAP_BLOCKS_SHOWN]:
        addr, size = _int(b.get("addr")), _int(b.get("size"))
        if addr is None or size is None:
            continue
        payload = _int(b.get("payload")) or addr
        w = int(min(width, 56 + 9 * math.log2(size + 1)))
        if x + w > width and x > 0:
            x, y = 0, y + row
        state = "bad-magic" if b.get("magic_ok") is False else (
            "free" if b.get("free") else "used")
        end = payload + size
        nums = sorted({n for n, a in addresses if addr <= a < max(end, addr + 1)})
        boxes.append(HeapBox(x, y, w - 4, f"{addr:#x}", f"{size:#x}", state, nums))
        x += w
    return HeapPicture(boxes, width, y + row, row - 6, max(0, len(blocks) - HEAP_BLOCKS_SHOWN))


def registers(report: dict[str, Any]) -> list[tuple[str, str]]:
    regs = report.get("registers")
    if not isinstance(regs, dict):
        return []
    return [(str(k), f"{v:#018x}") for k, v in regs.items() if _int(v) is not None]
