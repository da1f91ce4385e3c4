//! The first user address space and the switch to ring 3.

use core::arch::global_asm;
use core::convert::Infallible;
use core::ptr::read_volatile;

use crate::arch::gdt::{USER_CODE, USER_DATA};
use crate::console::Hex;
use crate::loader::elf::{self, LoadedElf, PF_W, PF_X};
use crate::mm::paging::{self, NO_EXECUTE, PRESENT, USER, WRITABLE};
use crate::mm::{frame, KERNEL_STACK_BASE, KERNEL_STACK_SIZE, PAGE_SIZE};

/// The kernel image, mapped supervisor-only into every address space: linked at 1 MiB with
/// everything up to the heap reserved for it.
#[cfg(not(target_os = "uefi"))]
const KERNEL_IMAGE_START: u64 = 0x10_0000;
#[cfg(not(target_os = "uefi"))]
const KERNEL_IMAGE_END: u64 = 0x30_0000;

/// The kernel image: its start, the end of what it occupies, and the end of the range no user
/// segment may touch.
#[cfg(not(target_os = "uefi"))]
#[inline(always)]
fn kernel_image() -> (u64, u64, u64) {
    // SAFETY: only the address of the linker's symbol is taken.
    let end = unsafe { core::ptr::addr_of!(__kernel_end) as u64 };
    (KERNEL_IMAGE_START, end, KERNEL_IMAGE_END)
}

/// The kernel image: a UEFI application lies wherever the firmware loaded it, from the
/// linker's `__ImageBase` over the SizeOfImage of its own PE header.
#[cfg(target_os = "uefi")]
#[inline(always)]
fn kernel_image() -> (u64, u64, u64) {
    // SAFETY: the headers are part of the loaded image; e_lfanew is at 0x3c, SizeOfImage at
    // 56 bytes into the optional header, which follows the 4-byte signature and the 20-byte
    // file header.
    unsafe {
        let base = core::ptr::addr_of!(__ImageBase) as u64;
        let pe = base + read_volatile((base + 0x3c) as *const u32) as u64;
        let size = read_volatile((pe + 4 + 20 + 56) as *const u32) as u64;
        let end = (base + size + PAGE_SIZE - 1) & !(PAGE_SIZE - 1);
        (base, end, end)
    }
}

const USER_STACK_TOP: u64 = 0x7fff_ffff_f000;
const USER_STACK_PAGES: u64 = 4;
/// Initial RSP: 16-byte aligned with zeroed words above it (argc = 0, empty argv, envp and
/// auxiliary vector).
const USER_STACK_POINTER: u64 = USER_STACK_TOP - 0x40;
const USER_RFLAGS: u64 = 0x202;

// rustux_enter_user(rip, rsp, cr3): switch to the user page tables and iretq to ring 3.
global_asm!(
    asm_function_begin!("rustux_enter_user"),
    ".global rustux_enter_user",
    "rustux_enter_user:",
    "mov cr3, rdx",
    "push {ss}",
    "push rsi",
    "push {rflags}",
    "push {cs}",
    "push rdi",
    "xor eax, eax",
    "xor ebx, ebx",
    "xor ecx, ecx",
    "xor edx, edx",
    "xor esi, esi",
    "xor edi, edi",
    "xor ebp, ebp",
    "xor r8d, r8d",
    "xor r9d, r9d",
    "xor r10d, r10d",
    "xor r11d, r11d",
    "xor r12d, r12d",
    "xor r13d, r13d",
    "xor r14d, r14d",
    "xor r15d, r15d",
    ".global __rustux_enter_user_iretq",
    "__rustux_enter_user_iretq:",
    "iretq",
    asm_function_end!("rustux_enter_user"),
    ss = const USER_DATA,
    cs = const USER_CODE,
    rflags = const USER_RFLAGS,
);

// assembly, System V convention on every target
extern "sysv64" {
    fn rustux_enter_user(rip: u64, rsp: u64, cr3: u64) -> !;
}

extern "C" {
    #[cfg(not(target_os = "uefi"))]
    static __kernel_end: u8;
    #[cfg(target_os = "uefi")]
    static __ImageBase: u8;
}

