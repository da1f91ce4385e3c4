//! Kernel log: the debug console at port 0xE9 (one line per record) and, while boot services
//! run, the firmware's text console. Nothing here allocates.

use core::fmt;

use crate::efi::SystemTable;

pub const DEBUG_PORT: u16 = 0xE9;

pub struct DebugPort;

impl fmt::Write for DebugPort {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &byte in s.as_bytes() {
            // SAFETY: writing the debug console port has no effect on memory.
            unsafe { crate::arch::outb(DEBUG_PORT, byte) };
        }
        Ok(())
    }
}

pub fn print_args(args: fmt::Arguments) {
    let _ = fmt::Write::write_fmt(&mut DebugPort, args);
}

macro_rules! kprintln {
    ($($arg:tt)*) => {
        $crate::console::print_args(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// Writes `text` through ConOut.OutputString, converting to UCS-2 in small stack chunks.
///
/// # Safety
/// `system_table` must be the firmware's table and boot services must still be running.
pub unsafe fn firmware_print(system_table: *const SystemTable, text: &str) {
    let con_out = (*system_table).con_out;
    if con_out.is_null() {
        return;
    }
    let output = (*con_out).output_string;
    let mut chunk = [0u16; 64];
    let mut len = 0;
    for ch in text.chars() {
        if ch == '\n' {
            chunk[len] = u16::from(b'\r');
            len += 1;
        }
        let unit = u32::from(ch);
        chunk[len] = if unit < 0x1_0000 { unit as u16 } else { u16::from(b'?') };
        len += 1;
        if len >= chunk.len() - 3 {
            chunk[len] = 0;
            output(con_out, chunk.as_ptr());
            len = 0;
        }
    }
    if len > 0 {
        chunk[len] = 0;
        output(con_out, chunk.as_ptr());
    }
}
