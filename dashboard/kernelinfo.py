"""What the dashboard reads out of a kernel image: code around an address, source lines from
DWARF, and the basic blocks of every function.

Images are fetched from Redis by sha256 (the exact bytes a report was produced on, even if the
build was replaced since) and kept in the dashboard's cache directory.
"""

from __future__ import annotations

import bisect
import io
import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import capstone
import lief
from elftools.common.exceptions import ELFError
from elftools.dwarf.dwarfinfo import DebugSectionDescriptor, DwarfConfig, DWARFInfo
from elftools.elf.elffile import ELFFile

from kernel_emu.image import KernelImage, load_image
from workers.paths import SHA256, private_dir
from workers.store import FarmStore, sha256

GUEST = Path(__file__).parents[1] / "kernel_emu" / "guest"
MANIFEST = Path(__file__).parents[1] / "kernel_emu" / "images" / "manifest.json"
# a function larger than this is not swept: no function of a kernel this size comes close, so
# a bigger "function" is a symbol whose size is wrong
MAX_FUNCTION = 256 * 1024
# where the ±N instructions shown around a pc start when no symbol says where its function
# begins: x86 decoding resynchronises within a few instructions
UNKNOWN_START_BACK = 96
# after these, the next instruction starts a new basic block
BLOCK_ENDERS = ("ret", "jmp", "ud2", "hlt", "iretq", "iret", "sysret", "sysretq", "int3",
                "call", "syscall")
_RUSTC_PREFIX = re.compile(r"^/rustc/[0-9a-f]{40}/")

_md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)


def image_for(store: FarmStore, image_sha: str, cache_dir: Path,
              load_base: int | None = None) -> KernelImage | None:
    """The kernel image with this sha256 (a PE image loaded at `load_base`, where the report
    says it ran), from the cache or Redis; None if Redis lacks it. A cached copy is hashed
    each time: one changed since it was written is fetched again. A UEFI image comes with
    the files stored with it: its link map (symbols) and DWARF companion (source lines)."""
    if not SHA256.match(image_sha):
        return None
    folder = private_dir(cache_dir) / "dashboard" / "images"
    path = folder / f"{image_sha}.image"
    data = _cached_blob(store, path, image_sha)
    if data is None:
        return None
    if data[:2] == b"MZ":
        # named as the image loader and line_table look for them: beside the image
        files = store.kernels.image_files(image_sha)
        for what, suffix in (("map", ".map"), ("debug", ".debug")):
            sha = files.get(what, "")
            if SHA256.match(sha):
                _cached_blob(store, path.with_suffix(suffix), sha)
    try:
        return load_image(path, load_base)
    except Exception:  # noqa: BLE001 - a blob that is no kernel image is shown as missing
        return None


def _cached_blob(store: FarmStore, path: Path, sha: str) -> bytes | None:
    """The blob `sha`, kept at `path`: the cached copy when it still has that hash, else
    fetched from Redis again (None when Redis lacks it)."""
    try:
        data = path.read_bytes()
        if sha256(data) == sha:
            return data
    except OSError:
        pass
    data = store.blobs.get(sha)
    if data is None or sha256(data) != sha:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return data


# source lines -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Line:
    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


class LineTable:
    """Address → source line from .debug_line (None for addresses it does not cover)."""

    def __init__(self, rows: list[tuple[int, Line | None]], present: bool) -> None:
        rows.sort(key=lambda r: r[0])
        self._addrs = [a for a, _ in rows]
        self._lines = [line for _, line in rows]
        self.present = present

    def lookup(self, address: int) -> Line | None:
        i = bisect.bisect_right(self._addrs, address) - 1
        return self._lines[i] if i >= 0 else None


def _file_name(header: object, version: int, index: int) -> str:
    entries = header["file_entry"]  # type: ignore[index]
    dirs = header["include_directory"]  # type: ignore[index]
    # DWARF 5 numbers files and directories from 0, earlier versions from 1 (0: the CU's own)
    pos = index if version >= 5 else index - 1
    if not 0 <= pos < len(entries):
        return "?"
    entry = entries[pos]
    name = entry.name.decode(errors="replace")
    d = entry.dir_index if version >= 5 else entry.dir_index - 1
    folder = dirs[d].decode(errors="replace") if 0 <= d < len(dirs) else ""
    full = f"{folder}/{name}" if folder and not name.startswith("/") else name
    # the toolchain's own sources are named by the rustc commit: it says nothing here
    return _RUSTC_PREFIX.sub("", full)


def image_lines(image: KernelImage) -> LineTable:
    """The image's line table, at the addresses where the image was loaded."""
    return line_table(image.path, image.load_base)


