//! The ELF loader of the `upstream` build, with the mechanics public Rustux's loader has (see
//! BUGS.md, "upstream"): the program headers go into a `Vec` that grows one push at a time,
//! the PT_LOAD entries are filtered into a second `Vec` and copied into a table of at most 16
//! (the rest are dropped without a word), each segment's bytes go into pages from the page
//! allocator described by a small heap record, and a debug line reads segment 2 whatever the
//! count.
//!
//! Heap use, in this order: the program header `Vec` (each growth allocates anew and frees
//! the old buffer), the PT_LOAD `Vec` (freed once copied), the segment table, the table of
//! segment memory, one page-run record per segment; the program header `Vec` is freed when
//! the segments are loaded, then the `LoadedElf` is allocated.

use alloc::boxed::Box;
use alloc::vec::Vec;

use super::{read_header, read_u32, read_u64, ElfHeader, LoadedElf, Segment, PT_LOAD};
use crate::console::Hex;
use crate::mm::{frame, PAGE_SIZE};

/// PT_LOAD entries beyond this many are ignored.
const MAX_LOADS: usize = 16;
/// The smallest program header entry the loader reads.
const MIN_PHENTSIZE: u16 = 56;

// every field is read from the file, as upstream does, though not all are used
#[allow(dead_code)]
#[repr(C)]
#[derive(Clone, Copy)]
struct ProgramHeader {
    kind: u32,
    flags: u32,
    offset: u64,
    vaddr: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
    align: u64,
}

const _: () = assert!(core::mem::size_of::<ProgramHeader>() == 56);

/// What the kernel keeps about a segment's memory: a run of pages from the page allocator.
/// Never freed: the pages stay the segment's.
#[allow(dead_code)]
struct PageRun {
    base: u64,
    pages: u64,
    flags: u32,
}

/// Loads `file` (the ELF, in place) into page-allocator memory.
#[inline(never)]
pub fn load(file: &[u8]) -> Result<*mut LoadedElf, &'static str> {
    let header = parse_header(file)?;
    let (segments, memory) = load_segments(file, &header)?;
    kline!("[elf] segment 2 vaddr=", Hex(segments[2].vaddr));
    Ok(finish(segments, memory, header.entry))
}

fn parse_header(file: &[u8]) -> Result<ElfHeader, &'static str> {
    let header = read_header(file)?;
    if header.phnum == 0 {
        return Err("no program headers");
    }
    if header.phoff == 0 || header.phentsize < MIN_PHENTSIZE {
        return Err("bad program header table");
    }
    Ok(header)
}

/// Every program header that lies wholly inside the file, stopping at the first that does
/// not, pushed one by one.
#[inline(never)]
fn program_headers(file: &[u8], header: &ElfHeader) -> Vec<ProgramHeader> {
    let mut headers = Vec::new();
    let size = usize::from(header.phentsize);
    for i in 0..usize::from(header.phnum) {
        let at = (header.phoff as usize).wrapping_add(i.wrapping_mul(size));
        if at.wrapping_add(size) > file.len() {
            break;
        }
        headers.push(ProgramHeader {
            kind: read_u32(file, at),
            flags: read_u32(file, at + 4),
            offset: read_u64(file, at + 8),
            vaddr: read_u64(file, at + 16),
            paddr: read_u64(file, at + 24),
            filesz: read_u64(file, at + 32),
            memsz: read_u64(file, at + 40),
            align: read_u64(file, at + 48),
        });
    }
    headers
}

/// Copies each PT_LOAD segment into fresh pages and describes it; returns the segment table
/// and, for each segment, where its bytes are.
#[inline(never)]
fn load_segments(
    file: &[u8],
    header: &ElfHeader,
) -> Result<(Vec<Segment>, Vec<*mut u8>), &'static str> {
    let headers = program_headers(file, header);
    let loads: Vec<ProgramHeader> =
        headers.iter().filter(|ph| ph.kind == PT_LOAD).cloned().collect();
    let mut table = [None; MAX_LOADS];
    let mut count = 0;
    for ph in loads {
        if count < MAX_LOADS {
            table[count] = Some(ph);
            count += 1;
        }
    }

    let mut segments = Vec::with_capacity(count);
    let mut memory = Vec::with_capacity(count);
    for ph in table[..count].iter().flatten() {
        let file_end = ph.offset.wrapping_add(ph.filesz);
        if ph.filesz > 0 && file_end > file.len() as u64 {
            return Err("segment data outside the file");
        }
        let memsz = ph.memsz.max(ph.filesz);
        if memsz == 0 {
            continue;
        }
        let pages = memsz.wrapping_add(PAGE_SIZE - 1) / PAGE_SIZE;
        let base = frame::alloc_contiguous(pages);
        // SAFETY: fresh identity-mapped pages of at least `memsz` bytes; the file range was
        // checked above.
        unsafe {
            let target = base as *mut u8;
            let source = file.as_ptr().wrapping_add(ph.offset as usize);
            core::ptr::copy_nonoverlapping(source, target, ph.filesz as usize);
            core::ptr::write_bytes(target.add(ph.filesz as usize), 0, (memsz - ph.filesz) as usize);
        }
        let run: &'static PageRun = Box::leak(Box::new(PageRun { base, pages, flags: ph.flags }));
        segments.push(Segment {
            vaddr: ph.vaddr,
            memsz,
            filesz: ph.filesz,
            offset: ph.offset,
            flags: u64::from(run.flags),
        });
        memory.push(run.base as *mut u8);
    }
    Ok((segments, memory))
}

/// Hands the segment table and the segment memory over to a heap-allocated `LoadedElf`.
#[inline(never)]
fn finish(segments: Vec<Segment>, memory: Vec<*mut u8>, entry: u64) -> *mut LoadedElf {
    let mut segments = core::mem::ManuallyDrop::new(segments);
    let mut memory = core::mem::ManuallyDrop::new(memory);
    Box::into_raw(Box::new(LoadedElf {
        segments: segments.as_mut_ptr(),
        segment_count: segments.len(),
        segment_capacity: segments.capacity(),
        entry,
        buffers: memory.as_mut_ptr(),
    }))
}
