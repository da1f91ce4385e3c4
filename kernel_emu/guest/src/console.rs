//! Kernel log: the debug console at port 0xE9 (one line per record) and, while boot services
//! run, the firmware's text console. Nothing here allocates.
//!
//! Two ways to write a record. `kprintln!` goes through `core::fmt` and suits the boot and
//! panic messages, which run once. `kline!` is for the records of the load path, which run for
//! every `bin/init`: it assembles the line in a stack buffer from string pieces, `Hex` and
//! `Dec` numbers and sends it with one port write. Both print numbers the same way: `Hex(v)`
//! as `{:#x}` does (`0x`, lowercase digits, no padding), `Dec(v)` as `{}` does.

use core::fmt;
use core::mem::MaybeUninit;

use crate::efi::SystemTable;

pub const DEBUG_PORT: u16 = 0xE9;

pub struct DebugPort;

impl fmt::Write for DebugPort {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_bytes(s.as_bytes());
        Ok(())
    }
}

#[inline(always)]
fn write_bytes(bytes: &[u8]) {
    // SAFETY: writing the debug console port has no effect on memory.
    unsafe { crate::arch::out_bytes(DEBUG_PORT, bytes) };
}

pub fn print_args(args: fmt::Arguments) {
    let _ = fmt::Write::write_fmt(&mut DebugPort, args);
}

macro_rules! kprintln {
    ($($arg:tt)*) => {
        $crate::console::print_args(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// One log record from pieces (`&str`, `Hex`, `Dec`), newline added, written at once:
/// `kline!("[elf] entry=", Hex(entry))`.
macro_rules! kline {
    ($($piece:expr),+ $(,)?) => {{
        let mut buffer = $crate::console::LineBuffer::new();
        let mut line = $crate::console::Line::new(&mut buffer);
        $( $crate::console::Piece::put($piece, &mut line); )+
        line.end();
    }};
}

/// Holds the longest record of the load path (a segment line with five 64-bit values is
/// under 170 bytes); a longer one is written in several pieces, which reads the same on the
/// console.
const LINE_CAPACITY: usize = 192;
/// "0x" and 16 digits.
const HEX_MAX: usize = 18;
/// u64::MAX has 20 decimal digits.
const DEC_MAX: usize = 20;

/// Stack storage for a `Line`, left uninitialised: only what the line wrote is ever read.
pub struct LineBuffer([MaybeUninit<u8>; LINE_CAPACITY]);

impl LineBuffer {
    #[inline(always)]
    pub fn new() -> Self {
        LineBuffer([const { MaybeUninit::uninit() }; LINE_CAPACITY])
    }
}

/// A record being assembled. The buffer is a separate object so that the compiler can keep
/// `len` in a register: stores of digits through `buf` cannot reach it.
pub struct Line<'a> {
    buf: &'a mut LineBuffer,
    len: usize,
}

impl<'a> Line<'a> {
    #[inline(always)]
    pub fn new(buf: &'a mut LineBuffer) -> Self {
        Line { buf, len: 0 }
    }

    #[inline(always)]
    fn as_bytes(&self) -> &[u8] {
        // SAFETY: the first `len` bytes were written by the push methods.
        unsafe { core::slice::from_raw_parts(self.buf.0.as_ptr().cast::<u8>(), self.len) }
    }

    /// Where the next `n` bytes go (`n <= LINE_CAPACITY`), after sending what is already
    /// there if they would not fit.
    #[inline(always)]
    fn reserve(&mut self, n: usize) -> *mut u8 {
        if self.len + n > LINE_CAPACITY {
            send(self.as_bytes());
            self.len = 0;
        }
        // SAFETY: len <= LINE_CAPACITY - n, so the pointer and the n bytes after it are in
        // the buffer.
        unsafe { self.buf.0.as_mut_ptr().add(self.len).cast::<u8>() }
    }

    #[inline(always)]
    pub fn push_str(&mut self, s: &str) {
        let bytes = s.as_bytes();
        if bytes.len() > LINE_CAPACITY {
            send(self.as_bytes());
            self.len = 0;
            send(bytes);
            return;
        }
        let at = self.reserve(bytes.len());
        // SAFETY: `reserve` made room for the bytes; a &str never overlaps the stack buffer.
        unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), at, bytes.len()) };
        self.len += bytes.len();
    }

    /// `value` as `{:#x}` formats it. The digits are made eight at a time and stored with
    /// 8-byte writes, the significant ones first; the bytes after them are scratch that the
    /// next piece overwrites or `len` leaves out.
    #[inline(always)]
    pub fn push_hex(&mut self, value: u64) {
        // at least one digit, so 0 prints as 0x0
        let digits = (64 - (value | 1).leading_zeros()).div_ceil(4);
        let at = self.reserve(HEX_MAX);
        // SAFETY: `reserve` made room for HEX_MAX = 2 + 16 bytes.
        unsafe {
            at.cast::<[u8; 2]>().write_unaligned(*b"0x");
            if digits <= 8 {
                let top = (value as u32) << (32 - 4 * digits);
                at.add(2).cast::<u64>().write_unaligned(hex_ascii(top));
            } else {
                let top = value << (64 - 4 * digits);
                at.add(2).cast::<u64>().write_unaligned(hex_ascii((top >> 32) as u32));
                at.add(10).cast::<u64>().write_unaligned(hex_ascii(top as u32));
            }
        }
        self.len += 2 + digits as usize;
    }

    /// `value` as `{}` formats it.
    #[inline(always)]
    pub fn push_dec(&mut self, value: u64) {
        let mut digits = 1;
        let mut rest = value / 10;
        while rest != 0 {
            digits += 1;
            rest /= 10;
        }
        let at = self.reserve(DEC_MAX);
        // SAFETY: `reserve` made room for DEC_MAX >= digits bytes.
        unsafe {
            let mut rest = value;
            let mut i = digits;
            while i > 0 {
                i -= 1;
                *at.add(i) = b'0' + (rest % 10) as u8;
                rest /= 10;
            }
        }
        self.len += digits;
    }

    /// Adds the newline and sends the record.
    #[inline(always)]
    pub fn end(&mut self) {
        self.push_str("\n");
        write_bytes(self.as_bytes());
    }
}

