//! The upstream build's `bin/init`: an ELF embedded in the kernel image when it is built, as
//! public Rustux embeds its first program, instead of a file of the firmware's ramdisk.
//!
//! The bytes sit in the image's data, in a blob with room for a larger program than the
//! default one (`init/init.elf`): a 64-bit size, then the bytes. The kernel reads them as they
//! are in memory when it gets here, so a fuzzer replaces them before this point.

use core::ptr::{addr_of, read_volatile};

use super::elf;
use crate::console::{Dec, Hex};
use crate::efi::SystemTable;
use crate::user::{self, AddressSpace};

pub const CAPACITY: usize = 0x10_0000;
const DEFAULT: &[u8] = include_bytes!("../../init/init.elf");

#[repr(C)]
pub struct EmbeddedInit {
    pub size: u64,
    pub bytes: [u8; CAPACITY],
}

const fn with_default() -> EmbeddedInit {
    let mut blob = EmbeddedInit { size: DEFAULT.len() as u64, bytes: [0; CAPACITY] };
    let mut i = 0;
    while i < DEFAULT.len() {
        blob.bytes[i] = DEFAULT[i];
        i += 1;
    }
    blob
}

/// Read by the emulator through its symbol; mutable, so the bytes are read from memory.
#[used]
pub static mut EMBEDDED_INIT: EmbeddedInit = with_default();

/// The first code that touches the embedded program: everything before it is independent of
/// the input.
#[inline(never)]
pub fn load_init(_system_table: *const SystemTable, space: AddressSpace) -> ! {
    // SAFETY: the blob is the kernel's own data and nothing else uses it; the size is capped
    // by the capacity.
    let file = unsafe {
        let blob = addr_of!(EMBEDDED_INIT);
        let size = (read_volatile(addr_of!((*blob).size)) as usize).min(CAPACITY);
        core::slice::from_raw_parts(addr_of!((*blob).bytes).cast::<u8>(), size)
    };
    kline!("[elf] bin/init at ", Hex(file.as_ptr() as u64), ", ", Dec(file.len() as u64), " bytes");
    let loaded = match elf::load(file) {
        Ok(loaded) => loaded,
        Err(reason) => super::reject(reason),
    };
    // SAFETY: single CPU; the process keeps the loaded image from now on.
    unsafe { super::PROCESS = loaded };
    elf::log_segment_table(loaded);
    match user::enter(loaded, space) {
        Ok(never) => match never {},
        Err(reason) => super::reject(reason),
    }
}
