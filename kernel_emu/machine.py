"""The emulated amd64 machine: Unicorn CPU and labelled RAM regions backed by host memory.

Port I/O is hooked by the tracer (`kernel_emu.tracing`), natively."""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import struct
import sys
from dataclasses import dataclass
from typing import cast

from unicorn.unicorn_const import UC_ARCH_X86, UC_MODE_64, UC_PROT_ALL
from unicorn.unicorn_py3.arch.intel import UcIntel
from unicorn.unicorn_py3.unicorn import Uc, UcError, uclib
from unicorn.x86_const import (
    UC_X86_REG_CR0,
    UC_X86_REG_CR2,
    UC_X86_REG_CR3,
    UC_X86_REG_CR4,
    UC_X86_REG_R8,
    UC_X86_REG_R9,
    UC_X86_REG_R10,
    UC_X86_REG_R11,
    UC_X86_REG_R12,
    UC_X86_REG_R13,
    UC_X86_REG_R14,
    UC_X86_REG_R15,
    UC_X86_REG_RAX,
    UC_X86_REG_RBP,
    UC_X86_REG_RBX,
    UC_X86_REG_RCX,
    UC_X86_REG_RDI,
    UC_X86_REG_RDX,
    UC_X86_REG_RFLAGS,
    UC_X86_REG_RIP,
    UC_X86_REG_RSI,
    UC_X86_REG_RSP,
)

PAGE = 0x1000

REGISTERS = {
    "rax": UC_X86_REG_RAX, "rbx": UC_X86_REG_RBX, "rcx": UC_X86_REG_RCX, "rdx": UC_X86_REG_RDX,
    "rsi": UC_X86_REG_RSI, "rdi": UC_X86_REG_RDI, "rbp": UC_X86_REG_RBP, "rsp": UC_X86_REG_RSP,
    "r8": UC_X86_REG_R8, "r9": UC_X86_REG_R9, "r10": UC_X86_REG_R10, "r11": UC_X86_REG_R11,
    "r12": UC_X86_REG_R12, "r13": UC_X86_REG_R13, "r14": UC_X86_REG_R14, "r15": UC_X86_REG_R15,
    "rip": UC_X86_REG_RIP, "rflags": UC_X86_REG_RFLAGS, "cr0": UC_X86_REG_CR0,
    "cr2": UC_X86_REG_CR2, "cr3": UC_X86_REG_CR3, "cr4": UC_X86_REG_CR4,
}
# their Unicorn ids, in that order: what a read of them all asks for
REGISTER_IDS = tuple(REGISTERS.values())
MSR_EFER = 0xC000_0080
_U64 = struct.Struct("<Q")

try:
    from kernel_emu import _walk as _native
except ImportError:  # not built: registers are read through ctypes
    _native = None  # type: ignore[assignment]
# Both native modules judge guest RAM's pages by the host's pagemap, which they must watch
# for forks from before the first bank exists (native/pagemap.h): loaded here, with the
# banks' module, not later by whoever first asks for a tracer
with contextlib.suppress(ImportError):
    from kernel_emu import _tracer  # noqa: F401
# uc_reg_read and uc_reg_write of the Unicorn library the binding loaded
_UC_REG_READ = ctypes.cast(uclib.uc_reg_read, ctypes.c_void_p).value or 0
_UC_REG_WRITE = ctypes.cast(uclib.uc_reg_write, ctypes.c_void_p).value or 0


@dataclass(frozen=True)
class Label:
    """A named address range, so reports can say `write to [guard:firmware-stack]`."""

    start: int
    end: int
    name: str


_ZEROS = memoryview(bytes(1 << 16))


def zero_view(view: memoryview, start: int, end: int) -> None:
    """Zero `view[start:end]`, copied from a buffer of zeros kept for it (no bytes built,
    no foreign call)."""
    while start < end:
        n = min(end - start, len(_ZEROS))
        view[start:start + n] = _ZEROS[:n]
        start += n