@lru_cache(maxsize=4)
def line_table(path: Path, load_base: int | None = None) -> LineTable:
    """From the ELF image's own .debug_line, or for a PE image (which carries none) from the
    DWARF companion the build wrote beside it (`<image>.debug`: the same link with
    /DEBUG:DWARF, never loaded), moved to `load_base`."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"MZ":
            return _pe_line_table(path.with_suffix(".debug"), load_base)
        elf = ELFFile(io.BytesIO(raw))
        if not elf.has_dwarf_info() or elf.get_section_by_name(".debug_line") is None:
            return LineTable([], False)
        return LineTable(_line_rows(elf.get_dwarf_info(), 0, 0), True)
    except (OSError, ELFError, KeyError, IndexError, ValueError):
        return LineTable([], False)


def _pe_line_table(debug: Path, load_base: int | None) -> LineTable:
    binary = lief.PE.parse(str(debug)) if debug.is_file() else None
    if binary is None:
        return LineTable([], False)
    sections = {}
    for section in binary.sections:
        # long section names ("/4") are offsets into the COFF string table
        long_name = section.coff_string
        name = long_name.string if long_name is not None else section.name
        if name.startswith(".debug_"):
            data = bytes(section.content)[:section.virtual_size]  # without the file padding
            sections[name[len(".debug_"):]] = DebugSectionDescriptor(
                io.BytesIO(data), name, None, len(data), 0)
    if "line" not in sections or "info" not in sections:
        return LineTable([], False)
    names = ("info", "aranges", "abbrev", "frame", "eh_frame", "str", "loc", "ranges", "line",
             "pubtypes", "pubnames", "addr", "str_offsets", "line_str", "loclists", "rnglists",
             "sup", "gnu_debugaltlink", "types")
    dwarf = DWARFInfo(DwarfConfig(little_endian=True, machine_arch="x64",
                                  default_address_size=8),
                      *[None if n in ("frame", "eh_frame") else sections.get(n) for n in names])
    preferred = binary.optional_header.imagebase
    shift = 0 if load_base is None else load_base - preferred
    # code the linker dropped keeps its address 0: below the image base
    return LineTable(_line_rows(dwarf, shift, preferred), True)


def _line_rows(dwarf: DWARFInfo, shift: int, lowest: int) -> list[tuple[int, Line | None]]:
    rows: list[tuple[int, Line | None]] = []
    for cu in dwarf.iter_CUs():
        program = dwarf.line_program_for_CU(cu)
        if program is None:
            continue
        version = program.header["version"]
        names: dict[int, str] = {}
        sequence: list[tuple[int, Line | None]] = []
        for entry in program.get_entries():
            state = entry.state
            if state is None:
                continue
            if state.end_sequence:
                if sequence and sequence[0][0] >= lowest + shift:
                    rows += sequence
                    rows.append((state.address + shift, None))
                sequence = []
                continue
            name = names.get(state.file)
            if name is None:
                name = names[state.file] = _file_name(program.header, version, state.file)
            # line 0: code the compiler made up, belonging to no source line
            sequence.append((state.address + shift,
                             Line(name, state.line) if state.line else None))
    return rows


def bundled_image(image_sha: str) -> bool:
    """True for the images this checkout's guest sources built (their source lines can be
    shown; a user's own build may come from other sources)."""
    try:
        manifest = json.loads(MANIFEST.read_text())
    except (OSError, ValueError):
        return False
    return any(isinstance(v, dict) and v.get("sha256") == image_sha for v in manifest.values())


@lru_cache(maxsize=64)
def _source_file(name: str) -> list[str] | None:
    root = GUEST.resolve()
    path = (GUEST / name).resolve()
    # the name comes from DWARF: never read outside the guest sources
    if not path.is_relative_to(root) or not path.is_file():
        return None
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return None


def source_text(image_sha: str, line: Line | None) -> str | None:
    if line is None or not bundled_image(image_sha):
        return None
    lines = _source_file(line.file)
    if lines is None or not 1 <= line.line <= len(lines):
        return None
    return lines[line.line - 1].strip()


# code ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Insn:
    address: int
    size: int
    mnemonic: str
    operands: str
    raw: str
    where: str
    line: Line | None
    current: bool = False

    @property
    def text(self) -> str:
        return f"{self.mnemonic} {self.operands}".strip()


