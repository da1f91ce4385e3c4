"""Loads a UEFI application (PE32+, x86-64) as a firmware does: the headers and every
section copied into one image-sized block at a base of the firmware's choosing, the rest
zero, and the base relocations applied for the distance from the preferred ImageBase.

Headers and sections are read with LIEF; the relocation blocks are read here, from the loaded
bytes, so that a malformed table is refused with a message instead of half applied.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lief

from kernel_emu.errors import ImageError

# LIEF's own warnings about odd headers would go to stderr; this loader reports what matters
lief.logging.disable()

PAGE = 0x1000
U64 = (1 << 64) - 1
# IMAGE_REL_BASED_*
REL_ABSOLUTE, REL_HIGHLOW, REL_DIR64 = 0, 3, 10
# IMAGE_SCN_MEM_*
SCN_EXECUTE, SCN_READ, SCN_WRITE = 0x2000_0000, 0x4000_0000, 0x8000_0000


@dataclass(frozen=True)
class ImageSegment:
    """A loaded part of a kernel image: an ELF PT_LOAD, or a PE's headers or one of its
    sections. Flags as ELF's p_flags: R=4, W=2, X=1."""

    vaddr: int
    memsz: int
    data: bytes
    flags: int

    @property
    def end(self) -> int:
        return self.vaddr + self.memsz


# (start, end, saved rbp, return address): where a function keeps the caller's rbp and its
# return address, as offsets from its own rbp (see unwind_entries)
UnwindEntry = tuple[int, int, int, int]
UWOP_PUSH_NONVOL, UWOP_ALLOC_LARGE, UWOP_ALLOC_SMALL, UWOP_SET_FPREG = 0, 1, 2, 3
UNW_FLAG_CHAININFO = 4
RBP = 5
# extra 16-bit slots each unwind code takes (UWOP_ALLOC_LARGE: by its info)
_SLOTS = {4: 1, 5: 2, 8: 1, 9: 2}


@dataclass(frozen=True)
class LoadedPe:
    base: int
    preferred_base: int
    size: int  # SizeOfImage
    entry: int
    segments: tuple[ImageSegment, ...]
    relocations: int  # how many were applied
    unwind: tuple[UnwindEntry, ...] = ()


class FrameLayouts:
    """Unwind entries looked up by address: where the function at an address keeps its
    caller's rbp and its return address, as offsets from its rbp. With no entries, every
    function follows the System V chain ([rbp] the caller's rbp, [rbp + 8] the return)."""

    SYSTEM_V = (0, 8)

    def __init__(self, entries: Sequence[UnwindEntry] = ()) -> None:
        self.entries = tuple(entries)
        self._starts = [e[0] for e in self.entries]

    def __bool__(self) -> bool:
        return bool(self.entries)

    def at(self, pc: int) -> tuple[int, int] | None:
        """The layout of the function running at `pc` (None: a function without an rbp
        frame, or no function the tables know)."""
        if not self.entries:
            return self.SYSTEM_V
        i = bisect.bisect_right(self._starts, pc) - 1
        if i >= 0 and pc < self.entries[i][1]:
            return self.entries[i][2], self.entries[i][3]
        return None


def _frame_layout(image: bytes, info: int) -> tuple[int, int] | None:
    """For the UNWIND_INFO at `info`: (saved rbp, return address) as offsets from rbp once
    the prolog has run, when the function keeps rbp as its frame pointer; else None.

    The Microsoft x64 prolog pushes nonvolatile registers, allocates its frame, then sets
    rbp = rsp + 16 * FrameOffset: the return address lies above the pushes and the frame."""
    for _ in range(8):  # chained entries point at their parent's info
        if info + 4 > len(image):
            return None
        flags, _prolog, count, frame = image[info] >> 3, image[info + 1], image[info + 2], \
            image[info + 3]
        codes = info + 4
        if codes + 2 * count > len(image):
            return None
        if frame & 0xF != RBP:
            if flags & UNW_FLAG_CHAININFO:
                at = codes + 2 * (count + (count & 1))
                if at + 12 > len(image):
                    return None
                info = struct.unpack_from("<I", image, at + 8)[0]
                continue
            return None
        pushes: list[int] = []  # in the order the prolog pushes them
        alloc = 0
        i = 0
        while i < count:
            op, op_info = image[codes + 2 * i + 1] & 0xF, image[codes + 2 * i + 1] >> 4
            if op == UWOP_PUSH_NONVOL:
                pushes.insert(0, op_info)
            elif op == UWOP_ALLOC_SMALL:
                alloc += op_info * 8 + 8
            elif op == UWOP_ALLOC_LARGE:
                if op_info == 0:
                    alloc += struct.unpack_from("<H", image, codes + 2 * i + 2)[0] * 8
                    i += 1
                else:
                    alloc += struct.unpack_from("<I", image, codes + 2 * i + 2)[0]
                    i += 2
            elif op != UWOP_SET_FPREG:
                i += _SLOTS.get(op, 0)
                if op not in _SLOTS:
                    return None  # a machine frame or an unknown code: no simple layout
            i += 1
        if RBP not in pushes:
            return None
        above_frame = alloc - 16 * (frame >> 4)  # rbp up to the pushes
        saved_rbp = above_frame + 8 * (len(pushes) - 1 - pushes.index(RBP))
        return saved_rbp, above_frame + 8 * len(pushes)
    return None