class RamBank:
    """One contiguous block of guest RAM, mapped into Unicorn from a host buffer.

    The buffer is private anonymous memory where the host offers it (`absent_zero`): a page
    the host does not hold reads as zeros, so the snapshot restore can give zero pages back
    instead of clearing them, and the loader's fills of fresh frames leave them alone
    (kernel_emu/native/bulk.h). Huge pages are declined: a store to a given-back page
    would make the host clear 2 MiB instead of 4 KiB."""

    def __init__(self, base: int, size: int) -> None:
        self.base = base
        self.size = size
        # Linux's guarantees: a page given back (MADV_DONTNEED) reads as zeros again, and
        # /proc/self/pagemap says which pages the host holds
        self.absent_zero = sys.platform.startswith("linux") and hasattr(mmap, "MAP_PRIVATE") \
            and hasattr(mmap, "MAP_ANONYMOUS")
        if self.absent_zero:
            self.buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            if hasattr(mmap, "MADV_NOHUGEPAGE"):
                with contextlib.suppress(OSError):  # a kernel without transparent huge pages
                    self.buffer.madvise(mmap.MADV_NOHUGEPAGE)
        else:
            self.buffer = mmap.mmap(-1, size)
        self.view = memoryview(self.buffer)
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self.buffer))

    def contains(self, addr: int, size: int = 1) -> bool:
        return self.base <= addr and addr + size <= self.base + self.size


