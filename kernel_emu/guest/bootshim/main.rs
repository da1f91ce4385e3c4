//! rxboot: on a real machine, does for Rustux what the emulated firmware does before the
//! kernel starts. It reads the ramdisk image from the boot drive (`\rustux\ramdisk.img`),
//! hands it over in the configuration table (the GUID and descriptor of ABI.md), then loads
//! and starts the kernel (`\rustux\kernel.efi`). The kernel therefore gets its input through
//! the same channel on QEMU + OVMF as in the emulator.
//!
//! Everything it says goes to port 0xE9 prefixed with `[rxboot]`; on any failure it says
//! which step failed, with the UEFI status, and halts.

#![no_std]
#![no_main]

use core::arch::asm;
use core::ffi::c_void;
use core::mem::offset_of;
use core::panic::PanicInfo;
use core::ptr::null_mut;

type Handle = *mut c_void;
type Status = usize;

const SUCCESS: Status = 0;
const ALLOCATE_ANY_PAGES: u32 = 0;
const LOADER_DATA: u32 = 2;
const FILE_MODE_READ: u64 = 1;
const PAGE: usize = 4096;

#[repr(C)]
struct Guid(u32, u16, u16, [u8; 8]);

const LOADED_IMAGE: Guid =
    Guid(0x5B1B_31A1, 0x9562, 0x11D2, [0x8E, 0x3F, 0x00, 0xA0, 0xC9, 0x69, 0x72, 0x3B]);
const SIMPLE_FILE_SYSTEM: Guid =
    Guid(0x964E_5B22, 0x6459, 0x11D2, [0x8E, 0x39, 0x00, 0xA0, 0xC9, 0x69, 0x72, 0x3B]);
/// The ramdisk's configuration-table entry (ABI.md, "Ramdisk hand-over").
const RAMDISK: Guid =
    Guid(0x7C1C_9A6E, 0x2B3D, 0x4F7A, [0x9E, 0x21, 0x52, 0x58, 0x52, 0x4D, 0x46, 0x53]);
const RAMDISK_MAGIC: u64 = 0x4B53_4944_4D41_5252;

#[repr(C)]
struct SystemTable {
    _header_to_runtime: [u8; 96],
    boot_services: *const BootServices,
}

#[repr(C)]
struct BootServices {
    _header_and_tpl: [u8; 40],
    allocate_pages: extern "efiapi" fn(u32, u32, usize, *mut u64) -> Status,
    _free_pages_to_free_pool: [usize; 4],
    _events_and_protocol_installs: [usize; 9],
    handle_protocol: extern "efiapi" fn(Handle, *const Guid, *mut *mut c_void) -> Status,
    _reserved_to_locate_device_path: [usize; 4],
    install_configuration_table: extern "efiapi" fn(*const Guid, *mut c_void) -> Status,
    load_image: extern "efiapi" fn(u8, Handle, *const c_void, *const u8, usize, *mut Handle)
        -> Status,
    start_image: extern "efiapi" fn(Handle, *mut usize, *mut *mut u16) -> Status,
}

#[repr(C)]
struct LoadedImage {
    _revision_parent_system_table: [u8; 24],
    device_handle: Handle,
    _file_path_to_load_options: [usize; 4],
    image_base: u64,
    image_size: u64,
}

#[repr(C)]
struct SimpleFileSystem {
    _revision: u64,
    open_volume: extern "efiapi" fn(*mut SimpleFileSystem, *mut *mut File) -> Status,
}

#[repr(C)]
struct File {
    _revision: u64,
    open: extern "efiapi" fn(*mut File, *mut *mut File, *const u16, u64, u64) -> Status,
    close: extern "efiapi" fn(*mut File) -> Status,
    _delete: usize,
    read: extern "efiapi" fn(*mut File, *mut usize, *mut u8) -> Status,
    _write: usize,
    get_position: extern "efiapi" fn(*mut File, *mut u64) -> Status,
    set_position: extern "efiapi" fn(*mut File, u64) -> Status,
}

const _: () = {
    assert!(offset_of!(SystemTable, boot_services) == 96);
    assert!(offset_of!(BootServices, allocate_pages) == 40);
    assert!(offset_of!(BootServices, handle_protocol) == 152);
    assert!(offset_of!(BootServices, install_configuration_table) == 192);
    assert!(offset_of!(BootServices, load_image) == 200);
    assert!(offset_of!(BootServices, start_image) == 208);
    assert!(offset_of!(LoadedImage, device_handle) == 24);
    assert!(offset_of!(LoadedImage, image_base) == 64);
    assert!(offset_of!(LoadedImage, image_size) == 72);
    assert!(offset_of!(File, read) == 32);
    assert!(offset_of!(File, set_position) == 56);
};

/// A NUL-terminated UTF-16 file name from ASCII.
const fn utf16<const N: usize>(ascii: &[u8; N]) -> [u16; N] {
    let mut out = [0u16; N];
    let mut i = 0;
    while i < N {
        out[i] = ascii[i] as u16;
        i += 1;
    }
    out
}

