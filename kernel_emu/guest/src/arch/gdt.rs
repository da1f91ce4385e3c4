//! Global descriptor table: flat 64-bit kernel and user segments in the order SYSRET expects.

use core::arch::global_asm;

use crate::sync::KCell;

pub const KERNEL_CODE: u16 = 0x08;
pub const KERNEL_DATA: u16 = 0x10;
pub const USER_DATA: u16 = 0x18 | 3;
pub const USER_CODE: u16 = 0x20 | 3;

/// Accessed bits are preset so the CPU never writes to the table.
static GDT: KCell<[u64; 5]> = KCell::new([
    0,
    0x00af_9b00_0000_ffff, // 0x08 kernel code, 64-bit, DPL 0
    0x00cf_9300_0000_ffff, // 0x10 kernel data, DPL 0
    0x00cf_f300_0000_ffff, // 0x18 user data, DPL 3
    0x00af_fb00_0000_ffff, // 0x20 user code, 64-bit, DPL 3
]);

#[repr(C, packed)]
pub struct DescriptorPointer {
    pub limit: u16,
    pub base: u64,
}

// rustux_load_gdt(pointer: *const DescriptorPointer): lgdt, reload CS with a far return,
// then the data segment registers.
global_asm!(
    asm_function_begin!("rustux_load_gdt"),
    "rustux_load_gdt:",
    "lgdt [rdi]",
    "push {code}",
    "lea rax, [rip + 2f]",
    "push rax",
    "retfq",
    "2:",
    "mov eax, {data}",
    "mov ds, eax",
    "mov es, eax",
    "mov ss, eax",
    "xor eax, eax",
    "mov fs, eax",
    "mov gs, eax",
    "ret",
    asm_function_end!("rustux_load_gdt"),
    code = const KERNEL_CODE,
    data = const KERNEL_DATA,
);

// assembly, System V convention on every target
extern "sysv64" {
    fn rustux_load_gdt(pointer: *const DescriptorPointer);
}

pub fn init() {
    let pointer = DescriptorPointer {
        limit: (core::mem::size_of::<[u64; 5]>() - 1) as u16,
        base: GDT.get() as u64,
    };
    // SAFETY: the table is static and its descriptors are valid flat segments.
    unsafe { rustux_load_gdt(&pointer) };
}