class Machine:
    """Unicorn in 64-bit mode with RAM banks and labels."""

    def __init__(self, banks: list[tuple[int, int]]) -> None:
        # Uc() builds the architecture's subclass, which has the x86 extras (MSRs)
        self.uc = cast(UcIntel, Uc(UC_ARCH_X86, UC_MODE_64))
        self.banks = [RamBank(base, size) for base, size in banks]
        for bank in self.banks:
            self.uc.mem_map_ptr(bank.base, bank.size, UC_PROT_ALL, bank.address)
        self.labels: list[Label] = []
        # the first bank (RAM from address 0) holds almost every access the oracles make
        low = self.banks[0]
        self._low_base, self._low_size, self._low_buffer = low.base, low.size, low.buffer
        self._handle = self.uc._uch.value or 0  # the engine, for the native register read
        self._scratch = ctypes.c_uint64()
        self._scratch_ref = ctypes.byref(self._scratch)
        # one array for a batch read of every register: its values come out as ints at once
        self._batch_values = (ctypes.c_uint64 * len(REGISTERS))()
        self._batch_ids = (ctypes.c_int32 * len(REGISTERS))(*REGISTER_IDS)
        self._batch_ptrs = (ctypes.c_void_p * len(REGISTERS))(
            *(ctypes.addressof(self._batch_values) + 8 * i for i in range(len(REGISTERS))))

    # memory ------------------------------------------------------------------------------
    def bank_for(self, addr: int, size: int = 1) -> RamBank | None:
        low = self.banks[0]  # almost every access: RAM from address 0
        if low.base <= addr and addr + size <= low.base + low.size:
            return low
        for bank in self.banks:
            if bank.contains(addr, size):
                return bank
        return None

    def read(self, addr: int, size: int) -> bytes:
        """Read guest physical memory; bytes outside RAM read as 0xff, like an open bus."""
        off = addr - self._low_base
        if off >= 0 and off + size <= self._low_size:
            return self._low_buffer[off:off + size]
        bank = self.bank_for(addr, size)
        if bank is not None:
            off = addr - bank.base
            return bank.buffer[off:off + size]
        return bytes(self._read_slow(addr, size))

    def _read_slow(self, addr: int, size: int) -> bytearray:
        out = bytearray(b"\xff" * size)
        for i in range(size):
            bank = self.bank_for(addr + i)
            if bank is not None:
                out[i] = bank.view[addr + i - bank.base]
        return out

    def write(self, addr: int, data: bytes) -> None:
        bank = self.bank_for(addr, len(data))
        if bank is None:
            raise ValueError(f"host write outside RAM at {addr:#x}")
        off = addr - bank.base
        bank.view[off:off + len(data)] = data

    def zero(self, addr: int, size: int) -> None:
        """Write `size` zero bytes from `addr` (without building them first)."""
        bank = self.bank_for(addr, size)
        if bank is None:
            raise ValueError(f"host write outside RAM at {addr:#x}")
        zero_view(bank.view, addr - bank.base, addr - bank.base + size)

    def ram_view(self, addr: int, size: int) -> memoryview | None:
        """A view of the `size` bytes of RAM from `addr` (writes through it are guest
        writes the tracer does not see, as `write`'s), or None when one bank does not hold
        them all."""
        bank = self.bank_for(addr, size)
        return None if bank is None else bank.view[addr - bank.base:addr - bank.base + size]

    def u64_in_ram(self, addr: int) -> int | None:
        """The 64-bit word at `addr`, or None when RAM does not hold all of its bytes."""
        off = addr - self._low_base
        if off >= 0 and off + 8 <= self._low_size:
            value: int = _U64.unpack_from(self._low_buffer, off)[0]
            return value
        if self.bank_for(addr, 8) is None:
            return None
        return int.from_bytes(self.read(addr, 8), "little")

    def u64(self, addr: int) -> int:
        off = addr - self._low_base
        if off >= 0 and off + 8 <= self._low_size:
            value: int = _U64.unpack_from(self._low_buffer, off)[0]
            return value
        return int.from_bytes(self.read(addr, 8), "little")

    def put_u64(self, addr: int, value: int) -> None:
        self.write(addr, struct.pack("<Q", value & 0xFFFF_FFFF_FFFF_FFFF))

    def label(self, start: int, end: int, name: str) -> None:
        self.labels.append(Label(start, end, name))

    def label_of(self, addr: int) -> str | None:
        # later labels are more specific (a guard page inside a firmware area)
        for lab in reversed(self.labels):
            if lab.start <= addr < lab.end:
                return lab.name
        return None

    # registers ---------------------------------------------------------------------------
    def reg(self, name: str) -> int:
        # straight to the C API: the binding's generic path costs microseconds per read, and
        # the allocator observers read registers on every call; natively when the walker is
        # built (a ctypes call converts its arguments each time: ~0.5 µs, a run reads ~10)
        if _native is not None:
            try:
                return _native.read_register(_UC_REG_READ, self._handle, REGISTERS[name])
            except OSError:
                pass  # the ctypes path below raises Unicorn's own error
        status = uclib.uc_reg_read(self.uc._uch, REGISTERS[name], self._scratch_ref)
        if status:
            raise UcError(status)
        return self._scratch.value

    def set_reg(self, name: str, value: int) -> None:
        if _native is not None:
            try:
                _native.write_register(_UC_REG_WRITE, self._handle, REGISTERS[name],
                                       value & 0xFFFF_FFFF_FFFF_FFFF)
                return
            except OSError:
                pass  # the binding's path below raises Unicorn's own error
        self.uc.reg_write(REGISTERS[name], value)

    def set_msr(self, msr: int, value: int) -> None:
        self.uc.msr_write(msr, value)

    def registers(self) -> dict[str, int]:
        if _native is not None:
            try:
                return dict(zip(REGISTERS, _native.read_registers(_UC_REG_READ, self._handle,
                                                                  REGISTER_IDS), strict=True))
            except OSError:
                pass  # the batch read below raises Unicorn's own error
        status = uclib.uc_reg_read_batch(self.uc._uch, self._batch_ids, self._batch_ptrs,
                                         len(REGISTERS))
        if status:
            raise UcError(status)
        return dict(zip(REGISTERS, self._batch_values[:], strict=True))
