//! Physical page allocator: a bump pointer over the ConventionalMemory ranges of the firmware
//! memory map, from the top of the highest range downwards, so kernel stack and page tables
//! sit at the end of RAM, away from the low addresses user programs are linked at. Pages are
//! never returned.

use crate::boot::MemoryMap;
use crate::efi::CONVENTIONAL_MEMORY;
use crate::sync::KCell;

use super::PAGE_SIZE;

const MAX_RANGES: usize = 32;

/// Never handed out: the null page and the heap.
const EXCLUDED: [(u64, u64); 2] = [
    (0, PAGE_SIZE),
    (super::heap::HEAP_START as u64, (super::heap::HEAP_START + super::heap::HEAP_SIZE) as u64),
];

#[derive(Clone, Copy)]
struct Range {
    start: u64,
    end: u64,
}

struct FrameAllocator {
    ranges: [Range; MAX_RANGES],
    count: usize,
    /// Range being carved, counted from the lowest.
    current: usize,
    /// Lowest address handed out so far in the current range.
    next: u64,
}

static FRAMES: KCell<FrameAllocator> = KCell::new(FrameAllocator {
    ranges: [Range { start: 0, end: 0 }; MAX_RANGES],
    count: 0,
    current: 0,
    next: 0,
});

pub fn init(map: &MemoryMap) {
    // SAFETY: boot is single-threaded; nothing else holds a reference to FRAMES.
    let frames = unsafe { &mut *FRAMES.get() };
    for i in 0..map.len() {
        let d = map.get(i);
        if d.kind != CONVENTIONAL_MEMORY {
            continue;
        }
        let start = (d.physical_start + PAGE_SIZE - 1) & !(PAGE_SIZE - 1);
        let end = d.physical_start.saturating_add(d.number_of_pages.saturating_mul(PAGE_SIZE))
            & !(PAGE_SIZE - 1);
        add_usable(frames, start, end);
    }
    if frames.count == 0 {
        panic!("out of physical pages");
    }
    frames.current = frames.count - 1;
    frames.next = frames.ranges[frames.current].end;
    let pages: u64 = frames.ranges[..frames.count]
        .iter()
        .map(|r| (r.end - r.start) / PAGE_SIZE)
        .sum();
    kprintln!("[mm] page allocator: {} pages in {} ranges", pages, frames.count);
}

fn add_usable(frames: &mut FrameAllocator, start: u64, end: u64) {
    if start >= end {
        return;
    }
    for &(lo, hi) in EXCLUDED.iter() {
        if start < hi && lo < end {
            add_usable(frames, start, lo.min(end));
            add_usable(frames, hi.max(start), end);
            return;
        }
    }
    if frames.count == MAX_RANGES {
        return;
    }
    // keep the ranges sorted by address
    let mut at = frames.count;
    while at > 0 && frames.ranges[at - 1].start > start {
        frames.ranges[at] = frames.ranges[at - 1];
        at -= 1;
    }
    frames.ranges[at] = Range { start, end };
    frames.count += 1;
}

/// `pages` physically contiguous pages.
pub fn alloc_contiguous(pages: u64) -> u64 {
    // SAFETY: single CPU, no re-entrancy.
    let frames = unsafe { &mut *FRAMES.get() };
    let bytes = pages.checked_mul(PAGE_SIZE).unwrap_or(u64::MAX);
    if frames.count > 0 {
        loop {
            let range = frames.ranges[frames.current];
            if frames.next - range.start >= bytes {
                frames.next -= bytes;
                return frames.next;
            }
            if frames.current == 0 {
                break;
            }
            frames.current -= 1;
            frames.next = frames.ranges[frames.current].end;
        }
    }
    panic!("out of physical pages")
}

/// One page filled with zeros.
/// Pages zeroed ahead of time, so building an address space does not wait on zeroing.
struct ZeroPool {
    next: u64,
    end: u64,
}

static ZERO_POOL: KCell<ZeroPool> = KCell::new(ZeroPool { next: 0, end: 0 });

/// Zeroes `pages` pages now, while the machine has nothing better to do, for later
/// `alloc_zeroed_page` calls.
pub fn prezero(pages: u64) {
    let start = alloc_contiguous(pages);
    let bytes = pages * PAGE_SIZE;
    // SAFETY: freshly allocated identity-mapped RAM that nothing else owns.
    unsafe { core::ptr::write_bytes(start as *mut u8, 0, bytes as usize) };
    // SAFETY: single CPU, no re-entrancy.
    let pool = unsafe { &mut *ZERO_POOL.get() };
    pool.next = start;
    pool.end = start + bytes;
    kprintln!("[mm] {} zeroed pages at {:#x}", pages, start);
}

pub fn alloc_zeroed_page() -> u64 {
    // SAFETY: single CPU, no re-entrancy.
    let pool = unsafe { &mut *ZERO_POOL.get() };
    if pool.next < pool.end {
        let page = pool.next;
        pool.next += PAGE_SIZE;
        return page;
    }
    let page = alloc_contiguous(1);
    // SAFETY: the page is identity-mapped RAM that nothing else owns.
    unsafe { core::ptr::write_bytes(page as *mut u8, 0, PAGE_SIZE as usize) };
    page
}
