//! The memory routines the compiler expects from a C library. The bulk moves with
//! `rep movsq`/`rep stosq`, which emulators run far faster than byte loops.

use core::arch::asm;

/// # Safety
/// Same contract as C `memcpy`.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    copy_forward(dest, src, n);
    dest
}

/// # Safety
/// Same contract as C `memmove`.
#[no_mangle]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize).wrapping_sub(src as usize) >= n {
        copy_forward(dest, src, n);
    } else {
        copy_backward(dest, src, n);
    }
    dest
}

/// # Safety
/// Same contract as C `memset`.
#[no_mangle]
pub unsafe extern "C" fn memset(dest: *mut u8, c: i32, n: usize) -> *mut u8 {
    let pattern = u64::from(c as u8).wrapping_mul(0x0101_0101_0101_0101);
    asm!(
        "mov rcx, {n}",
        "shr rcx, 3",
        "rep stosq",
        "mov rcx, {n}",
        "and rcx, 7",
        "rep stosb",
        n = in(reg) n,
        inout("rdi") dest => _,
        in("rax") pattern,
        out("rcx") _,
        options(nostack),
    );
    dest
}

/// # Safety
/// Same contract as C `memcmp`.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        let (x, y) = (*a.add(i), *b.add(i));
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// # Safety
/// Same contract as C `bcmp`.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    memcmp(a, b, n)
}

#[inline(always)]
unsafe fn copy_forward(dest: *mut u8, src: *const u8, n: usize) {
    asm!(
        "mov rcx, {n}",
        "shr rcx, 3",
        "rep movsq",
        "mov rcx, {n}",
        "and rcx, 7",
        "rep movsb",
        n = in(reg) n,
        inout("rdi") dest => _,
        inout("rsi") src => _,
        out("rcx") _,
        options(nostack),
    );
}

/// Copies from the top down (for overlapping moves to a higher address): whole qwords of the
/// upper part first, then the `n % 8` bytes at the start.
#[inline(always)]
unsafe fn copy_backward(dest: *mut u8, src: *const u8, n: usize) {
    asm!(
        "mov {head}, rcx",
        "and {head}, 7",
        "shr rcx, 3",
        "lea rsi, [rsi + rcx*8 - 8]",
        "add rsi, {head}",
        "lea rdi, [rdi + rcx*8 - 8]",
        "add rdi, {head}",
        "std",
        "rep movsq",
        "add rsi, 7",
        "add rdi, 7",
        "mov rcx, {head}",
        "rep movsb",
        "cld",
        head = out(reg) _,
        inout("rcx") n => _,
        inout("rdi") dest => _,
        inout("rsi") src => _,
        options(nostack),
    );
}
