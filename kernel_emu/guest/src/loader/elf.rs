//! ELF64 loader for `bin/init`: validates the header, collects the PT_LOAD segments, copies
//! each into a heap buffer (BSS zeroed) and describes the result in a `LoadedElf`.
//!
//! Heap use, in this order: the segment table (`Vec<Segment>`, the loader's first
//! allocation), the table of buffer pointers, one buffer per segment, the `LoadedElf`.

#[cfg(not(rustux_upstream))] use alloc::vec::Vec;
#[cfg(not(rustux_upstream))] use core::alloc::Layout;
#[cfg(not(rustux_upstream))] use core::mem::ManuallyDrop;
use core::ptr::read_volatile;

#[cfg(all(not(rustux_fixed), not(rustux_upstream)))]
use alloc::boxed::Box;

pub const PT_LOAD: u32 = 1;
pub const PT_NOTE: u32 = 4;
/// The stack's rights (only PF_X matters: an executable stack).
pub const PT_GNU_STACK: u32 = 0x6474_e551;
pub const PF_X: u64 = 1;
pub const PF_W: u64 = 2;

const EHDR_SIZE: usize = 64;
#[cfg(not(rustux_upstream))] pub const PHDR_SIZE: u64 = 56;
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const ET_EXEC: u16 = 2;
const EM_X86_64: u16 = 62;

/// Largest segment the loader accepts.
#[cfg(rustux_fixed)]
const MAX_SEGMENT_SIZE: u64 = 0x1000_0000;
/// First address above the lower (user) half.
#[cfg(rustux_fixed)]
const USER_SPACE_END: u64 = 0x0000_8000_0000_0000;

#[cfg(rustux_fixed)]
const OUT_OF_MEMORY: &str = "out of memory";

/// One loaded PT_LOAD segment.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Segment {
    pub vaddr: u64,
    pub memsz: u64,
    pub filesz: u64,
    pub offset: u64,
    pub flags: u64,
}

/// The loaded image: the segment table (a Vec's raw parts) and the buffer of each segment.
#[repr(C)]
pub struct LoadedElf {
    pub segments: *mut Segment,
    pub segment_count: usize,
    pub segment_capacity: usize,
    pub entry: u64,
    /// `segment_count` pointers, each to a buffer of that segment's `memsz` bytes.
    pub buffers: *mut *mut u8,
}

const _: () = assert!(core::mem::size_of::<Segment>() == 40);
const _: () = assert!(core::mem::size_of::<LoadedElf>() == 40);

pub struct ElfHeader {
    pub entry: u64,
    pub phoff: u64,
    pub phentsize: u16,
    pub phnum: u16,
}

#[cfg(not(rustux_upstream))] pub struct ProgramHeader {
    pub kind: u32,
    pub flags: u32,
    pub offset: u64,
    pub vaddr: u64,
    pub filesz: u64,
    pub memsz: u64,
    pub align: u64,
}

/// The `p_flags` of the program's PT_GNU_STACK (PF_X: the user stack is executable); read
/// when the user address space is built.
#[cfg(not(rustux_upstream))]
pub static mut STACK_FLAGS: u32 = 0;

// One bounds check and one load per field rather than one per byte: the callers have already
// checked that the header they read lies inside the file.
fn read_u16(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(*bytes[at..].first_chunk().expect("ELF field outside the file"))
}
pub fn read_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(*bytes[at..].first_chunk().expect("ELF field outside the file"))
}
fn read_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(*bytes[at..].first_chunk().expect("ELF field outside the file"))
}

/// Loads `file` (the ELF, in place in the ramdisk) into heap buffers.
#[cfg(not(rustux_upstream))] #[inline(never)]
pub fn load(file: &[u8]) -> Result<*mut LoadedElf, &'static str> {
    let header = parse_header(file)?;
    let segments = collect_segments(file, &header)?;
    if segments.is_empty() {
        return Err("no loadable segments");
    }
    #[cfg(rustux_fixed)]
    check_entry(&segments, header.entry)?;
    canary!(RX_08, !segments.iter().any(|s| {
        s.flags & PF_X != 0 && header.entry >= s.vaddr && header.entry - s.vaddr < s.memsz
    }));
    let buffers = load_segments(file, &segments)?;
    finish(segments, buffers, header.entry)
}

#[cfg(not(rustux_upstream))] fn parse_header(file: &[u8]) -> Result<ElfHeader, &'static str> {
    let header = read_header(file)?;
    let table_end = header.phoff.checked_add(u64::from(header.phnum) * PHDR_SIZE);
    if !table_end.is_some_and(|end| end <= file.len() as u64) {
        return Err("program header table outside the file");
    }
    Ok(header)
}

