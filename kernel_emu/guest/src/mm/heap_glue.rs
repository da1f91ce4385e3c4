// What every heap of this kernel has around its allocator, included by heap.rs and
// heap_upstream.rs: the block header's layout, the head of the free list, the allocator's
// handle over the heap region, its registration as the global allocator, the entry points the
// emulator hooks, and `init`. Each includer provides `LinkedListAllocator::{init, allocate,
// deallocate}` (as `unsafe fn init(&self)` and `extern "C"` methods), HEAP_START, HEAP_SIZE
// and MAGIC, and says what a header's `size` counts; the seed and fixed heaps also resize in
// place (`reallocate`).

#[repr(C)]
pub struct BlockHeader {
    /// The block's size: its payload's, or with the header (as the including heap says).
    pub size: usize,
    pub free: bool,
    _pad: [u8; 7],
    pub magic: u64,
    pub prev: *mut BlockHeader,
    pub next: *mut BlockHeader,
}

pub const HEADER_SIZE: usize = core::mem::size_of::<BlockHeader>();
const _: () = assert!(HEADER_SIZE == 40);

/// Head of the free list. Read by the emulator through its symbol.
#[used]
pub static mut FREE_LIST: *mut BlockHeader = null_mut();

pub struct LinkedListAllocator {
    start: usize,
    size: usize,
}

#[global_allocator]
static ALLOCATOR: LinkedListAllocator = LinkedListAllocator::new(HEAP_START, HEAP_SIZE);

/// The emulator hooks the allocator methods by symbol with the C register convention; taking
/// their addresses here keeps them as standalone functions with that exact signature.
#[used]
static ENTRY_POINTS: (
    extern "C" fn(&LinkedListAllocator, usize, usize) -> *mut u8,
    extern "C" fn(&LinkedListAllocator, *mut u8),
) = (LinkedListAllocator::allocate, LinkedListAllocator::deallocate);

/// Creates the heap's first free block. Nothing may allocate before this.
pub fn init() {
    // SAFETY: the heap range is RAM excluded from the page allocator and unused so far.
    unsafe { ALLOCATOR.init() };
    kprintln!("[heap] init base={:#x} size={:#x}", ALLOCATOR.start, ALLOCATOR.size);
}

impl LinkedListAllocator {
    pub const fn new(start: usize, size: usize) -> Self {
        LinkedListAllocator { start, size }
    }

    fn end(&self) -> usize {
        self.start + self.size
    }
}

unsafe impl GlobalAlloc for LinkedListAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.allocate(layout.size(), layout.align())
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        self.deallocate(ptr)
    }

    #[cfg(not(rustux_upstream))]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.align() > 8 {
            return null_mut();
        }
        self.reallocate(ptr, new_size)
    }
}
