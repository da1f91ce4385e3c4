//! The kernel heap of the `upstream` build: the list allocator as public Rustux has it, with
//! its mechanics kept as they are (see BUGS.md, "upstream").
//!
//! One 16 MiB region at 0x300000 starts as a single free block. A block header holds the
//! block's size *including* the 40-byte header, a free flag, a magic value and the links of
//! the free list, which is kept last-in first-out. What makes this heap fail:
//!
//! - `allocate` marks the block it takes as allocated and clears its links *before* it
//!   unlinks it, so the unlink writes null into the predecessor (or the list head) and cuts
//!   the rest of the list off;
//! - the part left after the request becomes a new free block at the head of the list, but
//!   the taken block keeps its whole size: its header still claims the remainder;
//! - `deallocate` finds a block by walking headers from the heap base by their sizes; the
//!   first block claims (nearly) the whole heap, so any free marks the first block free and
//!   the next allocation hands out the heap base again while its memory is in use.

use core::alloc::{GlobalAlloc, Layout};
use core::ptr::null_mut;

pub const HEAP_START: usize = 0x30_0000;
pub const HEAP_SIZE: usize = 0x100_0000;
pub const MAGIC: u64 = 0xDEAD_BEEF_CAFE_BABE;
const MIN_BLOCK_SIZE: usize = HEADER_SIZE;
const ALIGN: usize = 8;

/// Payload address and size of the last allocation handed out: a block whose payload would
/// start inside it is skipped (and stays marked allocated).
static mut LAST_ALLOCATED: usize = 0;
static mut LAST_SIZE: usize = 0;

include!("heap_glue.rs");

unsafe fn write_header(block: *mut BlockHeader, size: usize, next: *mut BlockHeader) {
    block.write(BlockHeader {
        size,
        free: true,
        _pad: [0; 7],
        magic: MAGIC,
        prev: null_mut(),
        next,
    });
}

/// Puts `block` at the head of the free list.
unsafe fn push(block: *mut BlockHeader) {
    (*block).next = FREE_LIST;
    (*block).prev = null_mut();
    if !FREE_LIST.is_null() {
        (*FREE_LIST).prev = block;
    }
    FREE_LIST = block;
}

/// The free flag, read as a byte: a damaged header need not hold a valid bool.
unsafe fn is_free(block: *const BlockHeader) -> bool {
    *core::ptr::addr_of!((*block).free).cast::<u8>() != 0
}

impl LinkedListAllocator {
    unsafe fn init(&self) {
        let first = self.start as *mut BlockHeader;
        write_header(first, self.size, null_mut());
        FREE_LIST = first;
    }

    /// First fit over the free list.
    #[inline(never)]
    pub extern "C" fn allocate(&self, size: usize, align: usize) -> *mut u8 {
        if size == 0 {
            return null_mut();
        }
        let needed = size.wrapping_add(HEADER_SIZE).max(MIN_BLOCK_SIZE);
        let align = align.max(ALIGN);
        // SAFETY: single CPU; the list is trusted as it stands, as upstream trusts it.
        unsafe {
            let mut prev: *mut BlockHeader = null_mut();
            let mut current = FREE_LIST;
            while !current.is_null() {
                // where the search goes on if this block is passed over or skipped
                let following = (*current).next;
                if (*current).magic != MAGIC || !is_free(current) || (*current).size < needed {
                    prev = current;
                    current = following;
                    continue;
                }
                let payload = current as usize + HEADER_SIZE;
                let start = payload.wrapping_add(align - 1) & !(align - 1);
                let offset = start - current as usize;
                if (*current).size < offset.wrapping_add(size) {
                    prev = current;
                    current = following;
                    continue;
                }
                let remaining = (*current).size - offset - size;
                (*current).free = false;
                (*current).prev = null_mut();
                (*current).next = null_mut();
                // unlinking with the links already cleared: null goes into the predecessor
                if prev.is_null() {
                    FREE_LIST = (*current).next;
                } else {
                    (*prev).next = (*current).next;
                }
                if remaining >= MIN_BLOCK_SIZE * 4 {
                    // rounded up with the mask !(40 - 1), as upstream does: 40 is no power of
                    // two, so this is an 8-byte boundary, not a 40-byte one; the new block's
                    // size is not reduced by the rounding either
                    let raw = current as usize + offset + size;
                    let rest = (raw + HEADER_SIZE - 1) & !(HEADER_SIZE - 1);
                    write_header(rest as *mut BlockHeader, remaining, null_mut());
                    push(rest as *mut BlockHeader);
                }
                // the taken block's size is left as it was: its header still claims the rest
                if LAST_ALLOCATED != 0
                    && start >= LAST_ALLOCATED
                    && start < LAST_ALLOCATED.wrapping_add(LAST_SIZE)
                {
                    // the block stays marked allocated and is never handed out
                    prev = current;
                    current = following;
                    continue;
                }
                LAST_ALLOCATED = start;
                LAST_SIZE = size;
                return start as *mut u8;
            }
        }
        null_mut()
    }

    /// Finds the block holding `ptr` by walking the headers from the heap base, marks it free
    /// (merging it with a free neighbour) and puts it at the head of the free list.
    #[inline(never)]
    pub extern "C" fn deallocate(&self, ptr: *mut u8) {
        if ptr.is_null() {
            return;
        }
        let ptr = ptr as usize;
        // SAFETY: every header is checked for its magic before it is used.
        unsafe {
            let mut block = self.start as *mut BlockHeader;
            while (block as usize) < self.end() {
                if (*block).magic != MAGIC {
                    return;
                }
                let payload = block as usize + HEADER_SIZE;
                let end = (block as usize).wrapping_add((*block).size);
                if ptr == payload || (payload < ptr && ptr < end) {
                    (*block).free = true;
                    let next = (*block).next;
                    if !next.is_null() && (*next).magic == MAGIC && is_free(next) {
                        (*block).size += (*next).size;
                        (*block).next = (*next).next;
                        if !(*next).next.is_null() {
                            (*(*next).next).prev = block;
                        }
                    }
                    block = self.merge_with_previous(block);
                    push(block);
                    return;
                }
                block = end as *mut BlockHeader;
            }
        }
    }

    /// Merges `block` into a free block that ends where it starts, found by walking from the
    /// heap base; returns the block that now holds it.
    unsafe fn merge_with_previous(&self, block: *mut BlockHeader) -> *mut BlockHeader {
        let mut candidate = self.start as *mut BlockHeader;
        while (candidate as usize) < (block as usize) {
            if (*candidate).magic != MAGIC {
                break;
            }
            let end = (candidate as usize).wrapping_add((*candidate).size);
            if end == block as usize && is_free(candidate) {
                (*candidate).size += (*block).size;
                (*candidate).next = (*block).next;
                if !(*block).next.is_null() {
                    (*(*block).next).prev = candidate;
                }
                return candidate;
            }
            candidate = end as *mut BlockHeader;
        }
        block
    }
}