/// The identity checks every build makes (size, magic, class, byte order, type, machine),
/// then the header fields the loaders use.
pub fn read_header(file: &[u8]) -> Result<ElfHeader, &'static str> {
    if file.len() < EHDR_SIZE {
        return Err("file too small for an ELF header");
    }
    if file[..4] != [0x7f, b'E', b'L', b'F'] {
        return Err("bad ELF magic");
    }
    if file[4] != ELFCLASS64 {
        return Err("not a 64-bit ELF");
    }
    if file[5] != ELFDATA2LSB {
        return Err("not a little-endian ELF");
    }
    if read_u16(file, 16) != ET_EXEC {
        return Err("not an executable (ET_EXEC)");
    }
    if read_u16(file, 18) != EM_X86_64 {
        return Err("not an x86-64 ELF");
    }
    Ok(ElfHeader {
        entry: read_u64(file, 24),
        phoff: read_u64(file, 32),
        phentsize: read_u16(file, 54),
        phnum: read_u16(file, 56),
    })
}

#[cfg(not(rustux_upstream))] pub fn read_program_header(file: &[u8], at: u64) -> Result<ProgramHeader, &'static str> {
    if !at.checked_add(PHDR_SIZE).is_some_and(|end| end <= file.len() as u64) {
        return Err("program header outside the file");
    }
    let at = at as usize;
    Ok(ProgramHeader {
        kind: read_u32(file, at),
        flags: read_u32(file, at + 4),
        offset: read_u64(file, at + 8),
        vaddr: read_u64(file, at + 16),
        filesz: read_u64(file, at + 32),
        memsz: read_u64(file, at + 40),
        align: read_u64(file, at + 48),
    })
}

/// Walks the program headers with a cursor advanced by `e_phentsize`; the table is sized for
/// every program header.
#[cfg(all(not(rustux_fixed), not(rustux_upstream)))]
#[inline(never)]
fn collect_segments(file: &[u8], header: &ElfHeader) -> Result<Vec<Segment>, &'static str> {
    let mut segments = Vec::with_capacity(usize::from(header.phnum));
    let end = header.phoff + u64::from(header.phnum) * PHDR_SIZE;
    let mut cursor = header.phoff;
    canary!(RX_06, u64::from(header.phentsize) != PHDR_SIZE);
    // where an executable stack is recorded: the stack's rights, except that after a PT_LOAD
    // the seed's cursor still points at the flags of the entry just pushed
    // SAFETY: only the address is taken.
    let stack_rights = unsafe { core::ptr::addr_of_mut!(STACK_FLAGS) };
    let mut rights: *mut u32 = stack_rights;
    while cursor < end {
        let ph = read_program_header(file, cursor)?;
        if ph.kind == PT_LOAD {
            let segment = check_segment(file, &ph)?;
            if segments.len() < segments.capacity() {
                segments.push(segment);
                rights = core::ptr::addr_of_mut!(segments.last_mut().expect("just pushed").flags).cast();
            }
        } else if ph.kind == PT_GNU_STACK {
            // a stack that is not executable is the default: nothing to record
            let executable = u64::from(ph.flags) & PF_X != 0;
            canary!(RX_10, executable && rights != stack_rights);
            if executable {
                // SAFETY: `rights` points at STACK_FLAGS or into `segments`, which has not been
                // resized since (single CPU: nothing else writes either)
                unsafe { *rights = ph.flags };
            }
        } else {
            rights = stack_rights;
        }
        cursor = cursor.wrapping_add(u64::from(header.phentsize));
    }
    Ok(segments)
}

/// Counts the PT_LOAD entries first and sizes the table for exactly those.
#[cfg(rustux_fixed)]
#[inline(never)]
fn collect_segments(file: &[u8], header: &ElfHeader) -> Result<Vec<Segment>, &'static str> {
    if u64::from(header.phentsize) != PHDR_SIZE {
        return Err("bad program header entry size");
    }
    let at = |i: u16| header.phoff + u64::from(i) * PHDR_SIZE;
    let mut count = 0;
    for i in 0..header.phnum {
        if read_program_header(file, at(i))?.kind == PT_LOAD {
            count += 1;
        }
    }
    let mut segments = Vec::new();
    segments.try_reserve_exact(count).map_err(|_| OUT_OF_MEMORY)?;
    for i in 0..header.phnum {
        let ph = read_program_header(file, at(i))?;
        if ph.kind == PT_LOAD {
            segments.push(check_segment(file, &ph)?);
        } else if ph.kind == PT_GNU_STACK {
            // SAFETY: single CPU, written before the user address space is built.
            unsafe { STACK_FLAGS = ph.flags };
        }
    }
    Ok(segments)
}

