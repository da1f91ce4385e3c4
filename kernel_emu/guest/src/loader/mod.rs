//! Loading `bin/init`: find the ramdisk the firmware handed over, find the file in it, load
//! the ELF and enter it in user mode.

pub mod elf;
#[cfg(not(rustux_upstream))]
pub mod notes;

use crate::efi::{Guid, SystemTable};
use crate::{arch, console::{Dec, Hex}, user::{self, AddressSpace}};

/// 7c1c9a6e-2b3d-4f7a-9e21-5258524d4653 in EFI_GUID byte order.
const RAMDISK_GUID: Guid = Guid([
    0x6e, 0x9a, 0x1c, 0x7c, 0x3d, 0x2b, 0x7a, 0x4f, 0x9e, 0x21, 0x52, 0x58, 0x52, 0x4d, 0x46, 0x53,
]);
/// "RRAMDISK" little-endian.
const DESCRIPTOR_MAGIC: u64 = 0x4b53_4944_4d41_5252;
const FS_MAGIC: &[u8; 8] = b"RXRAMFS1";
const FS_VERSION: u32 = 1;
const SUPERBLOCK_SIZE: usize = 32;
const FILE_HEADER_SIZE: usize = 32;
const INIT_PATH: &[u8] = b"bin/init";

#[repr(C)]
struct RamdiskDescriptor {
    magic: u64,
    base: u64,
    size: u64,
}

/// The first code that touches the ramdisk: everything before it is independent of the input.
#[cfg(not(rustux_upstream))] #[inline(never)]
pub fn load_init(system_table: *const SystemTable, space: AddressSpace) -> ! {
    let descriptor = find_descriptor(system_table);
    // SAFETY: the firmware's configuration table points at a descriptor in its own memory.
    let (magic, base, size) = unsafe { ((*descriptor).magic, (*descriptor).base, (*descriptor).size) };
    if magic != DESCRIPTOR_MAGIC {
        panic!("ramdisk descriptor has bad magic {:#x}", magic);
    }
    // SAFETY: the firmware maps the ramdisk identity and leaves it to the kernel.
    let image = unsafe { core::slice::from_raw_parts(base as *const u8, size as usize) };
    let file = match find_file(image, INIT_PATH) {
        Ok(file) => file,
        Err(reason) => panic!("ramdisk: {}", reason),
    };
    kline!("[elf] bin/init at ", Hex(file.as_ptr() as u64), ", ", Dec(file.len() as u64), " bytes");
    let loaded = match elf::load(file) {
        Ok(loaded) => loaded,
        Err(reason) => reject(reason),
    };
    // SAFETY: single CPU; the process keeps the loaded image from now on.
    unsafe { PROCESS = loaded };
    elf::log_segment_table(loaded);
    match notes::read(file) {
        Ok(count) => kline!("[elf] notes count=", Dec(count as u64)),
        Err(reason) => reject(reason),
    }
    match user::enter(loaded, space) {
        Ok(never) => match never {},
        Err(reason) => reject(reason),
    }
}

/// The loaded image of the running program (null until `bin/init` is loaded).
#[used]
pub static mut PROCESS: *mut elf::LoadedElf = core::ptr::null_mut();

#[used]
static SNAPSHOT_POINT: fn(*const SystemTable, AddressSpace) -> ! = load_init;

/// The loader refused the ELF: say why and stop.
pub fn reject(reason: &str) -> ! {
    kline!("rejected: ", reason);
    arch::halt_forever()
}

fn find_descriptor(system_table: *const SystemTable) -> *const RamdiskDescriptor {
    // SAFETY: the configuration table lives in runtime-services memory and outlives boot
    // services; only the GUIDs and pointers are read here.
    unsafe {
        let count = (*system_table).number_of_table_entries;
        let table = (*system_table).configuration_table;
        for i in 0..count {
            let entry = &*table.add(i);
            if entry.vendor_guid == RAMDISK_GUID {
                return entry.vendor_table.cast();
            }
        }
    }
    panic!("no ramdisk in the configuration table")
}

// One bounds check and one load per field rather than one per byte: the callers have already
// checked that the superblock or file header they read lies inside the image.
fn read_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(*bytes[at..].first_chunk().expect("ramdisk field outside the image"))
}

fn read_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(*bytes[at..].first_chunk().expect("ramdisk field outside the image"))
}

/// `start..start + len` of `image` if it lies inside.
fn range(image: &[u8], start: u64, len: u64) -> Option<&[u8]> {
    let start = usize::try_from(start).ok()?;
    let end = start.checked_add(usize::try_from(len).ok()?)?;
    image.get(start..end)
}

/// The data of the file called `name`, in place.
fn find_file<'a>(image: &'a [u8], name: &[u8]) -> Result<&'a [u8], &'static str> {
    if image.len() < SUPERBLOCK_SIZE || &image[..8] != FS_MAGIC {
        return Err("bad superblock magic");
    }
    if read_u32(image, 8) != FS_VERSION {
        return Err("unsupported version");
    }
    let file_count = u64::from(read_u32(image, 12));
    let total_size = read_u64(image, 16);
    let headers_offset = read_u64(image, 24);
    let image = range(image, 0, total_size).ok_or("total size exceeds the ramdisk")?;
    let headers = file_count
        .checked_mul(FILE_HEADER_SIZE as u64)
        .and_then(|len| range(image, headers_offset, len))
        .ok_or("file headers outside the image")?;
    for header in headers.chunks_exact(FILE_HEADER_SIZE) {
        let name_offset = u64::from(read_u32(header, 0));
        let name_len = u64::from(read_u32(header, 4));
        let data_offset = read_u64(header, 8);
        let data_size = read_u64(header, 16);
        let file_name = range(image, name_offset, name_len).ok_or("file name outside the image")?;
        if file_name == name {
            return range(image, data_offset, data_size).ok_or("file data outside the image");
        }
    }
    Err("bin/init not found")
}

// The upstream build takes `bin/init` from a program embedded in the kernel image, not from
// the firmware's ramdisk (the items above are then unused).
#[cfg(rustux_upstream)]
mod embedded;
#[cfg(rustux_upstream)]
pub use embedded::load_init;
