//! Interrupt descriptor table. Every vector reports itself on the debug console and halts: the
//! kernel never enables interrupts and treats any exception as fatal.

use core::arch::{asm, global_asm};

use super::gdt::{DescriptorPointer, KERNEL_CODE};
use crate::sync::KCell;

#[repr(C)]
#[derive(Clone, Copy)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    attributes: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

const MISSING: Gate = Gate {
    offset_low: 0,
    selector: 0,
    ist: 0,
    attributes: 0,
    offset_mid: 0,
    offset_high: 0,
    reserved: 0,
};

/// Present, DPL 0, 64-bit interrupt gate.
const INTERRUPT_GATE: u8 = 0x8e;

/// Vector number reported for the interrupts above the architectural exceptions.
const OTHER_VECTOR: u64 = 256;

static IDT: KCell<[Gate; 256]> = KCell::new([MISSING; 256]);

macro_rules! stub_without_code {
    ($n:literal) => {
        concat!("rustux_isr_", stringify!($n), ":\n push 0\n push ", stringify!($n),
                "\n jmp rustux_isr_common\n")
    };
}

macro_rules! stub_with_code {
    ($n:literal) => {
        concat!("rustux_isr_", stringify!($n), ":\n push ", stringify!($n),
                "\n jmp rustux_isr_common\n")
    };
}

macro_rules! table_entry {
    ($($n:literal)*) => { concat!($(".quad rustux_isr_", stringify!($n), "\n",)*) };
}

// Stack at rustux_isr_common: vector, error code (or 0), RIP, CS, RFLAGS, RSP, SS.
global_asm!(
    asm_section_begin!("rustux_isr"),
    stub_without_code!(0), stub_without_code!(1), stub_without_code!(2),
    stub_without_code!(3), stub_without_code!(4), stub_without_code!(5),
    stub_without_code!(6), stub_without_code!(7), stub_with_code!(8),
    stub_without_code!(9), stub_with_code!(10), stub_with_code!(11),
    stub_with_code!(12), stub_with_code!(13), stub_with_code!(14),
    stub_without_code!(15), stub_without_code!(16), stub_with_code!(17),
    stub_without_code!(18), stub_without_code!(19), stub_without_code!(20),
    stub_with_code!(21), stub_without_code!(22), stub_without_code!(23),
    stub_without_code!(24), stub_without_code!(25), stub_without_code!(26),
    stub_without_code!(27), stub_without_code!(28), stub_with_code!(29),
    stub_with_code!(30), stub_without_code!(31),
    stub_without_code!(256),
    "rustux_isr_common:",
    "mov rdi, [rsp]",
    "mov rsi, [rsp + 8]",
    "mov rdx, [rsp + 16]",
    "and rsp, -16",
    "call {handler}",
    "ud2",
    ".popsection",
    asm_rodata_begin!("rustux_isr_table"),
    ".balign 8",
    ".global rustux_isr_table",
    "rustux_isr_table:",
    table_entry!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28
                 29 30 31 256),
    ".popsection",
    handler = sym exception,
);

extern "C" {
    /// Entry points of the stubs for vectors 0..=31, then the shared one for 32..=255.
    static rustux_isr_table: [u64; 33];
}

// called from the assembly stubs with the System V convention, whatever the target's own
extern "sysv64" fn exception(vector: u64, error_code: u64, rip: u64) -> ! {
    if vector == OTHER_VECTOR {
        kprintln!("[PANIC] exception {} (unexpected interrupt) rip={:#x}", vector, rip);
    } else {
        kprintln!(
            "[PANIC] exception {} error={:#x} rip={:#x} cr2={:#x}",
            vector,
            error_code,
            rip,
            super::read_cr2()
        );
    }
    super::halt_forever()
}

pub fn init() {
    // SAFETY: runs once during boot with interrupts off; the table is static.
    unsafe {
        let idt = &mut *IDT.get();
        for (vector, gate) in idt.iter_mut().enumerate() {
            let handler = rustux_isr_table[vector.min(32)];
            *gate = Gate {
                offset_low: handler as u16,
                selector: KERNEL_CODE,
                ist: 0,
                attributes: INTERRUPT_GATE,
                offset_mid: (handler >> 16) as u16,
                offset_high: (handler >> 32) as u32,
                reserved: 0,
            };
        }
        let pointer = DescriptorPointer {
            limit: (core::mem::size_of::<[Gate; 256]>() - 1) as u16,
            base: IDT.get() as u64,
        };
        asm!("lidt [{}]", in(reg) &pointer, options(readonly, nostack, preserves_flags));
    }
}