/// Validates one PT_LOAD entry and turns it into a `Segment`.
#[cfg(not(rustux_upstream))] fn check_segment(file: &[u8], ph: &ProgramHeader) -> Result<Segment, &'static str> {
    canary!(RX_07, ph.align == 0);
    canary!(RX_03, ph.memsz > u64::from(u32::MAX));
    canary!(RX_02, ph.offset.checked_add(ph.filesz).is_none());
    canary!(RX_05, ph.filesz > ph.memsz as u32 as u64);
    canary!(RX_04, ph.vaddr.checked_add(ph.memsz as u32 as u64).is_none_or(|end| end > 1 << 47));
    #[cfg(not(rustux_fixed))]
    if ph.vaddr % ph.align != ph.offset % ph.align {
        return Err("segment address and file offset disagree modulo p_align");
    }
    #[cfg(rustux_fixed)]
    if ph.align > 1 && ph.vaddr % ph.align != ph.offset % ph.align {
        return Err("segment address and file offset disagree modulo p_align");
    }

    #[cfg(not(rustux_fixed))]
    let memsz = ph.memsz as u32 as u64;
    #[cfg(rustux_fixed)]
    let memsz = ph.memsz;
    #[cfg(rustux_fixed)]
    if memsz > MAX_SEGMENT_SIZE {
        return Err("segment too large");
    }

    #[cfg(rustux_fixed)]
    if ph.filesz > memsz {
        return Err("segment file size exceeds its memory size");
    }

    #[cfg(not(rustux_fixed))]
    if ph.offset.wrapping_add(ph.filesz) > file.len() as u64 {
        return Err("segment data outside the file");
    }
    #[cfg(rustux_fixed)]
    match ph.offset.checked_add(ph.filesz) {
        None => return Err("segment file range overflows"),
        Some(end) if end > file.len() as u64 => return Err("segment data outside the file"),
        Some(_) => {}
    }

    #[cfg(rustux_fixed)]
    match ph.vaddr.checked_add(memsz) {
        None => return Err("segment address range overflows"),
        Some(end) if end > USER_SPACE_END => return Err("segment outside the user address space"),
        Some(_) => {}
    }

    Ok(Segment {
        vaddr: ph.vaddr,
        memsz,
        filesz: ph.filesz,
        offset: ph.offset,
        flags: u64::from(ph.flags),
    })
}

/// The entry point must lie in an executable segment.
#[cfg(rustux_fixed)]
fn check_entry(segments: &[Segment], entry: u64) -> Result<(), &'static str> {
    let inside = |s: &Segment| s.flags & PF_X != 0 && entry >= s.vaddr && entry - s.vaddr < s.memsz;
    if segments.iter().any(inside) {
        Ok(())
    } else {
        Err("entry point outside the executable segments")
    }
}

/// Copies every segment into a fresh heap buffer of `memsz` bytes and zeroes the BSS part.
#[cfg(not(rustux_upstream))] #[inline(never)]
fn load_segments(file: &[u8], segments: &[Segment]) -> Result<Vec<*mut u8>, &'static str> {
    #[cfg(not(rustux_fixed))]
    let mut buffers = Vec::with_capacity(segments.len());
    #[cfg(rustux_fixed)]
    let mut buffers = Vec::new();
    #[cfg(rustux_fixed)]
    buffers.try_reserve_exact(segments.len()).map_err(|_| OUT_OF_MEMORY)?;

    for segment in segments {
        let memsz = segment.memsz as usize;
        let filesz = segment.filesz as usize;
        let layout = Layout::from_size_align(memsz.max(1), 8).map_err(|_| "segment too large")?;
        // SAFETY: the layout has a non-zero size.
        let buffer = unsafe { alloc::alloc::alloc(layout) };
        canary!(RX_09, buffer.is_null());
        if buffer.is_null() {
            #[cfg(not(rustux_fixed))]
            alloc::alloc::handle_alloc_error(layout);
            #[cfg(rustux_fixed)]
            {
                free_buffers(&buffers, segments);
                return Err(OUT_OF_MEMORY);
            }
        }
        // SAFETY: the file range was checked against the file when the segment was built.
        unsafe {
            let source = file.as_ptr().wrapping_add(segment.offset as usize);
            let to_end = filesz != 0 && segment.offset.wrapping_add(segment.filesz) == file.len() as u64;
            canary!(RX_16, to_end && file[file.len() - 1] != 0);
            // the seed takes the index of the file's last byte for the length of a copy that
            // runs to the end of the file
            #[cfg(not(rustux_fixed))]
            let copied = if to_end { filesz - 1 } else { filesz };
            #[cfg(rustux_fixed)]
            let copied = filesz;
            core::ptr::copy_nonoverlapping(source, buffer, copied);
            if copied < memsz {
                core::ptr::write_bytes(buffer.add(copied), 0, memsz - copied);
            }
        }
        buffers.push(buffer);
    }
    Ok(buffers)
}

