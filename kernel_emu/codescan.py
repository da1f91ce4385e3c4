"""What the emulator looks for in the kernel image's code before the first run: the return
instructions of the allocator (where an allocation's result is read), the bulk moves of the
memory routines and the string writes to a port (which the native tracer may perform in one
step)."""

from __future__ import annotations

import capstone

from kernel_emu.errors import HarnessError
from kernel_emu.image import KernelImage
from kernel_emu.tracing import BulkSite

# routines whose long loops are progress (every iteration moves on through memory)
BULK_ROUTINES = ("memset", "memcpy", "memmove")
# the instructions of those routines the native tracer may fast-forward, as encoded (REP,
# REX.W and the opcode, no segment or address-size override)
BULK_ENCODINGS = {b"\xf3\x48\xab": "stosq", b"\xf3\x48\xa5": "movsq"}
# a string written to a port in one instruction (REP OUTSB, 64-bit addressing): wherever the
# kernel has one, as a log routine inlined into its callers would
PORT_STRING = b"\xf3\x6e"

_md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)


def return_sites(image: KernelImage, start: int, size: int) -> tuple[int, ...]:
    """The addresses of the `ret` instructions of the function at [start, start + size)."""
    code = image.bytes_at(start, size)
    if code is None or size <= 0:
        raise HarnessError(f"allocator symbol at {start:#x} has no code in the image")
    sites = tuple(i.address for i in _md.disasm(code, start) if i.mnemonic == "ret")
    if not sites:
        raise HarnessError("no return instruction found in the allocator")
    return sites


def bulk_ranges(image: KernelImage) -> tuple[tuple[int, int], ...]:
    """[start, end) of each bulk memory routine the image has a sized symbol for."""
    return tuple((sym.address, sym.address + sym.size)
                 for sym in (image.find_symbol(n) for n in BULK_ROUTINES)
                 if sym is not None and sym.size > 0)


def bulk_sites(image: KernelImage, ranges: tuple[tuple[int, int], ...]) -> tuple[BulkSite, ...]:
    """The bulk moves (`rep stosq`, `rep movsq`) inside `ranges`, in executable segments."""
    sites: list[BulkSite] = []
    for lo, hi in ranges:
        seg = next((s for s in image.segments if s.vaddr <= lo and hi <= s.end), None)
        if seg is None or not seg.flags & 1:
            continue
        code = seg.data[lo - seg.vaddr:hi - seg.vaddr]
        sites.extend(BulkSite(i.address, BULK_ENCODINGS[bytes(i.bytes)])
                     for i in _md.disasm(code, lo) if bytes(i.bytes) in BULK_ENCODINGS)
    return tuple(sites)


def port_string_sites(image: KernelImage) -> tuple[BulkSite, ...]:
    """The `rep outsb` instructions of the image's executable segments. A linear sweep: where
    it loses the instruction boundaries (data among the code) it can only miss sites, and an
    address it names is an instruction start of the sweep, where the guest runs that
    instruction if it runs any."""
    sites: list[BulkSite] = []
    for seg in image.segments:
        if not seg.flags & 1 or PORT_STRING not in seg.data:
            continue
        sites.extend(BulkSite(address, "outsb")
                     for address, size, _mnemonic, _operands in _md.disasm_lite(seg.data,
                                                                                seg.vaddr)
                     if size == len(PORT_STRING) and
                     seg.data[address - seg.vaddr:address - seg.vaddr + size] == PORT_STRING)
    return tuple(sites)