/// Page-rounded [start, end) of a segment (end may wrap around).
fn page_span(vaddr: u64, memsz: u64) -> (u64, u64) {
    let start = vaddr & !(PAGE_SIZE - 1);
    let end = vaddr.wrapping_add(memsz).wrapping_add(PAGE_SIZE - 1) & !(PAGE_SIZE - 1);
    (start, end)
}

fn overlaps(start: u64, end: u64, lo: u64, hi: u64) -> bool {
    start < hi && lo < end
}

/// The address space `bin/init` will run in, made before the loader looks at the file (as a
/// kernel creates a process's address space before exec): a root table with the kernel image
/// and the kernel stack mapped supervisor-only, which the kernel needs while it finishes the
/// switch to ring 3. Nothing in it depends on the file; the user pages come in `enter`.
pub struct AddressSpace {
    root: u64,
}

impl AddressSpace {
    pub fn new() -> Self {
        // SAFETY: the root is a fresh zeroed page and stays private until `enter` loads it.
        unsafe {
            let stack_base = KERNEL_STACK_BASE;
            let root = frame::alloc_zeroed_page();
            // only what the image occupies: the rest of its reserved range holds nothing to run
            let (image_start, image_end, _) = kernel_image();
            paging::map_identity(root, image_start, image_end, PRESENT | WRITABLE);
            paging::map_identity(
                root,
                stack_base,
                stack_base + KERNEL_STACK_SIZE,
                PRESENT | WRITABLE | NO_EXECUTE,
            );
            AddressSpace { root }
        }
    }
}

/// Maps `loaded` into `space` and enters it; returns only to refuse the image.
#[inline(never)]
pub fn enter(loaded: *const LoadedElf, space: AddressSpace) -> Result<Infallible, &'static str> {
    // SAFETY: `loaded` comes from the ELF loader; the page tables built here are private
    // until CR3 is loaded.
    unsafe {
        let count = read_volatile(&(*loaded).segment_count);
        let buffers = read_volatile(&(*loaded).buffers);
        let entry = read_volatile(&(*loaded).entry);
        let stack_base = KERNEL_STACK_BASE;
        let stack_top = stack_base + KERNEL_STACK_SIZE;
        let (image_start, _, image_reserved_end) = kernel_image();

        for i in 0..count {
            let s = elf::segment(loaded, i);
            if s.memsz == 0 {
                continue;
            }
            let (start, end) = page_span(s.vaddr, s.memsz);
            #[cfg(rustux_upstream)] if s.vaddr % PAGE_SIZE != 0 { return Err("segment address not page-aligned"); }
            if overlaps(start, end, image_start, image_reserved_end)
                || overlaps(start, end, stack_base, stack_top)
            {
                return Err("segment overlaps the kernel");
            }
            // The stack pages are mapped after the segments and would share a segment's page
            // table entry: its code would become writable and the stack executable.
            if overlaps(start, end, USER_STACK_TOP - USER_STACK_PAGES * PAGE_SIZE, USER_STACK_TOP) {
                return Err("segment overlaps the user stack");
            }
        }

        let root = space.root;
        let mut tables = LeafTables::new(root);
        for i in 0..count {
            // a segment's pages mostly share a table, two segments rarely: each starts afresh
            // (and the stack goes on with the last one's)
            tables = LeafTables::new(root);
            let s = elf::segment(loaded, i);
            let buffer = read_volatile(buffers.add(i));
            let mut flags = PRESENT | USER;
            if s.flags & PF_W != 0 {
                flags |= WRITABLE;
            }
            if s.flags & PF_X == 0 {
                flags |= NO_EXECUTE;
            }
            map_segment(&mut tables, s.vaddr, s.memsz, s.filesz, buffer, flags);
        }

        let stack_bottom = USER_STACK_TOP - USER_STACK_PAGES * PAGE_SIZE;
        let mut stack_rights = PRESENT | USER | WRITABLE | NO_EXECUTE;
        #[cfg(not(rustux_upstream))]
        if u64::from(read_volatile(core::ptr::addr_of!(elf::STACK_FLAGS))) & PF_X != 0 {
            stack_rights &= !NO_EXECUTE;
        }
        let mut page = stack_bottom;
        while page < USER_STACK_TOP {
            user_page(&mut tables, page, stack_rights);
            page += PAGE_SIZE;
        }

        kline!(
            "[user] enter rip=",
            Hex(entry),
            " rsp=",
            Hex(USER_STACK_POINTER),
            " cr3=",
            Hex(root),
        );
        rustux_enter_user(entry, USER_STACK_POINTER, root)
    }
}

