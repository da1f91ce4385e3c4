//! Rustux: a small amd64 kernel that boots as a UEFI application, switches to its own stack,
//! runs a first-fit heap at 0x300000 and loads `bin/init` from the firmware's ramdisk.
//!
//! Two builds come from this source: the default one keeps the loader and allocator as the
//! development plan describes them; `--cfg rustux_fixed` applies the fixes (see BUGS.md).

#![no_std]
#![no_main]

extern crate alloc;

#[macro_use]
mod canary;
#[macro_use]
mod console;
#[macro_use]
mod arch;
mod boot;
mod efi;
#[cfg_attr(rustux_upstream, allow(dead_code, unused_imports))] mod loader;
mod mem;
mod mm;
mod sync;
mod user;

use core::panic::PanicInfo;

/// Entered by the firmware like a UEFI application (Microsoft x64 convention).
#[no_mangle]
pub extern "efiapi" fn efi_main(image_handle: usize, system_table: *const efi::SystemTable) -> usize {
    arch::disable_interrupts();
    boot::start(image_handle, system_table)
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    arch::disable_interrupts();
    match info.location() {
        Some(loc) => kprintln!("[PANIC] {} at {}:{}", info.message(), loc.file(), loc.line()),
        None => kprintln!("[PANIC] {} at <unknown>:0", info.message()),
    }
    arch::halt_forever()
}

/// liballoc is compiled for unwinding and still names the personality routine; with
/// `panic=abort` it is never called.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}