def code_at(image: KernelImage, start: int, end: int) -> bytes:
    """The image's bytes in [start, end) of the executable segment holding `start`."""
    seg = next((s for s in image.segments if s.flags & 1 and s.vaddr <= start < s.end), None)
    if seg is None:
        return b""
    lo = start - seg.vaddr
    return seg.data[lo:max(lo, min(end, seg.end) - seg.vaddr)]


def _sweep(image: KernelImage, start: int, end: int) -> list[tuple[int, int, str, str, bytes]]:
    code = code_at(image, start, end)
    out = []
    offset = 0
    for address, size, mnemonic, operands in _md.disasm_lite(code, start):
        out.append((address, size, mnemonic, operands, code[offset:offset + size]))
        offset += size
    return out


def disassemble_around(image: KernelImage, pc: int, before: int = 8,
                       after: int = 8) -> tuple[list[Insn], str | None]:
    """The instructions around `pc` and a note when their start had to be guessed."""
    table = image_lines(image)
    sym = image.function_at(pc)
    note = None
    if sym is not None and 0 <= pc - sym.address < MAX_FUNCTION:
        start = sym.address
    else:
        start = pc - UNKNOWN_START_BACK
        note = "no symbol covers this address: the instructions before it are a guess"
    rows = _sweep(image, start, pc + 16 * (after + 1))
    index = next((i for i, r in enumerate(rows) if r[0] == pc), None)
    if index is None:
        rows = _sweep(image, pc, pc + 16 * (after + 1))
        index = 0
        if not rows:
            return [], "no code of the image at this address"
        note = "the code before this address does not decode up to it: shown from the pc on"
    picked = rows[max(0, index - before):index + after + 1]
    return [Insn(a, s, m, o, b.hex(" "), image.describe(a), table.lookup(a), a == pc)
            for a, s, m, o, b in picked], note


@dataclass(frozen=True)
class Function:
    address: int
    size: int
    name: str
    blocks: tuple[int, ...]  # start address of each basic block, sorted

    @property
    def end(self) -> int:
        return self.address + self.size


def _func_addresses(path: Path) -> set[int] | None:
    """Addresses of STT_FUNC symbols (None: no symbol table to tell functions from data)."""
    try:
        elf = ELFFile(io.BytesIO(path.read_bytes()))
        symtab = elf.get_section_by_name(".symtab")
        if symtab is None:
            return None
        return {s["st_value"] for s in symtab.iter_symbols()
                if s["st_info"]["type"] == "STT_FUNC" and s["st_size"] > 0}
    except (OSError, ELFError):
        return None


def block_starts(image: KernelImage, address: int, size: int) -> tuple[int, ...]:
    """Basic-block leaders by a linear sweep: the entry, every jump target inside the
    function, and every instruction after a branch, call or return."""
    leaders = {address}
    end = address + size
    for a, s, mnemonic, operands, _ in _sweep(image, address, end):
        nxt = a + s
        if mnemonic.startswith("j") or mnemonic.startswith(("loop", "jrcxz")):
            try:
                target = int(operands, 16)
            except ValueError:
                target = None  # an indirect jump
            if target is not None and address <= target < end:
                leaders.add(target)
            if nxt < end:
                leaders.add(nxt)
        elif mnemonic in BLOCK_ENDERS and nxt < end:
            leaders.add(nxt)
    return tuple(sorted(leaders))


@lru_cache(maxsize=4)
def functions(image: KernelImage) -> list[Function]:
    funcs = _func_addresses(image.path)
    out: dict[int, Function] = {}
    for sym in image.symbols:
        if sym.size <= 0 or sym.size > MAX_FUNCTION or sym.address in out:
            continue
        if funcs is not None and sym.address not in funcs:
            continue
        if not code_at(image, sym.address, sym.address + 1):
            continue
        out[sym.address] = Function(sym.address, sym.size, sym.name,
                                    block_starts(image, sym.address, sym.size))
    return sorted(out.values(), key=lambda f: f.address)


def function_listing(image: KernelImage, func: Function) -> list[Insn]:
    table = image_lines(image)
    return [Insn(a, s, m, o, b.hex(" "), image.describe(a), table.lookup(a))
            for a, s, m, o, b in _sweep(image, func.address, func.end)]


def frame_address(image: KernelImage, frame: str) -> int | None:
    """The address a backtrace frame (`name+0x1f`, `name` or `0x1234`) stands for."""
    if frame.startswith("0x"):
        try:
            return int(frame, 16)
        except ValueError:
            return None
    name, _, offset = frame.rpartition("+0x") if "+0x" in frame else (frame, "", "0")
    sym = image.find_symbol(name)
    if sym is None:
        return None
    try:
        return sym.address + int(offset, 16)
    except ValueError:
        return None
