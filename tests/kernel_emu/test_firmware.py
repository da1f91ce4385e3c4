"""The emulated UEFI firmware's tables and services, driven directly."""

from __future__ import annotations

import struct

import pytest

from kernel_emu import firmware as fw
from kernel_emu.firmware import Firmware
from kernel_emu.image import load_image
from kernel_emu.machine import PAGE, Machine
from kernel_emu.pagewalk import translate
from kernel_emu.profile import load_profile

SCRATCH = 0x7_0000


@pytest.fixture()
def firmware() -> Firmware:
    profile = load_profile("seed")
    mem = profile.memory
    m = Machine([(0, mem.ram_size), (mem.ramdisk_base, mem.ramdisk_size)])
    f = Firmware(m, profile, load_image(profile.image, profile.kernel.load_base))
    f.install()
    return f


def call(f: Firmware, service: int, *args: int, fifth: int = 0) -> int:
    m = f.m
    for reg, value in zip(("rcx", "rdx", "r8", "r9"), args, strict=False):
        m.set_reg(reg, value)
    rsp = SCRATCH + 0x800
    m.set_reg("rsp", rsp)
    m.put_u64(rsp + 8 + 32, fifth)
    f.service(service)
    return m.reg("rax")


def test_entry_state_follows_the_uefi_convention(firmware: Firmware) -> None:
    m = firmware.m
    assert m.reg("rcx") == fw.IMAGE_HANDLE and m.reg("rdx") == fw.SYSTEM_TABLE
    assert m.reg("rip") == firmware.image.entry
    assert m.reg("cr0") & 0x8000_0001 == 0x8000_0001
    assert m.u64(m.reg("rsp")) == fw.stub_address(fw.SVC_EFI_MAIN_RETURNED)
    st = fw.SYSTEM_TABLE
    assert m.u64(st) == 0x5453595320494249  # "IBI SYST"
    assert m.u64(st + 64) == fw.CON_OUT and m.u64(st + 96) == fw.BOOT_SERVICES
    assert m.u64(fw.BOOT_SERVICES + 232) == fw.stub_address(fw.SVC_EXIT_BOOT_SERVICES)


def test_identity_paging_with_holes(firmware: Firmware) -> None:
    m, cr3 = firmware.m, firmware.pml4
    assert translate(m, cr3, 0x30_0000).paddr == 0x30_0000
    assert translate(m, cr3, 0x1_0000_0000).paddr == 0x1_0000_0000
    assert translate(m, cr3, 0) is None, "null page must fault"
    assert translate(m, cr3, firmware.guard_page) is None
    assert firmware.stack_base - firmware.guard_page == PAGE
    assert translate(m, cr3, 0x1000_0000) is None, "no RAM between 128 MiB and 4 GiB"


