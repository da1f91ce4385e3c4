//! The parts of the UEFI 2.x tables this kernel uses (64-bit layouts).

use core::mem::offset_of;

pub type Status = usize;

pub const SUCCESS: Status = 0;
const ERROR_BIT: Status = 1 << 63;
pub const BUFFER_TOO_SMALL: Status = ERROR_BIT | 5;

pub const CONVENTIONAL_MEMORY: u32 = 7;

#[repr(C)]
pub struct TableHeader {
    pub signature: u64,
    pub revision: u32,
    pub header_size: u32,
    pub crc32: u32,
    pub reserved: u32,
}

#[repr(C)]
pub struct SystemTable {
    pub hdr: TableHeader,
    pub firmware_vendor: *const u16,
    pub firmware_revision: u32,
    pub console_in_handle: usize,
    pub con_in: usize,
    pub console_out_handle: usize,
    pub con_out: *mut SimpleTextOutput,
    pub standard_error_handle: usize,
    pub std_err: usize,
    pub runtime_services: usize,
    pub boot_services: *const BootServices,
    pub number_of_table_entries: usize,
    pub configuration_table: *const ConfigurationTable,
}

#[repr(C)]
pub struct SimpleTextOutput {
    pub reset: usize,
    pub output_string: extern "efiapi" fn(*mut SimpleTextOutput, *const u16) -> Status,
}

pub type GetMemoryMapFn = extern "efiapi" fn(
    map_size: *mut usize,
    map: *mut u8,
    map_key: *mut usize,
    descriptor_size: *mut usize,
    descriptor_version: *mut u32,
) -> Status;

pub type ExitBootServicesFn = extern "efiapi" fn(image_handle: usize, map_key: usize) -> Status;

pub type AllocatePoolFn =
    extern "efiapi" fn(pool_type: u32, size: usize, buffer: *mut *mut u8) -> Status;

/// EFI_MEMORY_TYPE of the kernel's own allocations while boot services run.
pub const LOADER_DATA: u32 = 2;

#[repr(C)]
pub struct BootServices {
    pub hdr: TableHeader,
    pub raise_tpl: usize,
    pub restore_tpl: usize,
    pub allocate_pages: usize,
    pub free_pages: usize,
    pub get_memory_map: GetMemoryMapFn,
    pub allocate_pool: AllocatePoolFn,
    pub free_pool: usize,
    /// CreateEvent .. UnloadImage, unused here.
    pub _unused: [usize; 19],
    pub exit_boot_services: ExitBootServicesFn,
}

#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Guid(pub [u8; 16]);

#[repr(C)]
pub struct ConfigurationTable {
    pub vendor_guid: Guid,
    pub vendor_table: *const u8,
}

/// One EFI_MEMORY_DESCRIPTOR; the firmware's stride (`descriptor_size`) may be larger.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct MemoryDescriptor {
    pub kind: u32,
    pub _pad: u32,
    pub physical_start: u64,
    pub virtual_start: u64,
    pub number_of_pages: u64,
    pub attribute: u64,
}

const _: () = {
    assert!(offset_of!(SystemTable, con_out) == 64);
    assert!(offset_of!(SystemTable, boot_services) == 96);
    assert!(offset_of!(SystemTable, number_of_table_entries) == 104);
    assert!(offset_of!(SystemTable, configuration_table) == 112);
    assert!(offset_of!(SimpleTextOutput, output_string) == 8);
    assert!(offset_of!(BootServices, allocate_pages) == 40);
    assert!(offset_of!(BootServices, get_memory_map) == 56);
    assert!(offset_of!(BootServices, allocate_pool) == 64);
    assert!(offset_of!(BootServices, free_pool) == 72);
    assert!(offset_of!(BootServices, exit_boot_services) == 232);
    assert!(core::mem::size_of::<ConfigurationTable>() == 24);
    assert!(core::mem::size_of::<MemoryDescriptor>() == 40);
};