const RAMDISK_FILE: [u16; 20] = utf16(b"\\rustux\\ramdisk.img\0");
const KERNEL_FILE: [u16; 19] = utf16(b"\\rustux\\kernel.efi\0");

fn say(parts: &[&str]) {
    for part in parts {
        for byte in part.bytes() {
            // SAFETY: port 0xE9 is the debug console; writing it has no other effect.
            unsafe { asm!("out 0xe9, al", in("al") byte, options(nomem, nostack)) };
        }
    }
}

fn hex(mut value: u64, buffer: &mut [u8; 18]) -> &str {
    buffer[0] = b'0';
    buffer[1] = b'x';
    for i in (2..18).rev() {
        buffer[i] = b"0123456789abcdef"[(value & 0xF) as usize];
        value >>= 4;
    }
    // SAFETY: only ASCII digits were written.
    unsafe { core::str::from_utf8_unchecked(buffer) }
}

fn halt() -> ! {
    loop {
        // SAFETY: stopping the CPU is all that is left to do.
        unsafe { asm!("cli; hlt", options(nomem, nostack)) };
    }
}

fn check(status: Status, what: &str) {
    if status != SUCCESS {
        let mut buffer = [0u8; 18];
        say(&["[rxboot] ", what, " failed: ", hex(status as u64, &mut buffer), "\n"]);
        halt();
    }
}

/// The whole file `name` under `root`, in fresh LoaderData pages: (address, size).
unsafe fn read_file(bs: &BootServices, root: *mut File, name: &[u16], what: &str) -> (u64, usize) {
    let mut file = null_mut();
    check(((*root).open)(root, &mut file, name.as_ptr(), FILE_MODE_READ, 0), what);
    let mut size = 0u64;
    check(((*file).set_position)(file, u64::MAX), what);
    check(((*file).get_position)(file, &mut size), what);
    check(((*file).set_position)(file, 0), what);
    let mut address = 0u64;
    let pages = (size as usize).div_ceil(PAGE).max(1);
    check((bs.allocate_pages)(ALLOCATE_ANY_PAGES, LOADER_DATA, pages, &mut address), what);
    let mut read = size as usize;
    check(((*file).read)(file, &mut read, address as *mut u8), what);
    if read != size as usize {
        check(usize::MAX, what);
    }
    ((*file).close)(file);
    (address, read)
}

#[no_mangle]
pub extern "efiapi" fn efi_main(image: Handle, system_table: *const SystemTable) -> Status {
    // SAFETY: the firmware passed a valid system table; boot services run until the kernel
    // leaves them.
    unsafe {
        let bs = &*(*system_table).boot_services;
        let mut loaded: *mut c_void = null_mut();
        check((bs.handle_protocol)(image, &LOADED_IMAGE, &mut loaded), "LoadedImage");
        let device = (*(loaded as *const LoadedImage)).device_handle;
        let mut fs: *mut c_void = null_mut();
        check((bs.handle_protocol)(device, &SIMPLE_FILE_SYSTEM, &mut fs), "SimpleFileSystem");
        let fs = fs as *mut SimpleFileSystem;
        let mut root = null_mut();
        check(((*fs).open_volume)(fs, &mut root), "OpenVolume");
        let (ramdisk, ramdisk_size) = read_file(bs, root, &RAMDISK_FILE, "reading the ramdisk");
        let mut descriptor = 0u64;
        check((bs.allocate_pages)(ALLOCATE_ANY_PAGES, LOADER_DATA, 1, &mut descriptor),
              "the ramdisk descriptor");
        let words = descriptor as *mut u64;
        words.write(RAMDISK_MAGIC);
        words.add(1).write(ramdisk);
        words.add(2).write(ramdisk_size as u64);
        check((bs.install_configuration_table)(&RAMDISK, descriptor as *mut c_void),
              "InstallConfigurationTable");
        let (kernel, kernel_size) = read_file(bs, root, &KERNEL_FILE, "reading the kernel");
        let mut buffer = [0u8; 18];
        say(&["[rxboot] ramdisk at ", hex(ramdisk, &mut buffer), ", starting the kernel\n"]);
        let mut handle = null_mut();
        check((bs.load_image)(0, image, core::ptr::null(), kernel as *const u8, kernel_size,
                              &mut handle), "LoadImage");
        // where the firmware put the kernel: an emulated boot of the same input is run there
        let mut kernel_image: *mut c_void = null_mut();
        check((bs.handle_protocol)(handle, &LOADED_IMAGE, &mut kernel_image), "LoadedImage");
        let kernel_image = &*(kernel_image as *const LoadedImage);
        let mut size = [0u8; 18];
        say(&["[rxboot] kernel image at ", hex(kernel_image.image_base, &mut buffer), ", ",
              hex(kernel_image.image_size, &mut size), " bytes\n"]);
        let mut exit_size = 0usize;
        check((bs.start_image)(handle, &mut exit_size, null_mut()), "StartImage");
        say(&["[rxboot] the kernel returned\n"]);
        halt()
    }
}

#[panic_handler]
fn panic(_info: &PanicInfo) -> ! {
    say(&["[rxboot] panic\n"]);
    halt()
}
