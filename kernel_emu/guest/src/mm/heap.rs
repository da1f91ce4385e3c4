//! The kernel heap: a first-fit allocator over one 16 MiB region at 0x300000.
//!
//! Blocks lie back to back from the heap base: a 40-byte header, then `size` payload bytes,
//! then the next header; sizes plus headers always add up to the whole heap. Free blocks are
//! also linked, in address order, into a doubly linked list headed by `FREE_LIST`. Allocated
//! blocks have `free == false` and null links. A header's `size` is its payload's.

use core::alloc::{GlobalAlloc, Layout};
use core::ptr::null_mut;

pub const HEAP_START: usize = 0x30_0000;
pub const HEAP_SIZE: usize = 0x100_0000;
/// "RHEAPBLK" in little-endian byte order.
pub const MAGIC: u64 = 0x4b4c_4250_4145_4852;
pub const MIN_BLOCK_SIZE: usize = HEADER_SIZE;
const ALIGN: usize = 8;

/// A block is split when the space left after the request can hold at least this much
/// (header included); otherwise the whole block is handed out.
#[cfg(not(rustux_fixed))]
const SPLIT_THRESHOLD: usize = MIN_BLOCK_SIZE * 4;
#[cfg(rustux_fixed)]
const SPLIT_THRESHOLD: usize = MIN_BLOCK_SIZE + ALIGN;

include!("heap_glue.rs");

unsafe fn write_header(
    block: *mut BlockHeader,
    size: usize,
    free: bool,
    prev: *mut BlockHeader,
    next: *mut BlockHeader,
) {
    block.write(BlockHeader { size, free, _pad: [0; 7], magic: MAGIC, prev, next });
}

unsafe fn payload(block: *mut BlockHeader) -> *mut u8 {
    block.cast::<u8>().add(HEADER_SIZE)
}

/// The block that physically follows `block`.
unsafe fn following(block: *mut BlockHeader) -> *mut BlockHeader {
    payload(block).add((*block).size).cast()
}

impl LinkedListAllocator {
    /// The single free block spanning the heap.
    unsafe fn init(&self) {
        let first = self.start as *mut BlockHeader;
        write_header(first, self.size - HEADER_SIZE, true, null_mut(), null_mut());
        FREE_LIST = first;
    }

    /// First fit over the free list. `size` is rounded up to 8; alignments above 8 are not
    /// supported and get null.
    #[inline(never)]
    pub extern "C" fn allocate(&self, size: usize, align: usize) -> *mut u8 {
        if align > ALIGN {
            return null_mut();
        }
        let size = match size.max(1).checked_add(ALIGN - 1) {
            Some(padded) => padded & !(ALIGN - 1),
            None => return null_mut(),
        };
        // SAFETY: single CPU; every block on the list is checked before use.
        unsafe {
            let mut block = FREE_LIST;
            while !block.is_null() {
                self.check_block(block, true);
                if (*block).size >= size {
                    let remaining = (*block).size - size;
                    if remaining >= SPLIT_THRESHOLD {
                        let rest = payload(block).add(size).cast::<BlockHeader>();
                        write_header(rest, remaining - HEADER_SIZE, true, (*block).prev, (*block).next);
                        self.replace_in_list(block, rest);
                        (*block).size = size;
                    } else {
                        // the whole block goes: the seed's threshold leaves the list empty sooner
                        canary!(RX_01, false);
                        self.unlink(block);
                    }
                    (*block).free = false;
                    (*block).prev = null_mut();
                    (*block).next = null_mut();
                    return payload(block);
                }
                block = (*block).next;
            }
            #[cfg(not(rustux_fixed))]
            if FREE_LIST.is_null() {
                // reuse from the heap start when the free list is empty
                canary!(RX_01, true);
                return (self.start + HEADER_SIZE) as *mut u8;
            }
        }
        null_mut()
    }

    /// Marks the block free, puts it back into the address-ordered free list and merges it
    /// with free neighbours.
    #[inline(never)]
    pub extern "C" fn deallocate(&self, ptr: *mut u8) {
        if ptr.is_null() {
            return;
        }
        // SAFETY: the header is validated before anything is written.
        unsafe {
            let block = ptr.sub(HEADER_SIZE).cast::<BlockHeader>();
            self.check_block(block, false);
            (*block).free = true;
            let mut prev: *mut BlockHeader = null_mut();
            let mut next = FREE_LIST;
            while !next.is_null() && (next as usize) < (block as usize) {
                prev = next;
                next = (*next).next;
            }
            (*block).prev = prev;
            (*block).next = next;
            if prev.is_null() {
                FREE_LIST = block;
            } else {
                (*prev).next = block;
            }
            if !next.is_null() {
                (*next).prev = block;
            }
            if !next.is_null() && following(block) == next {
                self.absorb_next(block);
            }
            if !prev.is_null() && following(prev) == block {
                self.absorb_next(prev);
            }
        }
    }

