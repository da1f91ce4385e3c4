//! Memory management: physical pages, page tables, the kernel stack and the heap.

pub mod frame;
#[cfg(not(rustux_upstream))] pub mod heap;
pub mod paging;

pub const PAGE_SIZE: u64 = 4096;
pub const KERNEL_STACK_PAGES: u64 = 64;
pub const KERNEL_STACK_SIZE: u64 = KERNEL_STACK_PAGES * PAGE_SIZE;
/// Enough for the page tables, user stack and a few segment pages of a small init.
pub const PREZEROED_PAGES: u64 = 64;

/// Lowest usable address of the 256 KiB kernel stack (the guard page is just below it).
#[used]
pub static mut KERNEL_STACK_BASE: u64 = 0;

/// Takes a guard page plus the stack pages, makes the guard page not present in the current
/// (firmware) page tables and returns the stack top.
pub fn allocate_kernel_stack() -> u64 {
    let guard = frame::alloc_contiguous(KERNEL_STACK_PAGES + 1);
    let base = guard + PAGE_SIZE;
    // SAFETY: boot services are gone, so CR3 and the pages it maps belong to the kernel; the
    // guard page is fresh and nothing uses it.
    unsafe {
        paging::unmap_current(guard);
        KERNEL_STACK_BASE = base;
    }
    base + KERNEL_STACK_SIZE
}

// the upstream build's heap: the allocator as public Rustux has it
#[cfg(rustux_upstream)]
#[path = "heap_upstream.rs"]
pub mod heap;
