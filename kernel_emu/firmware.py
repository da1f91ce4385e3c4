"""Emulated UEFI firmware: memory map, identity paging, system table, boot services, ramdisk.

Layouts follow the UEFI 2.x specification; addresses follow `guest/ABI.md`.
"""

from __future__ import annotations

import functools
import struct
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kernel_emu.errors import ImageError
from kernel_emu.image import KernelImage
from kernel_emu.machine import MSR_EFER, PAGE, Machine, zero_view
from kernel_emu.profile import TargetProfile

EFI_SUCCESS = 0
EFI_ERR = 0x8000_0000_0000_0000
EFI_INVALID_PARAMETER = EFI_ERR | 2
EFI_UNSUPPORTED = EFI_ERR | 3
EFI_BUFFER_TOO_SMALL = EFI_ERR | 5
EFI_NOT_FOUND = EFI_ERR | 14
EFI_OUT_OF_RESOURCES = EFI_ERR | 9

RESERVED, LOADER_CODE, LOADER_DATA, BS_CODE, BS_DATA, RT_CODE, RT_DATA, CONVENTIONAL = range(8)

SERVICE_PORT = 0xF0
DEBUG_PORT = 0xE9

FIRMWARE_BASE = 0x8_0000
STUBS = 0x8_0000
SYSTEM_TABLE = 0x8_1000
CON_OUT = 0x8_1100
CON_OUT_MODE = 0x8_1160  # SIMPLE_TEXT_OUTPUT_MODE: one 80x25 mode, the current one
BOOT_SERVICES = 0x8_1200
RUNTIME_SERVICES = 0x8_1400
CONFIG_TABLE = 0x8_1600
RAMDISK_DESCRIPTOR = 0x8_1700
_DESCRIPTOR = struct.Struct("<QQQ")  # magic, base, size
VENDOR_STRING = 0x8_1800
POOL_BASE = 0x8_2000
FIRMWARE_END = 0xA_0000
PAGE_TABLES = 0x1000
STACK_TOP = 0x8_0000
# from 1 MiB up to here the memory map says "loader code": the image when it is loaded low
LOW_LOADER_END = 0x30_0000
IMAGE_HANDLE = 0x8_1F00
LOADED_IMAGE = 0x8_1900  # EFI_LOADED_IMAGE_PROTOCOL of the image handle
ACPI_RSDP = 0x8_1980  # ACPI 2.0: RSDP -> XSDT -> MADT (one CPU, one I/O APIC)
ACPI_XSDT = 0x8_19C0
ACPI_MADT = 0x8_1A00

RAMDISK_GUID = uuid.UUID("7c1c9a6e-2b3d-4f7a-9e21-5258524d4653")
ACPI20_GUID = uuid.UUID("8868e871-e4f1-11d3-bc22-0080c73c8881")
LOADED_IMAGE_GUID = uuid.UUID("5b1b31a1-9562-11d2-8e3f-00a0c969723b")
RAMDISK_MAGIC = 0x4B53_4944_4D41_5252
DESCRIPTOR_SIZE = 48

# Accessed and Dirty are preset: the CPU sets them behind every write hook's back, and a page
# table it changed that way would differ between a snapshot restore and a full boot. (A
# snapshot clears them where it uses them as its write log: see kernel_emu.dirtylog.)
PTE_P, PTE_W, PTE_A, PTE_D = 1, 2, 0x20, 0x40
PTE_NX = 1 << 63

# service ids used in the stubs; boot-services table offsets from the UEFI spec
SVC_OUTPUT_STRING, SVC_ALLOCATE_PAGES, SVC_FREE_PAGES, SVC_GET_MEMORY_MAP = 1, 2, 3, 4
SVC_ALLOCATE_POOL, SVC_FREE_POOL, SVC_EXIT_BOOT_SERVICES = 5, 6, 7
SVC_CON_RESET, SVC_EFI_MAIN_RETURNED = 9, 10
BOOT_SERVICE_SLOTS = {
    40: SVC_ALLOCATE_PAGES, 48: SVC_FREE_PAGES, 56: SVC_GET_MEMORY_MAP, 64: SVC_ALLOCATE_POOL,
    72: SVC_FREE_POOL, 232: SVC_EXIT_BOOT_SERVICES,
}
BOOT_SERVICES_SIZE = 376
STUB_SIZE = 8