def test_get_memory_map_sizes_and_contents(firmware: Firmware) -> None:
    m = firmware.m
    size_p, key_p, dsize_p, ver_p, buf = (SCRATCH + i * 8 for i in range(5))
    buf = SCRATCH + 0x100
    m.put_u64(size_p, 0)
    status = call(firmware, fw.SVC_GET_MEMORY_MAP, size_p, buf, key_p, dsize_p, fifth=ver_p)
    assert status == fw.EFI_BUFFER_TOO_SMALL
    needed = m.u64(size_p)
    assert needed == len(firmware.memory_map) * fw.DESCRIPTOR_SIZE
    status = call(firmware, fw.SVC_GET_MEMORY_MAP, size_p, buf, key_p, dsize_p, fifth=ver_p)
    assert status == fw.EFI_SUCCESS and m.u64(dsize_p) == 48
    kinds = [struct.unpack_from("<IIQQQ", m.read(buf + i * 48, 40)) for i in
             range(needed // 48)]
    conventional = [(start, pages) for kind, _, start, _, pages in kinds
                    if kind == fw.CONVENTIONAL]
    assert conventional and all(start >= 0x10_0000 for start, _ in conventional)
    # ExitBootServices wants the current key; a stale one is refused
    key = m.u64(key_p)
    assert call(firmware, fw.SVC_EXIT_BOOT_SERVICES, fw.IMAGE_HANDLE, key + 1) == \
        fw.EFI_INVALID_PARAMETER
    assert call(firmware, fw.SVC_EXIT_BOOT_SERVICES, fw.IMAGE_HANDLE, key) == fw.EFI_SUCCESS
    # after the exit, boot services are gone
    assert call(firmware, fw.SVC_GET_MEMORY_MAP, size_p, buf, key_p, dsize_p) == \
        fw.EFI_UNSUPPORTED


def test_allocate_pages_changes_the_map_key(firmware: Firmware) -> None:
    m = firmware.m
    out = SCRATCH
    before = firmware.state.map_key
    assert call(firmware, fw.SVC_ALLOCATE_PAGES, 0, fw.LOADER_DATA, 4, out) == fw.EFI_SUCCESS
    assert firmware.state.map_key == before + 1
    page = m.u64(out)
    assert page % PAGE == 0 and page + 4 * PAGE <= firmware.profile.memory.ram_size
    assert call(firmware, fw.SVC_ALLOCATE_POOL, fw.LOADER_DATA, 100, out) == fw.EFI_SUCCESS
    assert fw.POOL_BASE <= m.u64(out) < fw.FIRMWARE_END


def test_output_string_is_captured(firmware: Firmware) -> None:
    firmware.m.write(SCRATCH, "héllo\r\n\0".encode("utf-16-le"))
    assert call(firmware, fw.SVC_OUTPUT_STRING, fw.CON_OUT, SCRATCH) == fw.EFI_SUCCESS
    assert firmware.state.console == ["héllo\r\n"]


def test_ramdisk_hand_over_clears_a_longer_previous_image(firmware: Firmware) -> None:
    m = firmware.m
    base = firmware.profile.memory.ramdisk_base
    firmware.hand_over_ramdisk([b"\xaa" * 100], 0)
    firmware.hand_over_ramdisk([b"\xbb" * 4, b"\xbb" * 6], 100)
    assert m.read(base, 100) == b"\xbb" * 10 + bytes(90)
    magic, rd_base, rd_size = struct.unpack("<QQQ", m.read(fw.RAMDISK_DESCRIPTOR, 24))
    assert (magic, rd_base, rd_size) == (fw.RAMDISK_MAGIC, base, 10)


def test_identity_map_executes_only_code(firmware: Firmware) -> None:
    m, cr3 = firmware.m, firmware.pml4
    text = [s for s in firmware.image.segments if s.flags & 1]
    assert text
    for seg in text:
        assert translate(m, cr3, seg.vaddr).executable
        assert translate(m, cr3, seg.end - 1).executable
    assert translate(m, cr3, fw.STUBS).executable
    data = [s for s in firmware.image.segments if not s.flags & 1]
    for addr in [s.vaddr for s in data] + [fw.SYSTEM_TABLE, firmware.stack_top - 8, 0x30_0000,
                                           0x1_0000_0000]:
        mapping = translate(m, cr3, addr)
        assert mapping is not None and mapping.writable and not mapping.executable, hex(addr)


def _service_at(firmware: Firmware, table: int, offset: int) -> int:
    """The service id the stub an entry of a table points to writes to the service port."""
    stub = firmware.m.u64(table + offset)
    code = firmware.m.read(stub, fw.STUB_SIZE)
    assert code[0] == 0xB8  # mov eax, imm32
    return struct.unpack_from("<I", code, 1)[0]


@pytest.mark.parametrize("table, offset, name", [
    (fw.BOOT_SERVICES, 152, "BootServices.HandleProtocol"),
    (fw.BOOT_SERVICES, 280, "BootServices.OpenProtocol"),
    (fw.BOOT_SERVICES, 320, "BootServices.LocateProtocol"),
    (fw.BOOT_SERVICES, 368, "BootServices.CreateEventEx"),
    (fw.BOOT_SERVICES, 232, "ExitBootServices"),
    (fw.RUNTIME_SERVICES, 72, "RuntimeServices.GetVariable"),
    (fw.RUNTIME_SERVICES, 104, "RuntimeServices.ResetSystem"),
    (fw.CON_OUT, 48, "ConOut.ClearScreen"),
])
def test_every_table_entry_is_a_service_known_by_name(firmware: Firmware, table: int,
                                                      offset: int, name: str) -> None:
    assert fw.service_name(_service_at(firmware, table, offset)) == name


def test_what_the_machine_lacks_is_answered_and_recorded(firmware: Firmware) -> None:
    m = firmware.m
    m.put_u64(SCRATCH, 0x1234)
    locate = _service_at(firmware, fw.BOOT_SERVICES, 320)
    # LocateProtocol(&GOP guid, NULL, &interface): no such protocol here, interface cleared
    assert call(firmware, locate, SCRATCH + 0x100, 0, SCRATCH) == fw.EFI_NOT_FOUND
    assert m.u64(SCRATCH) == 0
    for offset, status in ((248, fw.EFI_SUCCESS), (256, fw.EFI_SUCCESS)):  # Stall, watchdog
        assert call(firmware, _service_at(firmware, fw.BOOT_SERVICES, offset), 0) == status
    get_variable = _service_at(firmware, fw.RUNTIME_SERVICES, 72)
    assert call(firmware, get_variable, SCRATCH, SCRATCH, 0, SCRATCH) == fw.EFI_NOT_FOUND
    assert firmware.state.unsupported == []
    create_event = _service_at(firmware, fw.BOOT_SERVICES, 80)
    assert call(firmware, create_event, 0, 0, 0, 0) == fw.EFI_UNSUPPORTED
    assert firmware.state.unsupported == ["BootServices.CreateEvent"]


def test_the_image_handle_has_its_loaded_image_protocol(firmware: Firmware) -> None:
    m = firmware.m
    m.write(SCRATCH + 0x100, fw.LOADED_IMAGE_GUID.bytes_le)
    for offset in (152, 280):  # HandleProtocol, OpenProtocol
        m.put_u64(SCRATCH, 0)
        service = _service_at(firmware, fw.BOOT_SERVICES, offset)
        assert call(firmware, service, fw.IMAGE_HANDLE, SCRATCH + 0x100, SCRATCH) == \
            fw.EFI_SUCCESS
        loaded = m.u64(SCRATCH)
        assert m.u64(loaded + 16) == fw.SYSTEM_TABLE
        base, size = m.u64(loaded + 64), m.u64(loaded + 72)
        assert base <= firmware.image.entry < base + size
        # another handle, or another protocol: not supported
        assert call(firmware, service, 0x1234, SCRATCH + 0x100, SCRATCH) == fw.EFI_UNSUPPORTED
        assert call(firmware, service, fw.IMAGE_HANDLE, SCRATCH + 0x200, SCRATCH) == \
            fw.EFI_UNSUPPORTED


def test_acpi_tables_are_valid_and_describe_one_cpu(firmware: Firmware) -> None:
    m = firmware.m
    entries = m.u64(fw.SYSTEM_TABLE + 104)
    config = m.u64(fw.SYSTEM_TABLE + 112)
    tables = {m.read(config + 24 * i, 16): m.u64(config + 24 * i + 16) for i in range(entries)}
    rsdp = tables[fw.ACPI20_GUID.bytes_le]
    raw = m.read(rsdp, 36)
    assert raw[:8] == b"RSD PTR " and raw[15] == 2
    assert sum(raw[:20]) % 256 == 0 and sum(raw) % 256 == 0
    xsdt = struct.unpack_from("<Q", raw, 24)[0]
    header = m.read(xsdt, 36)
    length = struct.unpack_from("<I", header, 4)[0]
    assert header[:4] == b"XSDT" and sum(m.read(xsdt, length)) % 256 == 0
    (madt,) = struct.unpack_from(f"<{(length - 36) // 8}Q", m.read(xsdt + 36, length - 36))
    length = struct.unpack_from("<I", m.read(madt, 8), 4)[0]
    body = m.read(madt, length)
    assert body[:4] == b"APIC" and sum(body) % 256 == 0
    kinds = []
    at = 44
    while at < length:
        kinds.append(body[at])
        at += body[at + 1]
    assert kinds == [0, 1]  # one processor local APIC, one I/O APIC
