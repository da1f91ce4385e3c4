//! 4-level page tables. Page tables are reached through the identity mapping the firmware
//! set up, which stays in CR3 until the kernel enters user mode.

use super::{frame, PAGE_SIZE};
use crate::arch;

pub const PRESENT: u64 = 1 << 0;
pub const WRITABLE: u64 = 1 << 1;
pub const USER: u64 = 1 << 2;
pub const HUGE: u64 = 1 << 7;
pub const NO_EXECUTE: u64 = 1 << 63;
pub const ADDRESS_MASK: u64 = 0x000f_ffff_ffff_f000;

const ENTRIES: u64 = 512;

fn index(vaddr: u64, shift: u32) -> usize {
    ((vaddr >> shift) & (ENTRIES - 1)) as usize
}

/// The level-1 entry for `vaddr` under `root`. Missing tables are created when `create` (as
/// present, writable, user: the leaf decides), otherwise null is returned. Large pages on the
/// way are split into 4 KiB pages with the same rights.
///
/// # Safety
/// `root` must be a page-table root reachable through the identity mapping.
pub unsafe fn entry_for(root: u64, vaddr: u64, create: bool) -> *mut u64 {
    let mut table = root & ADDRESS_MASK;
    for shift in [39u32, 30, 21] {
        let entry = (table as *mut u64).add(index(vaddr, shift));
        let value = *entry;
        table = if value & PRESENT == 0 {
            if !create {
                return core::ptr::null_mut();
            }
            let new = frame::alloc_zeroed_page();
            *entry = new | PRESENT | WRITABLE | USER;
            new
        } else if value & HUGE != 0 && shift != 39 {
            split_large(entry, shift)
        } else {
            value & ADDRESS_MASK
        };
    }
    (table as *mut u64).add(index(vaddr, 12))
}

/// Replaces a 1 GiB or 2 MiB mapping by a table of 512 mappings one level smaller.
unsafe fn split_large(entry: *mut u64, shift: u32) -> u64 {
    let value = *entry;
    let child_size = 1u64 << (shift - 9);
    let base = value & ADDRESS_MASK & !((1u64 << shift) - 1);
    let rights = value & (0x1ff | NO_EXECUTE) & !HUGE;
    let child_huge = if shift == 30 { HUGE } else { 0 };
    let table = frame::alloc_zeroed_page();
    for i in 0..ENTRIES {
        *(table as *mut u64).add(i as usize) = (base + i * child_size) | rights | child_huge;
    }
    *entry = table | (value & (PRESENT | WRITABLE | USER));
    table
}

/// Clears PRESENT for the page at `vaddr` in the active page tables: the firmware's, which
/// real firmware maps read-only (so the edit is made with write protection off).
///
/// # Safety
/// Nothing may use the page afterwards.
pub unsafe fn unmap_current(vaddr: u64) {
    arch::without_write_protect(|| {
        let entry = entry_for(arch::read_cr3(), vaddr, false);
        if entry.is_null() {
            panic!("no page-table entry for {:#x}", vaddr);
        }
        *entry &= !PRESENT;
    });
    arch::invlpg(vaddr);
}

/// Maps [start, end) onto the same physical addresses under `root`.
///
/// # Safety
/// `root` must be a page-table root being built by the caller.
pub unsafe fn map_identity(root: u64, start: u64, end: u64, flags: u64) {
    let mut page = start & !(PAGE_SIZE - 1);
    while page < end {
        // one walk per page table, then fill its entries up to the next 2 MiB boundary
        let first = entry_for(root, page, true);
        let stop = end.min(((page >> 21) + 1) << 21);
        let mut i = 0;
        while page < stop {
            *first.add(i) = page | flags;
            page += PAGE_SIZE;
            i += 1;
        }
    }
}
