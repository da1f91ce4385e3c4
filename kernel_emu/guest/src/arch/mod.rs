//! CPU-level primitives: port I/O, control registers, TLB, stack switch, descriptor tables.

// `global_asm!` directives in the target's object format: ELF for the kernel linked at its
// address, COFF for the UEFI application (PE32+), where sections carry no type and symbols no
// size.
#[cfg(not(target_os = "uefi"))]
macro_rules! asm_function_begin {
    ($name:literal) => {
        concat!(".pushsection .text.", $name, ",\"ax\",@progbits\n.type ", $name, ",@function")
    };
}
#[cfg(target_os = "uefi")]
macro_rules! asm_function_begin {
    ($name:literal) => {
        concat!(".pushsection .text$", $name, ",\"xr\"")
    };
}
#[cfg(not(target_os = "uefi"))]
macro_rules! asm_function_end {
    ($name:literal) => {
        concat!(".size ", $name, ", . - ", $name, "\n.popsection")
    };
}
#[cfg(target_os = "uefi")]
macro_rules! asm_function_end {
    ($name:literal) => {
        ".popsection"
    };
}
#[cfg(not(target_os = "uefi"))]
macro_rules! asm_rodata_begin {
    ($name:literal) => {
        concat!(".pushsection .rodata.", $name, ",\"a\",@progbits")
    };
}
#[cfg(target_os = "uefi")]
macro_rules! asm_rodata_begin {
    ($name:literal) => {
        concat!(".pushsection .rdata$", $name, ",\"dr\"")
    };
}
#[cfg(not(target_os = "uefi"))]
macro_rules! asm_section_begin {
    ($name:literal) => {
        concat!(".pushsection .text.", $name, ",\"ax\",@progbits")
    };
}
#[cfg(target_os = "uefi")]
macro_rules! asm_section_begin {
    ($name:literal) => {
        asm_function_begin!($name)
    };
}

pub mod gdt;
pub mod idt;

use core::arch::asm;

/// Writes every byte of `bytes` to `port` with one `rep outsb`: a single instruction however
/// long the string, where a loop of `out`s costs a load, a compare and a branch per byte.
///
/// # Safety
/// Port writes can have device side effects; only use ports the firmware contract names.
#[inline(always)]
pub unsafe fn out_bytes(port: u16, bytes: &[u8]) {
    // DF is clear on entry to any Rust code (System V ABI), so outsb walks forwards.
    asm!(
        "rep outsb",
        inout("rsi") bytes.as_ptr() => _,
        inout("rcx") bytes.len() => _,
        in("dx") port,
        options(readonly, nostack, preserves_flags),
    );
}

#[inline(always)]
pub fn disable_interrupts() {
    // SAFETY: clearing IF only masks external interrupts.
    unsafe { asm!("cli", options(nomem, nostack)) };
}

pub fn halt_forever() -> ! {
    loop {
        // SAFETY: stops the CPU with interrupts masked.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

const CR0_WRITE_PROTECT: u64 = 1 << 16;

/// Runs `edit` with CR0.WP clear: supervisor writes then ignore read-only mappings. Real
/// firmware (OVMF) maps its page tables read-only, and the kernel edits them once, before it
/// builds tables of its own.
///
/// # Safety
/// `edit` must only write what the kernel owns; interrupts must be off.
pub unsafe fn without_write_protect<R>(edit: impl FnOnce() -> R) -> R {
    let cr0: u64;
    asm!("mov {}, cr0", out(reg) cr0, options(nomem, nostack, preserves_flags));
    asm!("mov cr0, {}", in(reg) cr0 & !CR0_WRITE_PROTECT, options(nostack, preserves_flags));
    let result = edit();
    asm!("mov cr0, {}", in(reg) cr0, options(nostack, preserves_flags));
    result
}

pub fn read_cr3() -> u64 {
    let value: u64;
    // SAFETY: reading CR3 has no side effects.
    unsafe { asm!("mov {}, cr3", out(reg) value, options(nomem, nostack, preserves_flags)) };
    value
}

pub fn read_cr2() -> u64 {
    let value: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) value, options(nomem, nostack, preserves_flags)) };
    value
}

/// # Safety
/// The caller has just changed the page-table entry for `addr`.
pub unsafe fn invlpg(addr: u64) {
    asm!("invlpg [{}]", in(reg) addr, options(nostack, preserves_flags));
}

/// Moves RSP to `top` and jumps to `continuation`, never coming back: nothing of the old
/// stack frame is used again. A zero return address is pushed so the continuation starts with
/// the stack alignment of an ordinary call. The continuation is a System V function on every
/// target: the Microsoft convention would let it write 32 bytes of shadow space above `top`.
///
/// # Safety
/// `top` must be the 16-byte aligned top of a mapped, unused stack.
pub unsafe fn switch_stack(top: u64, continuation: extern "sysv64" fn() -> !) -> ! {
    asm!(
        "mov rsp, {top}",
        "xor ebp, ebp",
        "push rbp",
        "jmp {cont}",
        top = in(reg) top,
        cont = in(reg) continuation,
        options(noreturn),
    );
}