    /// Resizes the allocation at `ptr` to `new_size` bytes: in place when its block is large
    /// enough or the block after it is free and makes up the difference, otherwise by moving
    /// it (allocate, copy, free).
    #[inline(never)]
    pub extern "C" fn reallocate(&self, ptr: *mut u8, new_size: usize) -> *mut u8 {
        let size = match new_size.max(1).checked_add(ALIGN - 1) {
            Some(padded) => padded & !(ALIGN - 1),
            None => return null_mut(),
        };
        // SAFETY: the header is validated before anything is read through it; the block after
        // it is used only if it lies inside the heap and carries the magic.
        unsafe {
            let block = ptr.sub(HEADER_SIZE).cast::<BlockHeader>();
            self.check_block(block, false);
            let old = (*block).size;
            if old >= size {
                return ptr;
            }
            let next = following(block);
            let next_fits = (next as usize).checked_add(HEADER_SIZE).is_some_and(|end| end <= self.end());
            if next_fits && (*next).magic == MAGIC && (*next).free
                && old + HEADER_SIZE + (*next).size >= size
            {
                let total = old + HEADER_SIZE + (*next).size;
                canary!(RX_11, false);
                let (prev_free, next_free) = ((*next).prev, (*next).next);
                // the header between the two is payload now
                (*next).magic = 0;
                let remaining = total - size;
                if remaining >= SPLIT_THRESHOLD {
                    let rest = payload(block).add(size).cast::<BlockHeader>();
                    write_header(rest, remaining - HEADER_SIZE, true, prev_free, next_free);
                    if prev_free.is_null() {
                        FREE_LIST = rest;
                    } else {
                        (*prev_free).next = rest;
                    }
                    if !next_free.is_null() {
                        (*next_free).prev = rest;
                    }
                    (*block).size = size;
                } else {
                    // the whole free block joins the allocation (the seed leaves it on the
                    // free list)
                    canary!(RX_11, true);
                    #[cfg(rustux_fixed)]
                    {
                        if prev_free.is_null() {
                            FREE_LIST = next_free;
                        } else {
                            (*prev_free).next = next_free;
                        }
                        if !next_free.is_null() {
                            (*next_free).prev = prev_free;
                        }
                    }
                    (*block).size = total;
                }
                return ptr;
            }
            let moved = self.allocate(size, ALIGN);
            if !moved.is_null() {
                core::ptr::copy_nonoverlapping(ptr, moved, old);
                self.deallocate(ptr);
            }
            moved
        }
    }

    /// Merges the free block after `block` (its list successor) into `block`.
    unsafe fn absorb_next(&self, block: *mut BlockHeader) {
        let next = (*block).next;
        (*block).size += HEADER_SIZE + (*next).size;
        (*block).next = (*next).next;
        if !(*next).next.is_null() {
            (*(*next).next).prev = block;
        }
        (*next).magic = 0;
    }

    unsafe fn unlink(&self, block: *mut BlockHeader) {
        let (prev, next) = ((*block).prev, (*block).next);
        if prev.is_null() {
            FREE_LIST = next;
        } else {
            (*prev).next = next;
        }
        if !next.is_null() {
            (*next).prev = prev;
        }
    }

    /// Puts `new` (already linked to the neighbours of `old`) where `old` was in the list.
    unsafe fn replace_in_list(&self, old: *mut BlockHeader, new: *mut BlockHeader) {
        let (prev, next) = ((*old).prev, (*old).next);
        if prev.is_null() {
            FREE_LIST = new;
        } else {
            (*prev).next = new;
        }
        if !next.is_null() {
            (*next).prev = new;
        }
    }

    unsafe fn check_block(&self, block: *mut BlockHeader, expect_free: bool) {
        let addr = block as usize;
        let inside = addr >= self.start
            && addr % ALIGN == 0
            && addr.checked_add(HEADER_SIZE).is_some_and(|end| end <= self.end());
        if !inside || (*block).magic != MAGIC {
            panic!("heap: corrupted block header {:#x}", addr);
        }
        // read as a byte: a corrupted header need not hold a valid bool
        let free = *core::ptr::addr_of!((*block).free).cast::<u8>() != 0;
        if free != expect_free {
            if expect_free {
                panic!("heap: allocated block {:#x} on the free list", addr);
            }
            panic!("heap: double free of {:#x}", addr + HEADER_SIZE);
        }
    }
}
