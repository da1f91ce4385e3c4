"""Kernel images: loadable segments, entry point and symbols, read with LIEF."""

from __future__ import annotations

import bisect
import hashlib
import re
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path

import lief
import rust_demangler

from kernel_emu.errors import ImageError
from kernel_emu.linkmap import LinkMapError, read_link_map
from kernel_emu.peload import FrameLayouts, ImageSegment, UnwindEntry, load_pe

DESCRIBED_KEPT = 1 << 16
_HASH_SUFFIX = re.compile(r"::h[0-9a-f]{16}$")
_CRATE_DISAMBIGUATOR = re.compile(r"\[[0-9a-f]+\]")


@dataclass(frozen=True)
class Symbol:
    address: int
    size: int
    mangled: str
    name: str  # demangled, hash suffix dropped


def clean_rust_name(demangled: str) -> str:
    """Drop what varies between builds: the legacy `::h<hash>` suffix and v0 crate hashes."""
    return _CRATE_DISAMBIGUATOR.sub("", _HASH_SUFFIX.sub("", demangled))


_LLVM_SUFFIX = re.compile(r"(\.llvm\.[0-9A-Za-z]+|\.\d+)+$")


def demangle(name: str) -> str:
    """A Rust symbol (legacy `_ZN…E` or v0 `_R…`) demangled by a pinned library, so that a
    signature is the same on every machine; any other name, or one the library cannot read,
    as it is."""
    base = _LLVM_SUFFIX.sub("", name)
    if not base.startswith(("_ZN", "_R")):
        return name
    try:
        return str(rust_demangler.demangle(base))
    except Exception:  # noqa: BLE001 - the library raises many kinds on names it cannot read
        return name


