//! The program's notes (PT_NOTE), read once its segments are loaded and kept with the process:
//! the GNU build ID, and a table of the other vendors' notes (what a debugger or `/proc` would
//! show), the kernel interpreting none of them.
//!
//! Heap use: the table (`Vec<Note>`, room for two, grown by push) when the first PT_NOTE is
//! seen; per note a copy of its name, freed once compared; per build ID a buffer that stays.

use alloc::vec::Vec;
use core::alloc::Layout;
use core::mem::ManuallyDrop;
use core::ptr::null_mut;

use super::elf::{self, PHDR_SIZE, PT_NOTE};

const NOTE_HEADER_SIZE: u64 = 12;
const OUT_OF_MEMORY: &str = "out of memory";
const NT_GNU_BUILD_ID: u32 = 3;
const GNU: &[u8] = b"GNU\0";
/// What linkers write by default (a SHA-1).
#[cfg(not(rustux_fixed))]
const BUILD_ID_SIZE: usize = 20;
/// The longest build ID the kernel keeps.
const BUILD_ID_MAX: u64 = 64;

/// One note of another vendor than GNU, where its description lies in the file.
#[repr(C)]
pub struct Note {
    pub kind: u32,
    pub name_len: u32,
    pub desc_offset: u64,
    pub desc_len: u64,
}

const _: () = assert!(core::mem::size_of::<Note>() == 24);

/// The running program's table of notes: pointer, count, capacity (null: none).
#[used]
pub static mut NOTES: (*mut Note, usize, usize) = (null_mut(), 0, 0);
/// Its build ID: pointer and length (null: none).
#[used]
pub static mut BUILD_ID: (*mut u8, usize) = (null_mut(), 0);

/// Reads every PT_NOTE of `file` (an ELF the loader accepted) and keeps what it found with the
/// process; returns how many notes there were.
#[inline(never)]
pub fn read(file: &[u8]) -> Result<usize, &'static str> {
    let header = elf::read_header(file)?;
    // kept by the process once complete: dropped by hand on the way out otherwise
    let mut table: Option<ManuallyDrop<Vec<Note>>> = None;
    let mut count = 0;
    for i in 0..header.phnum {
        let ph = elf::read_program_header(file, header.phoff + u64::from(i) * PHDR_SIZE)?;
        if ph.kind != PT_NOTE {
            continue;
        }
        canary!(RX_17, false);
        if table.is_none() {
            let mut notes = Vec::new();
            notes.try_reserve_exact(2).map_err(|_| OUT_OF_MEMORY)?;
            table = Some(ManuallyDrop::new(notes));
        }
        let notes = table.as_mut().expect("made above");
        #[cfg(rustux_fixed)]
        let before = notes.len();
        match read_segment(file, ph.offset, ph.filesz, notes) {
            Ok((n, false)) => count += n,
            Ok((_, true)) => {
                // a truncated note: the segment's notes are not trusted and dropped (the seed
                // drops the table they were added to, without freeing it)
                canary!(RX_17, true);
                #[cfg(not(rustux_fixed))]
                {
                    table = None;
                }
                #[cfg(rustux_fixed)]
                notes.truncate(before);
            }
            Err(reason) => {
                if let Some(notes) = table.as_mut() {
                    // SAFETY: taken out of the ManuallyDrop once, on the way out
                    unsafe { ManuallyDrop::drop(notes) };
                }
                return Err(reason);
            }
        }
    }
    if let Some(mut notes) = table {
        // SAFETY: single CPU; the process keeps the table from now on.
        unsafe { NOTES = (notes.as_mut_ptr(), notes.len(), notes.capacity()) };
    }
    Ok(count)
}

/// The notes of one PT_NOTE added to `notes`: how many, and whether a truncated one ended them.
fn read_segment(file: &[u8], offset: u64, size: u64, notes: &mut Vec<Note>)
    -> Result<(usize, bool), &'static str>
{
    let end = offset.checked_add(size).filter(|&end| end <= file.len() as u64)
        .ok_or("note segment outside the file")?;
    let data = &file[offset as usize..end as usize];
    let align4 = |n: u32| (u64::from(n) + 3) & !3;
    let mut at = 0u64;
    let mut count = 0;
    while data.len() as u64 - at >= NOTE_HEADER_SIZE {
        let name_len = elf::read_u32(data, at as usize);
        let desc_len = elf::read_u32(data, at as usize + 4);
        let kind = elf::read_u32(data, at as usize + 8);
        let name_at = at + NOTE_HEADER_SIZE;
        let desc_at = name_at + align4(name_len);
        let next = desc_at + align4(desc_len);
        if next > data.len() as u64 {
            return Ok((count, true));
        }
        let mut name = Vec::new();
        name.try_reserve_exact(name_len as usize).map_err(|_| OUT_OF_MEMORY)?;
        name.extend_from_slice(&data[name_at as usize..(name_at + u64::from(name_len)) as usize]);
        let desc = &data[desc_at as usize..(desc_at + u64::from(desc_len)) as usize];
        let gnu = name == GNU;
        if gnu && kind == NT_GNU_BUILD_ID {
            keep_build_id(desc)?;
        }
        drop(name);
        if !gnu {
            notes.try_reserve(1).map_err(|_| OUT_OF_MEMORY)?;
            notes.push(Note {
                kind,
                name_len,
                desc_offset: offset + desc_at,
                desc_len: u64::from(desc_len),
            });
        }
        count += 1;
        at = next;
    }
    Ok((count, false))
}

/// Copies the build ID into a buffer of its own and makes it the process's.
#[inline(never)]
fn keep_build_id(desc: &[u8]) -> Result<(), &'static str> {
    if desc.len() as u64 > BUILD_ID_MAX {
        return Err("build ID too long");
    }
    // the seed sizes the buffer for a SHA-1, whatever the note says
    canary!(RX_13, desc.len() > BUILD_ID_SIZE);
    #[cfg(not(rustux_fixed))]
    let size = BUILD_ID_SIZE;
    #[cfg(rustux_fixed)]
    let size = desc.len().max(1);
    // SAFETY: non-zero size; the copy is `desc.len()` bytes into a buffer of `size`.
    unsafe {
        let buffer = alloc::alloc::alloc(Layout::from_size_align_unchecked(size, 1));
        if buffer.is_null() {
            return Err(OUT_OF_MEMORY);
        }
        core::ptr::copy_nonoverlapping(desc.as_ptr(), buffer, desc.len());
        let (old, _old_len) = BUILD_ID;
        // a second build ID replaces the first; the seed forgets to free it
        canary!(RX_14, !old.is_null());
        #[cfg(rustux_fixed)]
        if !old.is_null() {
            alloc::alloc::dealloc(old, Layout::from_size_align_unchecked(_old_len.max(1), 1));
        }
        BUILD_ID = (buffer, desc.len());
    }
    Ok(())
}