def unwind_entries(image: bytes, base: int, pdata: int, size: int) -> tuple[UnwindEntry, ...]:
    """The frame layouts of the functions the exception directory (.pdata) lists."""
    entries: list[UnwindEntry] = []
    for at in range(pdata, min(pdata + size, len(image)) - 11, 12):
        start, end, info = struct.unpack_from("<III", image, at)
        if not start < end <= len(image):
            continue
        layout = _frame_layout(image, info & ~1)
        if layout is not None:
            entries.append((base + start, base + end, *layout))
    entries.sort()
    # keep them disjoint, as the tracer wants them
    return tuple(e for i, e in enumerate(entries) if i == 0 or e[0] >= entries[i - 1][1])


def _flags(characteristics: int) -> int:
    return ((4 if characteristics & SCN_READ else 0) | (2 if characteristics & SCN_WRITE else 0)
            | (1 if characteristics & SCN_EXECUTE else 0))


def apply_relocations(image: bytearray, table: bytes, delta: int) -> int:
    """Apply the base relocation blocks in `table` to `image`; returns how many were applied."""
    applied = 0
    at = 0
    while at + 8 <= len(table):
        page, block = struct.unpack_from("<II", table, at)
        if block == 0 and page == 0:
            break  # padding at the end of the table
        if block < 8 or block % 2 or at + block > len(table):
            raise ImageError(f"base relocation block at {at:#x} has a bad size {block:#x}")
        for (entry,) in struct.iter_unpack("<H", table[at + 8:at + block]):
            kind, where = entry >> 12, page + (entry & 0xFFF)
            if kind == REL_ABSOLUTE:
                continue
            width = {REL_DIR64: 8, REL_HIGHLOW: 4}.get(kind)
            if width is None:
                raise ImageError(f"base relocation of type {kind} at {where:#x} is not one an "
                                 f"x86-64 image uses")
            if where + width > len(image):
                raise ImageError(f"base relocation at {where:#x} lies outside the image")
            fmt = "<Q" if width == 8 else "<I"
            (value,) = struct.unpack_from(fmt, image, where)
            struct.pack_into(fmt, image, where, (value + delta) & ((1 << (8 * width)) - 1))
            applied += 1
        at += block
    return applied


def load_pe(raw: bytes, path: Path, base: int | None = None) -> LoadedPe:
    binary = lief.PE.parse(list(raw)) if raw[:2] == b"MZ" else None
    if binary is None or binary.header.machine != lief.PE.Header.MACHINE_TYPES.AMD64 or \
            binary.optional_header.magic != lief.PE.PE_TYPE.PE32_PLUS:
        raise ImageError(f"{path}: not an x86-64 PE32+ image")
    header = binary.optional_header
    preferred, size = header.imagebase, header.sizeof_image
    base = preferred if base is None else base
    if base % PAGE or not 0 < size <= 1 << 30 or base + size > U64:
        raise ImageError(f"{path}: cannot load {size:#x} bytes at {base:#x}")
    if len(raw) < header.sizeof_headers or \
            len(binary.sections) != binary.header.numberof_sections or not binary.sections:
        raise ImageError(f"{path}: truncated or without sections: {len(raw)} bytes, "
                         f"{len(binary.sections)} of {binary.header.numberof_sections} "
                         f"sections readable")
    image = bytearray(size)
    headers = min(header.sizeof_headers, size, len(raw))
    image[:headers] = raw[:headers]
    sections = []
    for section in binary.sections:
        start, length = section.virtual_address, section.virtual_size
        if section.pointerto_raw_data + section.sizeof_raw_data > len(raw):
            raise ImageError(f"{path}: truncated: a section's data lies past the end of the "
                             f"file ({len(raw)} bytes)")
        data = bytes(section.content)[:length]
        if start + max(length, len(data)) > size:
            name = section.name if isinstance(section.name, str) else \
                bytes(section.name).decode(errors="replace")
            raise ImageError(f"{path}: section {name} lies outside SizeOfImage")
        image[start:start + len(data)] = data
        sections.append((start, length, _flags(section.characteristics)))
    relocations = 0
    directory = binary.data_directory(lief.PE.DataDirectory.TYPES.BASE_RELOCATION_TABLE)
    if directory is not None and directory.size and base != preferred:
        rva, length = directory.rva, directory.size
        if rva + length > size:
            raise ImageError(f"{path}: the base relocation table lies outside the image")
        relocations = apply_relocations(image, bytes(image[rva:rva + length]),
                                        (base - preferred) & U64)
    elif base != preferred and int(binary.header.characteristics) & \
            int(lief.PE.Header.CHARACTERISTICS.RELOCS_STRIPPED):
        raise ImageError(f"{path}: relocations stripped, so it loads only at {preferred:#x}")
    # each part as large as it is (sections may share a page: a loader copies the image as one
    # block, and padding a part to its page would clear the next one's first bytes)
    segments = [ImageSegment(base, headers, bytes(image[:headers]), 4)]
    for start, length, flags in sections:
        if length:
            segments.append(ImageSegment(base + start, length,
                                      bytes(image[start:start + length]), flags))
    exceptions = binary.data_directory(lief.PE.DataDirectory.TYPES.EXCEPTION_TABLE)
    unwind = unwind_entries(bytes(image), base, exceptions.rva, exceptions.size) \
        if exceptions is not None and exceptions.size else ()
    return LoadedPe(base, preferred, size, base + header.addressof_entrypoint,
                    tuple(segments), relocations, unwind)