class KernelImage:
    """An amd64 kernel image with a UEFI-style entry: a static ELF, loaded at its link
    addresses, or a UEFI application (PE32+), loaded as a firmware loads one at `load_base`
    (default: its preferred ImageBase) with its base relocations applied and its symbols read
    from the link map beside it (`<image>.map`)."""

    def __init__(self, path: Path, load_base: int | None = None, symbols: bool = True) -> None:
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise ImageError(f"cannot read kernel image {path}: {e.strerror}") from e
        self.path = path
        self.sha256 = hashlib.sha256(raw).hexdigest()
        self.load_base: int | None = None  # where a PE image was loaded
        # a PE's frame layouts, for walking its Microsoft x64 frames (an ELF: the rbp chain)
        self.unwind: tuple[UnwindEntry, ...] = ()
        if raw[:2] == b"MZ":
            self._load_pe(raw, load_base, symbols)
        else:
            self._load_elf(raw)
        self._index()

    def _load_elf(self, raw: bytes) -> None:
        path = self.path
        binary = lief.ELF.parse(list(raw)) if raw[:4] == b"\x7fELF" else None
        if binary is None or binary.header.machine_type != lief.ELF.ARCH.X86_64:
            raise ImageError(f"{path}: not an x86-64 ELF kernel image")
        self.entry = binary.header.entrypoint
        self.segments = tuple(
            ImageSegment(
                vaddr=seg.virtual_address,
                memsz=seg.virtual_size,
                data=bytes(seg.content),
                flags=int(seg.flags),
            )
            for seg in binary.segments
            if seg.type == lief.ELF.Segment.TYPE.LOAD and seg.virtual_size
        )
        if not self.segments:
            raise ImageError(f"{path}: no loadable segments")
        raw_syms = [
            s for s in binary.symtab_symbols
            if s.name and s.value and s.type in (lief.ELF.Symbol.TYPE.FUNC,
                                                  lief.ELF.Symbol.TYPE.OBJECT,
                                                  lief.ELF.Symbol.TYPE.NOTYPE)
        ]
        syms = [
            Symbol(address=s.value, size=s.size, mangled=name,
                   name=clean_rust_name(demangle(name)))
            for s in raw_syms
            for name in (s.name if isinstance(s.name, str) else s.name.decode(errors="replace"),)
        ]
        self.symbols = sorted(syms, key=lambda s: s.address)

    def _load_pe(self, raw: bytes, load_base: int | None, symbols: bool) -> None:
        loaded = load_pe(raw, self.path, load_base)
        self.entry, self.segments, self.load_base = loaded.entry, loaded.segments, loaded.base
        self.unwind = loaded.unwind
        self.symbols = []
        if not symbols:  # an application of someone else's: run without names
            return
        map_path = self.path.with_suffix(".map")
        try:
            mapped = read_link_map(map_path)
        except LinkMapError as e:
            raise ImageError(f"{self.path.name}: a UEFI image's symbols come from its link "
                             f"map: {e}") from None
        self.symbols = sorted((Symbol(address=loaded.base + m.rva, size=m.size,
                                      mangled=m.name, name=clean_rust_name(demangle(m.name)))
                               for m in mapped), key=lambda s: s.address)

    def frame_layout(self, pc: int) -> tuple[int, int] | None:
        """Where the function running at `pc` keeps its caller's rbp and its return address,
        as offsets from its rbp: (0, 8) for the System V chain of an ELF image; by the unwind
        tables for a PE image (None for a function without an rbp frame)."""
        return self._layouts.at(pc)

    def _index(self) -> None:
        self._layouts = FrameLayouts(self.unwind)
        self._addresses = [s.address for s in self.symbols]
        self._by_name: dict[str, Symbol] = {}
        self._described: dict[int, str] = {}  # describe()'s answers: hangs ask for ~64 a run
        for sym in self.symbols:
            self._by_name.setdefault(sym.name, sym)
            self._by_name.setdefault(sym.mangled, sym)

    # the segments never change after loading; the oracles ask these on every run
    @cached_property
    def start(self) -> int:
        return min(s.vaddr for s in self.segments)

    @cached_property
    def end(self) -> int:
        return max(s.end for s in self.segments)

    @cached_property
    def text_ranges(self) -> tuple[tuple[int, int], ...]:
        return tuple((s.vaddr, s.end) for s in self.segments if s.flags & 1)

    def bytes_at(self, start: int, size: int) -> bytes | None:
        """Up to `size` bytes of the image from `start` (fewer at the end of its part); None
        when no part of the image holds `start`."""
        seg = next((s for s in self.segments if s.vaddr <= start < s.end), None)
        if seg is None:
            return None
        return bytes(seg.data[start - seg.vaddr:start - seg.vaddr + size])

    def symbol(self, name: str) -> Symbol:
        try:
            return self._by_name[name]
        except KeyError:
            raise ImageError(f"{self.path.name}: no symbol '{name}'") from None

    def find_symbol(self, name: str) -> Symbol | None:
        return self._by_name.get(name)

    def function_at(self, address: int) -> Symbol | None:
        i = bisect.bisect_right(self._addresses, address) - 1
        while i >= 0:
            sym = self.symbols[i]
            if sym.address <= address < sym.address + max(sym.size, 1):
                return sym
            if sym.size:
                return None
            i -= 1
        return None

    @property
    def remembered_descriptions(self) -> int:
        """How many answers of `describe` are kept (at most DESCRIBED_KEPT)."""
        return len(self._described)

    def forget_descriptions(self) -> None:
        self._described.clear()

    def describe(self, address: int, *, return_address: bool = False) -> str:
        """`name+0x1f`, or the raw address when no symbol covers it. A return address is
        looked up one byte back: a call that never returns may be a function's last
        instruction, and its return address the start of the next function."""
        key = address | 1 << 64 if return_address else address  # addresses fit in 64 bits
        text = self._described.get(key)
        if text is None:
            if len(self._described) >= DESCRIBED_KEPT:
                self._described.clear()
            sym = self.function_at(address - 1 if return_address else address)
            off = address - sym.address if sym is not None else 0
            text = (f"{address:#x}" if sym is None else
                    f"{sym.name}+{off:#x}" if off else sym.name)
            self._described[key] = text
        return text


@cache
def load_image(path: Path, load_base: int | None = None) -> KernelImage:
    return KernelImage(path, load_base)