/// The eight hex digits of `x`, most significant first, as the ASCII bytes of a
/// little-endian u64. Each nibble is spread into its own byte, then turned into '0'..'9' or
/// 'a'..'f' in all bytes at once.
#[inline(always)]
fn hex_ascii(x: u32) -> u64 {
    const LOW_NIBBLES: u64 = 0x0f0f_0f0f_0f0f_0f0f;
    const ONES: u64 = 0x0101_0101_0101_0101;
    let mut v = u64::from(x);
    v = (v | (v << 16)) & 0x0000_ffff_0000_ffff;
    v = (v | (v << 8)) & 0x00ff_00ff_00ff_00ff;
    v = (v | (v << 4)) & LOW_NIBBLES;
    // byte i now holds nibble i; the most significant one must come first in memory
    v = v.swap_bytes();
    // 1 in the bytes holding 10..15: adding 6 carries them into bit 4
    let letters = ((v + 6 * ONES) >> 4) & ONES;
    v + u64::from(b'0') * ONES + letters * u64::from(b'a' - b'0' - 10)
}

/// Sends part of a record that outgrew its buffer: rare, so kept off the hot path.
#[cold]
#[inline(never)]
fn send(bytes: &[u8]) {
    write_bytes(bytes);
}

/// A number printed as `{:#x}` would.
#[derive(Clone, Copy)]
pub struct Hex(pub u64);

/// A number printed as `{}` would.
#[derive(Clone, Copy)]
pub struct Dec(pub u64);

/// Something `kline!` can append to a record.
pub trait Piece {
    fn put(self, line: &mut Line);
}

impl Piece for &str {
    #[inline(always)]
    fn put(self, line: &mut Line) {
        line.push_str(self);
    }
}

impl Piece for Hex {
    #[inline(always)]
    fn put(self, line: &mut Line) {
        line.push_hex(self.0);
    }
}

impl Piece for Dec {
    #[inline(always)]
    fn put(self, line: &mut Line) {
        line.push_dec(self.0);
    }
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