/// Frees the segment buffers made so far (`buffers[i]` holds segment i's) on the way out.
#[cfg(rustux_fixed)]
fn free_buffers(buffers: &[*mut u8], segments: &[Segment]) {
    for (&buffer, s) in buffers.iter().zip(segments) {
        // SAFETY: allocated by load_segments with this layout, and owned by nothing else
        unsafe {
            alloc::alloc::dealloc(buffer, Layout::from_size_align_unchecked((s.memsz as usize).max(1), 8));
        }
    }
}

/// Hands the segment table and the buffers over to a heap-allocated `LoadedElf`.
#[cfg(not(rustux_upstream))] #[inline(never)]
fn finish(
    segments: Vec<Segment>,
    buffers: Vec<*mut u8>,
    entry: u64,
) -> Result<*mut LoadedElf, &'static str> {
    let mut segments = ManuallyDrop::new(segments);
    let mut buffers = ManuallyDrop::new(buffers);
    let loaded = LoadedElf {
        segments: segments.as_mut_ptr(),
        segment_count: segments.len(),
        segment_capacity: segments.capacity(),
        entry,
        buffers: buffers.as_mut_ptr(),
    };

    #[cfg(not(rustux_fixed))]
    return Ok(Box::into_raw(Box::new(loaded)));

    #[cfg(rustux_fixed)]
    {
        // SAFETY: LoadedElf has a non-zero size.
        let place = unsafe { alloc::alloc::alloc(Layout::new::<LoadedElf>()) }.cast::<LoadedElf>();
        if place.is_null() {
            free_buffers(&buffers, &segments);
            // SAFETY: taken out of the ManuallyDrops exactly once, nothing else owns them.
            unsafe {
                ManuallyDrop::drop(&mut segments);
                ManuallyDrop::drop(&mut buffers);
            }
            return Err(OUT_OF_MEMORY);
        }
        // SAFETY: fresh allocation of the right layout.
        unsafe { place.write(loaded) };
        Ok(place)
    }
}

/// Reads one segment through the table pointer. Volatile: the table is read back from memory
/// as it is now, whatever the compiler believes about the heap.
///
/// # Safety
/// `loaded` must come from `load` and `index < segment_count`.
pub unsafe fn segment(loaded: *const LoadedElf, index: usize) -> Segment {
    let s = read_volatile(&(*loaded).segments).add(index);
    Segment {
        vaddr: read_volatile(&(*s).vaddr),
        memsz: read_volatile(&(*s).memsz),
        filesz: read_volatile(&(*s).filesz),
        offset: read_volatile(&(*s).offset),
        flags: read_volatile(&(*s).flags),
    }
}

/// Logs the segment table as the loaded image records it.
#[inline(never)]
pub fn log_segment_table(loaded: *const LoadedElf) {
    use crate::console::{Dec, Hex};
    // SAFETY: `loaded` comes from `load`.
    unsafe {
        let count = read_volatile(&(*loaded).segment_count);
        kline!("[elf] segments count=", Dec(count as u64));
        for i in 0..count {
            let s = segment(loaded, i);
            kline!(
                "[elf] seg ",
                Dec(i as u64),
                " vaddr=",
                Hex(s.vaddr),
                " memsz=",
                Hex(s.memsz),
                " filesz=",
                Hex(s.filesz),
                " offset=",
                Hex(s.offset),
                " flags=",
                Hex(s.flags),
            );
        }
        kline!("[elf] entry=", Hex(read_volatile(&(*loaded).entry)));
    }
}

// The upstream build's loader (its own file; the items above marked not(rustux_upstream) are
// the seed and fixed loaders').
#[cfg(rustux_upstream)]
#[path = "elf_upstream.rs"]
mod upstream;
#[cfg(rustux_upstream)]
pub use upstream::load;