# Every other entry of the tables has a stub of its own, so that a call is known by name:
# service ids from these bases plus the entry's index.
SVC_BOOT_BASE, SVC_RUNTIME_BASE, SVC_CON_OUT_BASE = 64, 128, 176
BOOT_SERVICE_NAMES = (
    "RaiseTPL", "RestoreTPL", "AllocatePages", "FreePages", "GetMemoryMap", "AllocatePool",
    "FreePool", "CreateEvent", "SetTimer", "WaitForEvent", "SignalEvent", "CloseEvent",
    "CheckEvent", "InstallProtocolInterface", "ReinstallProtocolInterface",
    "UninstallProtocolInterface", "HandleProtocol", "Reserved", "RegisterProtocolNotify",
    "LocateHandle", "LocateDevicePath", "InstallConfigurationTable", "LoadImage", "StartImage",
    "Exit", "UnloadImage", "ExitBootServices", "GetNextMonotonicCount", "Stall",
    "SetWatchdogTimer", "ConnectController", "DisconnectController", "OpenProtocol",
    "CloseProtocol", "OpenProtocolInformation", "ProtocolsPerHandle", "LocateHandleBuffer",
    "LocateProtocol", "InstallMultipleProtocolInterfaces",
    "UninstallMultipleProtocolInterfaces", "CalculateCrc32", "CopyMem", "SetMem",
    "CreateEventEx")
RUNTIME_SERVICE_NAMES = (
    "GetTime", "SetTime", "GetWakeupTime", "SetWakeupTime", "SetVirtualAddressMap",
    "ConvertPointer", "GetVariable", "GetNextVariableName", "SetVariable",
    "GetNextHighMonotonicCount", "ResetSystem", "UpdateCapsule", "QueryCapsuleCapabilities",
    "QueryVariableInfo")
CON_OUT_NAMES = ("Reset", "OutputString", "TestString", "QueryMode", "SetMode", "SetAttribute",
                 "ClearScreen", "SetCursorPosition", "EnableCursor")
SVC_LAST = SVC_CON_OUT_BASE + len(CON_OUT_NAMES) - 1
# answered as firmware answers them for a machine without the feature, or trivially
SVC_STALL = SVC_BOOT_BASE + BOOT_SERVICE_NAMES.index("Stall")
SVC_SET_WATCHDOG = SVC_BOOT_BASE + BOOT_SERVICE_NAMES.index("SetWatchdogTimer")
SVC_LOCATE_PROTOCOL = SVC_BOOT_BASE + BOOT_SERVICE_NAMES.index("LocateProtocol")
SVC_GET_VARIABLE = SVC_RUNTIME_BASE + RUNTIME_SERVICE_NAMES.index("GetVariable")
SVC_HANDLE_PROTOCOL = SVC_BOOT_BASE + BOOT_SERVICE_NAMES.index("HandleProtocol")
SVC_OPEN_PROTOCOL = SVC_BOOT_BASE + BOOT_SERVICE_NAMES.index("OpenProtocol")


def stub_address(service: int) -> int:
    return STUBS + service * STUB_SIZE


def _stub(service: int) -> bytes:
    # mov eax, imm32 ; out 0xf0, eax ; ret
    return b"\xb8" + struct.pack("<I", service) + bytes([0xE7, SERVICE_PORT, 0xC3])


@dataclass
class MemoryDescriptor:
    kind: int
    start: int
    pages: int

    @property
    def end(self) -> int:
        return self.start + self.pages * PAGE

    def pack(self) -> bytes:
        return struct.pack("<IIQQQQ", self.kind, 0, self.start, 0, self.pages, 0xF).ljust(
            DESCRIPTOR_SIZE, b"\0")


@dataclass
class FirmwareState:
    """What the firmware remembers between service calls (copied into snapshots)."""

    console: list[str] = field(default_factory=list)
    map_key: int = 1
    exited: bool = False
    pool_next: int = POOL_BASE
    calls: list[str] = field(default_factory=list)
    efi_main_status: int | None = None
    unsupported: list[str] = field(default_factory=list)  # services asked for, not provided

    def copy(self) -> FirmwareState:
        return FirmwareState(list(self.console), self.map_key, self.exited, self.pool_next,
                             list(self.calls), self.efi_main_status, list(self.unsupported))