/// Maps the pages covering [vaddr, vaddr + memsz) and copies the segment bytes from its
/// buffer to the right offsets in them.
unsafe fn map_segment(
    tables: &mut LeafTables,
    vaddr: u64,
    memsz: u64,
    filesz: u64,
    buffer: *const u8,
    flags: u64,
) {
    if memsz == 0 {
        return;
    }
    // frames come zeroed, so only the file-backed bytes need copying: the BSS is already there
    let data_end = vaddr.wrapping_add(filesz.min(memsz));
    let (start, end) = page_span(vaddr, memsz);
    let mut page = start;
    while page < end {
        let frame = user_page(tables, page, flags);
        let lo = page.max(vaddr);
        let hi = (page + PAGE_SIZE).min(data_end);
        if hi > lo {
            core::ptr::copy_nonoverlapping(
                buffer.add((lo - vaddr) as usize),
                (frame + (lo - page)) as *mut u8,
                (hi - lo) as usize,
            );
        }
        page += PAGE_SIZE;
    }
}

/// The frame mapped at `page`, mapping a zeroed one with `flags` if there is none yet. Pages
/// shared by two segments get the union of their rights.
unsafe fn user_page(tables: &mut LeafTables, page: u64, flags: u64) -> u64 {
    let entry = tables.entry(page);
    if *entry & PRESENT != 0 {
        canary!(RX_12, *entry & WRITABLE != 0 && flags & WRITABLE == 0);
        // the seed gives the page the write right of the segment mapped last
        #[cfg(not(rustux_fixed))]
        {
            *entry = (*entry & !WRITABLE) | (flags & WRITABLE);
        }
        #[cfg(rustux_fixed)]
        {
            *entry |= flags & WRITABLE;
        }
        if flags & NO_EXECUTE == 0 {
            *entry &= !NO_EXECUTE;
        }
        return *entry & paging::ADDRESS_MASK;
    }
    let frame = frame::alloc_zeroed_page();
    *entry = frame | flags;
    frame
}

/// Level-1 entries of one address space being built, remembering the last level-1 table
/// reached: the pages of a segment or of the stack mostly share one, and a walk from the root
/// costs three table reads. Only leaf entries change while the tables are in use (and no
/// table there is a large page to split), so a remembered table stays the one `entry_for`
/// would reach.
struct LeafTables {
    root: u64,
    /// The region of the pages `table` maps (`page >> 21`, their 2 MiB; the seed keeps only
    /// its index in the level-2 table, the same for regions 1 GiB apart).
    region: u64,
    table: *mut u64,
    /// The page `table` was looked up for.
    last_page: u64,
}

impl LeafTables {
    fn new(root: u64) -> Self {
        LeafTables { root, region: 0, table: core::ptr::null_mut(), last_page: 0 }
    }

    /// The level-1 entry for `page`, creating missing tables as `paging::entry_for` does.
    unsafe fn entry(&mut self, page: u64) -> *mut u64 {
        let index = ((page >> 12) & 511) as usize;
        #[cfg(not(rustux_fixed))]
        let region = (page >> 21) & 511;
        #[cfg(rustux_fixed)]
        let region = page >> 21;
        canary!(RX_15, !self.table.is_null() && region == self.region
            && page >> 21 != self.last_page >> 21);
        if self.table.is_null() || region != self.region {
            self.table = paging::entry_for(self.root, page, true).sub(index);
            self.region = region;
            self.last_page = page;
        }
        self.table.add(index)
    }
}
