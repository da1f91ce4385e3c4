"""Symbols of a PE image from the link map `lld-link /MAP` writes beside it.

A UEFI application carries no symbol table; the map does, for every public and static symbol
the linker placed: its section:offset, its name and its address at the preferred image base
(`Rva+Base`). Only the relative address (RVA) is kept, since the firmware loads the image
wherever it likes. Sizes are not in the map: a symbol is taken to reach the next symbol of
its section.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_HEADER = re.compile(r"^\s*Preferred load address is ([0-9A-Fa-f]+)\s*$")
_SECTION = re.compile(r"^\s*([0-9A-Fa-f]{4}):([0-9A-Fa-f]{8})\s+([0-9A-Fa-f]{8})H\s+(\S+)\s+"
                      r"(CODE|DATA)\s*$")
_SYMBOL = re.compile(r"^\s*([0-9A-Fa-f]{4}):([0-9A-Fa-f]{8})\s+(\S+)\s+([0-9A-Fa-f]{16})\s+"
                     r"(?:f\s+)?(?:i\s+)?(\S+)?\s*$")


class LinkMapError(ValueError):
    """Not a link map lld-link wrote."""


@dataclass(frozen=True)
class MapSymbol:
    rva: int
    size: int  # to the next symbol of its section (or the section's end)
    name: str  # as linked (mangled)
    code: bool  # in a CODE section


def read_link_map(path: Path) -> list[MapSymbol]:
    """The symbols of the map at `path`, by address; LinkMapError if it is not one."""
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        raise LinkMapError(f"cannot read link map {path}: {e.strerror}") from e
    return parse_link_map(text, str(path))


def parse_link_map(text: str, origin: str = "link map") -> list[MapSymbol]:
    base: int | None = None
    sections: dict[int, tuple[int, int, bool]] = {}  # number -> (start offset, end, code)
    raw: list[tuple[int, int, int, str]] = []  # (section, offset, rva, name)
    part = "header"
    for line in text.splitlines():
        if part == "header":
            m = _HEADER.match(line)
            if m:
                base = int(m.group(1), 16)
            if line.strip().startswith("Start") and "Class" in line:
                part = "sections"
            continue
        if line.strip().startswith("Address") and "Publics by Value" in line:
            part = "symbols"
            continue
        if part == "sections":
            m = _SECTION.match(line)
            if m:
                number, offset, length = (int(m.group(i), 16) for i in (1, 2, 3))
                start, end, code = sections.get(number, (offset, offset, False))
                sections[number] = (min(start, offset), max(end, offset + length),
                                    code or m.group(5) == "CODE")
            continue
        m = _SYMBOL.match(line)
        if m and base is not None:
            number, offset, address = int(m.group(1), 16), int(m.group(2), 16), \
                int(m.group(4), 16)
            if number == 0 or address < base:
                continue  # linker-defined absolutes such as __ImageBase
            raw.append((number, offset, address - base, m.group(3)))
    if base is None or not sections or not raw:
        raise LinkMapError(f"{origin}: not a link map written by lld-link /MAP")
    raw.sort(key=lambda r: (r[0], r[1], r[3]))
    symbols = []
    next_offset: dict[int, int] = {}  # section -> offset of the next symbol further on
    for number, offset, rva, name in reversed(raw):
        _start, end, code = sections.get(number, (0, offset, False))
        size = next_offset.get(number, max(end, offset)) - offset
        symbols.append(MapSymbol(rva, size, name, code))
        if next_offset.get(number, offset + 1) > offset:
            next_offset[number] = offset
    symbols.sort(key=lambda s: (s.rva, s.name))
    return symbols