class Firmware:
    """Prepares the machine as UEFI firmware leaves it and services the image's calls."""

    def __init__(self, machine: Machine, profile: TargetProfile, image: KernelImage) -> None:
        self.m = machine
        self.profile = profile
        self.image = image
        self.state = FirmwareState()
        mem = profile.memory
        self.stack_top = STACK_TOP
        # whole pages, so that the guard page sits right under the stack
        size = (mem.firmware_stack_size + PAGE - 1) & ~(PAGE - 1)
        self.stack_base = STACK_TOP - max(size, PAGE)
        self.guard_page = self.stack_base - PAGE
        self.memory_map = self._memory_map()
        self.page_table_end = PAGE_TABLES
        if self.guard_page < PAGE_TABLES + 0x50 * PAGE:
            raise ValueError("firmware stack too large for the firmware area")
        # the ramdisk region and the descriptor, as views of the RAM that holds them (every
        # run places an input there); None where RAM does not hold them whole
        self._ramdisk = machine.ram_view(mem.ramdisk_base, mem.ramdisk_size)
        self._descriptor = machine.ram_view(RAMDISK_DESCRIPTOR, _DESCRIPTOR.size)

    # layout ------------------------------------------------------------------------------
    def _memory_map(self) -> list[MemoryDescriptor]:
        """The firmware below 1 MiB, the loader's area from 1 MiB to LOW_LOADER_END (the
        image, when it is loaded there), the image wherever else it was loaded, and the rest
        of RAM free."""
        mem = self.profile.memory
        start = self.image.start & ~(PAGE - 1)
        end = (max(self.image.end, 0x10_0000) + PAGE - 1) & ~(PAGE - 1)
        if start < 0x10_0000 or end > mem.ram_size:
            raise ImageError(f"the kernel image at {self.image.start:#x}-{self.image.end:#x} "
                             f"is not in RAM above 1 MiB (RAM ends at {mem.ram_size:#x})")
        low_end = max(end, LOW_LOADER_END) if start < LOW_LOADER_END else LOW_LOADER_END
        ram = [
            MemoryDescriptor(RESERVED, 0, 1),
            MemoryDescriptor(BS_DATA, PAGE, (FIRMWARE_BASE - PAGE) // PAGE),
            MemoryDescriptor(RT_DATA, FIRMWARE_BASE, (FIRMWARE_END - FIRMWARE_BASE) // PAGE),
            MemoryDescriptor(RESERVED, FIRMWARE_END, (0x10_0000 - FIRMWARE_END) // PAGE),
            MemoryDescriptor(LOADER_CODE, 0x10_0000, (low_end - 0x10_0000) // PAGE),
        ]
        if start >= low_end:  # loaded higher up, as real firmware does
            ram += [MemoryDescriptor(CONVENTIONAL, low_end, (start - low_end) // PAGE),
                    MemoryDescriptor(LOADER_CODE, start, (end - start) // PAGE)]
            low_end = end
        ram.append(MemoryDescriptor(CONVENTIONAL, low_end, (mem.ram_size - low_end) // PAGE))
        ram = [d for d in ram if d.pages > 0]
        return [*ram, MemoryDescriptor(LOADER_DATA, mem.ramdisk_base, mem.ramdisk_size // PAGE)]

    def install(self) -> None:
        """Write tables, load the image, label memory and point the CPU at efi_main."""
        m = self.m
        for seg in self.image.segments:
            m.write(seg.vaddr, seg.data.ljust(seg.memsz, b"\0"))
        self._build_page_tables()
        self._build_tables()
        mem = self.profile.memory
        m.label(0, mem.ram_size, "ram")
        m.label(mem.ramdisk_base, mem.ramdisk_base + mem.ramdisk_size, "ramdisk")
        m.label(0, PAGE, "null-page")
        m.label(PAGE_TABLES, self.page_table_end, "firmware-page-tables")
        m.label(FIRMWARE_BASE, FIRMWARE_END, "firmware")
        m.label(self.stack_base, self.stack_top, "firmware-stack")
        m.label(self.guard_page, self.stack_base, "guard:firmware-stack")
        m.label(self.image.start, self.image.end, "kernel-image")
        heap = self.profile.heap
        m.label(heap.base, heap.end, "heap")
        self._enter()

    @property
    def executable_ranges(self) -> list[tuple[int, int]]:
        """Page-aligned [start, end) ranges the identity map leaves executable: the image's
        executable segments and the page of service stubs."""
        ranges = [(seg.vaddr & ~(PAGE - 1), (seg.end + PAGE - 1) & ~(PAGE - 1))
                  for seg in self.image.segments if seg.flags & 1]
        ranges.append((STUBS, STUBS + PAGE))
        return ranges

    def _build_page_tables(self) -> None:
        """4 KiB identity pages for RAM and the ramdisk; page 0 and the stack guard not present;
        no-execute everywhere but :attr:`executable_ranges`.

        NX is more than hygiene: Unicorn gives a store the fast path only on a page the TLB
        does not hold as executable, so without it every guest store costs a slow-path call.

        Each table is packed whole and written once: tens of thousands of single-entry writes
        would dominate a full boot. The packed tables depend only on the layout, so a full
        boot after the first of a layout writes them from a cache."""
        mem = self.profile.memory
        blob = _page_tables(((0, mem.ram_size),
                             (mem.ramdisk_base, mem.ramdisk_base + mem.ramdisk_size)),
                            tuple(sorted({0, self.guard_page})),
                            tuple(self.executable_ranges))
        self.m.write(PAGE_TABLES, blob)
        self.pml4 = PAGE_TABLES
        self.page_table_end = PAGE_TABLES + len(blob)

    def _build_tables(self) -> None:
        m = self.m
        for svc in range(SVC_LAST + 1):
            m.write(stub_address(svc), _stub(svc))
        vendor = "Rustux fuzzfarm firmware\0".encode("utf-16-le")
        m.write(VENDOR_STRING, vendor)
        # EFI_SIMPLE_TEXT_OUTPUT_PROTOCOL: Reset, OutputString, then unsupported entries
        con_out = [stub_address(SVC_CON_RESET), stub_address(SVC_OUTPUT_STRING)]
        con_out += [stub_address(SVC_CON_OUT_BASE + i) for i in range(2, len(CON_OUT_NAMES))]
        con_out.append(CON_OUT_MODE)  # Mode, after the nine functions
        # MaxMode, Mode, Attribute (light grey on black), column, row, cursor visible
        m.write(CON_OUT_MODE, struct.pack("<iiiii?3x", 1, 0, 0x07, 0, 0, True))
        m.write(CON_OUT, struct.pack(f"<{len(con_out)}Q", *con_out))
        boot = bytearray(BOOT_SERVICES_SIZE)
        struct.pack_into("<QIIII", boot, 0, 0x56524553544F4F42, 0x0002_0046,
                         BOOT_SERVICES_SIZE, 0, 0)
        for off in range(24, BOOT_SERVICES_SIZE, 8):
            svc = BOOT_SERVICE_SLOTS.get(off, SVC_BOOT_BASE + (off - 24) // 8)
            struct.pack_into("<Q", boot, off, stub_address(svc))
        m.write(BOOT_SERVICES, bytes(boot))
        runtime = bytearray(136)
        struct.pack_into("<QIIII", runtime, 0, 0x56524553544E5552, 0x0002_0046, 136, 0, 0)
        for off in range(24, 136, 8):
            struct.pack_into("<Q", runtime, off, stub_address(SVC_RUNTIME_BASE + (off - 24) // 8))
        m.write(RUNTIME_SERVICES, bytes(runtime))
        self._build_acpi()
        # EFI_LOADED_IMAGE_PROTOCOL: revision, parent, system table, device, file path,
        # reserved, options size and pointer, image base and size, code and data types, unload
        image_base = self.image.start & ~(PAGE - 1)
        m.write(LOADED_IMAGE, struct.pack("<IIQQQQQIIQQQIIQ", 0x1000, 0, 0, SYSTEM_TABLE, 0, 0,
                                          0, 0, 0, 0, image_base, self.image.end - image_base,
                                          LOADER_CODE, LOADER_DATA, 0))
        # the ACPI 2.0 entry before ours, as real firmware has
        config = ACPI20_GUID.bytes_le + struct.pack("<Q", ACPI_RSDP)
        config += RAMDISK_GUID.bytes_le + struct.pack("<Q", RAMDISK_DESCRIPTOR)
        m.write(CONFIG_TABLE, config)
        system = bytearray(120)
        struct.pack_into("<QIIII", system, 0, 0x5453595320494249, 0x0002_0046, 120, 0, 0)
        struct.pack_into("<QI", system, 24, VENDOR_STRING, 0x0001_0000)
        struct.pack_into("<QQ", system, 56, 0x8_1F10, CON_OUT)  # ConsoleOutHandle, ConOut
        struct.pack_into("<QQ", system, 72, 0x8_1F10, CON_OUT)  # StandardErrorHandle, StdErr
        struct.pack_into("<QQQQ", system, 88, RUNTIME_SERVICES, BOOT_SERVICES, 2, CONFIG_TABLE)
        m.write(SYSTEM_TABLE, bytes(system))

    def _build_acpi(self) -> None:
        """Minimal valid ACPI 2.0 tables: an RSDP, an XSDT listing one MADT that describes one
        processor (local APIC 0) and one I/O APIC, checksums right."""

        def checksummed(data: bytearray, at: int, length: int) -> None:
            data[at] = (-sum(data[:length])) & 0xFF

        def table(signature: bytes, body: bytes) -> bytes:
            data = bytearray(36) + body
            struct.pack_into("<4sIBB6s8sI4sI", data, 0, signature, len(data), 1, 0, b"RUSTUX",
                             b"FUZZFARM", 1, b"FZFM", 1)
            checksummed(data, 9, len(data))
            return bytes(data)

        madt = table(b"APIC", struct.pack("<II", 0xFEE0_0000, 1)
                     + struct.pack("<BBBBI", 0, 8, 0, 0, 1)  # processor local APIC
                     + struct.pack("<BBBBII", 1, 12, 0, 0, 0xFEC0_0000, 0))  # I/O APIC
        xsdt = table(b"XSDT", struct.pack("<Q", ACPI_MADT))
        rsdp = bytearray(struct.pack("<8sB6sBIIQB3s", b"RSD PTR ", 0, b"RUSTUX", 2, 0, 36,
                                     ACPI_XSDT, 0, b"\0\0\0"))
        checksummed(rsdp, 8, 20)
        checksummed(rsdp, 32, 36)
        self.m.write(ACPI_MADT, madt)
        self.m.write(ACPI_XSDT, xsdt)
        self.m.write(ACPI_RSDP, bytes(rsdp))

    def _enter(self) -> None:
        m = self.m
        rsp = self.stack_top - 0x30  # return address + 32 bytes of shadow space, 16-aligned + 8
        rsp -= 8
        m.put_u64(rsp, stub_address(SVC_EFI_MAIN_RETURNED))
        m.set_reg("cr3", self.pml4)
        m.set_reg("cr4", 0x620)          # PAE | OSFXSR | OSXMMEXCPT
        m.set_msr(MSR_EFER, 0xD00)       # LME | LMA | NXE
        m.set_reg("cr0", 0x8001_0033)    # PG | WP | NE | ET | MP | PE
        m.set_reg("rsp", rsp)
        m.set_reg("rcx", IMAGE_HANDLE)
        m.set_reg("rdx", SYSTEM_TABLE)
        m.set_reg("rip", self.image.entry)

    # ramdisk -----------------------------------------------------------------------------
    def hand_over_ramdisk(self, parts: Sequence[bytes], previous_size: int) -> int:
        """Place the ramdisk (`parts`, back to back) and its descriptor; zero what a longer
        previous one left behind. Returns the ramdisk's size."""
        base = self.profile.memory.ramdisk_base
        size = sum(len(part) for part in parts)
        need = max(size, previous_size)
        view = self._ramdisk
        if view is None or need > len(view):  # past the region: wherever RAM holds it
            view = self.m.ram_view(base, need)
        if view is None or self._descriptor is None:
            raise ValueError(f"host write outside RAM at {base:#x}")
        at = 0
        for part in parts:
            view[at:at + len(part)] = part
            at += len(part)
        if previous_size > size:
            zero_view(view, size, previous_size)
        _DESCRIPTOR.pack_into(self._descriptor, 0, RAMDISK_MAGIC, base, size)
        return size

    @property
    def ramdisk_ranges(self) -> list[tuple[int, int]]:
        mem = self.profile.memory
        return [(RAMDISK_DESCRIPTOR, RAMDISK_DESCRIPTOR + 24),
                (mem.ramdisk_base, mem.ramdisk_base + mem.ramdisk_size)]

    # services ----------------------------------------------------------------------------
    def service(self, value: int) -> None:
        """Perform the boot service whose stub wrote `value` to the service port; the guest
        is stopped right after that `out`, before the stub's `ret`."""
        m = self.m
        args = [m.reg("rcx"), m.reg("rdx"), m.reg("r8"), m.reg("r9")]
        rsp = m.reg("rsp")
        # stack arguments start above the return address and the 32-byte shadow space
        fifth = m.u64(rsp + 8 + 32)
        st = self.state
        if value == SVC_EFI_MAIN_RETURNED:
            st.efi_main_status = m.reg("rax")
            st.calls.append("efi_main returned")
            return
        runtime = SVC_RUNTIME_BASE <= value < SVC_CON_OUT_BASE
        if st.exited and value not in (SVC_OUTPUT_STRING, SVC_CON_RESET) and not runtime:
            st.calls.append(f"{service_name(value)} after ExitBootServices")
            st.unsupported.append(f"{service_name(value)} after ExitBootServices")
            m.set_reg("rax", EFI_UNSUPPORTED)
            return
        handler: Callable[[list[int], int], int] | None = {
            SVC_OUTPUT_STRING: self._output_string,
            SVC_CON_RESET: lambda a, f: EFI_SUCCESS,
            SVC_GET_MEMORY_MAP: self._get_memory_map,
            SVC_EXIT_BOOT_SERVICES: self._exit_boot_services,
            SVC_ALLOCATE_POOL: self._allocate_pool,
            SVC_FREE_POOL: lambda a, f: EFI_SUCCESS,
            SVC_ALLOCATE_PAGES: self._allocate_pages,
            SVC_FREE_PAGES: lambda a, f: EFI_SUCCESS,
            SVC_STALL: lambda a, f: EFI_SUCCESS,
            SVC_SET_WATCHDOG: lambda a, f: EFI_SUCCESS,
            SVC_LOCATE_PROTOCOL: self._locate_protocol,
            SVC_HANDLE_PROTOCOL: self._handle_protocol,
            SVC_OPEN_PROTOCOL: self._handle_protocol,
            SVC_GET_VARIABLE: lambda a, f: EFI_NOT_FOUND,
        }.get(value)
        status = EFI_UNSUPPORTED if handler is None else handler(args, fifth)
        if handler is None:
            st.unsupported.append(service_name(value))
        st.calls.append(f"{service_name(value)} -> {status:#x}")
        m.set_reg("rax", status)

    def _handle_protocol(self, args: list[int], _fifth: int) -> int:
        """HandleProtocol and OpenProtocol: the image handle supports EFI_LOADED_IMAGE; no
        handle supports anything else."""
        handle, guid, out = args[0], args[1], args[2]
        if handle == IMAGE_HANDLE and guid and \
                self.m.read(guid, 16) == LOADED_IMAGE_GUID.bytes_le:
            if out:
                self.m.put_u64(out, LOADED_IMAGE)
            return EFI_SUCCESS
        return EFI_UNSUPPORTED

    def _locate_protocol(self, args: list[int], _fifth: int) -> int:
        """This machine has none of the protocols one locates (graphics output, say)."""
        if args[2]:
            self.m.put_u64(args[2], 0)
        return EFI_NOT_FOUND

    def _output_string(self, args: list[int], _fifth: int) -> int:
        raw = bytearray()
        addr = args[1]
        for _ in range(4096):
            ch = self.m.read(addr, 2)
            if ch == b"\0\0":
                break
            raw += ch
            addr += 2
        self.state.console.append(raw.decode("utf-16-le", errors="replace"))
        return EFI_SUCCESS

    def _get_memory_map(self, args: list[int], fifth: int) -> int:
        size_ptr, buf, key_ptr, desc_size_ptr = args
        m = self.m
        needed = len(self.memory_map) * DESCRIPTOR_SIZE
        if m.bank_for(size_ptr, 8) is None:
            return EFI_INVALID_PARAMETER
        have = m.u64(size_ptr)
        m.put_u64(size_ptr, needed)
        if desc_size_ptr and m.bank_for(desc_size_ptr, 8):
            m.put_u64(desc_size_ptr, DESCRIPTOR_SIZE)
        if fifth and m.bank_for(fifth, 4):
            m.write(fifth, struct.pack("<I", 1))
        if have < needed:
            return EFI_BUFFER_TOO_SMALL
        if m.bank_for(buf, needed) is None:
            return EFI_INVALID_PARAMETER
        m.write(buf, b"".join(d.pack() for d in self.memory_map))
        if key_ptr and m.bank_for(key_ptr, 8):
            m.put_u64(key_ptr, self.state.map_key)
        return EFI_SUCCESS

    def _exit_boot_services(self, args: list[int], _fifth: int) -> int:
        if args[1] != self.state.map_key:
            return EFI_INVALID_PARAMETER
        self.state.exited = True
        return EFI_SUCCESS

    def _allocate_pool(self, args: list[int], _fifth: int) -> int:
        size, out_ptr = args[1], args[2]
        start = (self.state.pool_next + 15) & ~15
        if size > FIRMWARE_END - start or self.m.bank_for(out_ptr, 8) is None:
            return EFI_OUT_OF_RESOURCES
        self.state.pool_next = start + size
        self.m.put_u64(out_ptr, start)
        return EFI_SUCCESS

    def _allocate_pages(self, args: list[int], _fifth: int) -> int:
        # AllocateAnyPages only: carve from the top of the last conventional range
        kind, mem_type, pages, out_ptr = args
        # the highest free range with room (firmware hands out high memory first)
        conv = [d for d in self.memory_map if d.kind == CONVENTIONAL and d.pages > pages]
        if kind != 0 or not conv or pages <= 0:
            return EFI_OUT_OF_RESOURCES
        if self.m.bank_for(out_ptr, 8) is None:
            return EFI_INVALID_PARAMETER
        last = conv[-1]
        last.pages -= pages
        given = MemoryDescriptor(mem_type & 0xF, last.end, pages)
        self.memory_map.insert(self.memory_map.index(last) + 1, given)
        self.state.map_key += 1
        self.m.put_u64(out_ptr, given.start)
        return EFI_SUCCESS


@functools.lru_cache(maxsize=8)
def _page_tables(ranges: tuple[tuple[int, int], ...], holes: tuple[int, ...],
                 executable: tuple[tuple[int, int], ...]) -> bytes:
    """The page tables of `Firmware._build_page_tables`, packed one after the other from
    PAGE_TABLES in creation order (the PML4 first)."""
    tables: dict[tuple[int, int], list[int]] = {}  # (level, index of what it maps) -> entries
    order: list[tuple[int, int]] = []

    def table(key: tuple[int, int]) -> list[int]:
        if key not in tables:
            tables[key] = [0] * 512
            order.append(key)
        return tables[key]

    table((4, 0))
    leaf = PTE_P | PTE_W | PTE_A | PTE_D
    for lo, hi in ranges:
        for chunk in range(lo & ~0x1F_FFFF, hi, 0x20_0000):
            pt = table((1, chunk >> 21))
            first, last = max(chunk, lo), min(chunk + 0x20_0000, hi)
            pt[(first >> 12) & 0x1FF:((last - 1) >> 12 & 0x1FF) + 1] = [
                page | leaf | PTE_NX for page in range(first, last, PAGE)]
            for start, end in executable:
                for page in range(max(start, first), min(end, last), PAGE):
                    pt[(page >> 12) & 0x1FF] = page | leaf
            for hole in holes:
                if first <= hole < last:
                    pt[(hole >> 12) & 0x1FF] = 0
            table((3, chunk >> 39))
            table((2, chunk >> 30))
    address = {key: PAGE_TABLES + i * PAGE for i, key in enumerate(order)}
    link = PTE_P | PTE_W | PTE_A
    for level, index in order:
        if level == 4:
            continue
        parent = (level + 1, index >> 9) if level < 3 else (4, 0)
        tables[parent][index & 0x1FF] = address[(level, index)] | link
    return b"".join(struct.pack("<512Q", *tables[key]) for key in order)


_SERVICE_NAMES = {
    SVC_OUTPUT_STRING: "OutputString", SVC_GET_MEMORY_MAP: "GetMemoryMap",
    SVC_EXIT_BOOT_SERVICES: "ExitBootServices", SVC_ALLOCATE_POOL: "AllocatePool",
    SVC_FREE_POOL: "FreePool", SVC_ALLOCATE_PAGES: "AllocatePages", SVC_FREE_PAGES: "FreePages",
    SVC_CON_RESET: "ConOut.Reset",
}


def service_name(value: int) -> str:
    """The name of the service whose stub wrote `value`."""
    if value in _SERVICE_NAMES:
        return _SERVICE_NAMES[value]
    for base, names, prefix in ((SVC_BOOT_BASE, BOOT_SERVICE_NAMES, "BootServices."),
                                (SVC_RUNTIME_BASE, RUNTIME_SERVICE_NAMES, "RuntimeServices."),
                                (SVC_CON_OUT_BASE, CON_OUT_NAMES, "ConOut.")):
        if base <= value < base + len(names):
            return prefix + names[value - base]
    return f"service {value}"
