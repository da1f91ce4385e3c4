//! From `efi_main` to the kernel's own stack: banner, memory map, ExitBootServices, physical
//! page allocator, stack switch. Then the rest of the boot on the new stack.

use crate::efi::{self, MemoryDescriptor, SystemTable};
use crate::sync::KCell;
use crate::{arch, loader, mm, user};

/// The memory map is read into a buffer on the firmware stack: 4 KiB of an 8 KiB stack,
/// which is why the kernel leaves that stack as soon as it has its own. A firmware whose map
/// is larger (a real machine has a hundred descriptors and more) gets a pool buffer instead.
const MEMORY_MAP_CAPACITY: usize = 4 * 1024;

#[repr(C, align(16))]
struct MapBuffer([u8; MEMORY_MAP_CAPACITY]);

/// The system table survives ExitBootServices (it lives in runtime-services memory); the
/// continuation on the new stack picks it up from here.
static SYSTEM_TABLE: KCell<usize> = KCell::new(0);

/// A memory map as GetMemoryMap returned it, inside `MEMORY_MAP`.
pub struct MemoryMap {
    base: *const u8,
    size: usize,
    descriptor_size: usize,
}

impl MemoryMap {
    pub fn len(&self) -> usize {
        self.size / self.descriptor_size
    }

    pub fn get(&self, index: usize) -> MemoryDescriptor {
        // SAFETY: index < len(), so the descriptor lies inside the returned map.
        unsafe {
            self.base
                .add(index * self.descriptor_size)
                .cast::<MemoryDescriptor>()
                .read_unaligned()
        }
    }
}

pub fn start(image_handle: usize, system_table: *const SystemTable) -> ! {
    kprintln!(
        "[boot] Rustux efi_main image_handle={:#x} system_table={:#x}",
        image_handle,
        system_table as usize
    );
    // SAFETY: the firmware passed a valid system table and boot services are running.
    let mut buffer = MapBuffer([0; MEMORY_MAP_CAPACITY]);
    let map = unsafe {
        crate::console::firmware_print(system_table, "Rustux kernel booting\n");
        exit_boot_services(image_handle, system_table, &mut buffer)
    };
    kprintln!("[boot] boot services exited, memory map has {} entries", map.len());
    for i in 0..map.len() {
        let d = map.get(i);
        kprintln!(
            "[boot] mem {:#011x}-{:#011x} type {}",
            d.physical_start,
            d.physical_start + d.number_of_pages * mm::PAGE_SIZE,
            d.kind
        );
    }
    mm::frame::init(&map);
    // SAFETY: single writer before the stack switch.
    unsafe { *SYSTEM_TABLE.get() = system_table as usize };
    let top = mm::allocate_kernel_stack();
    // SAFETY: `top` is the top of 64 freshly allocated, identity-mapped pages.
    unsafe { arch::switch_stack(top, on_kernel_stack) }
}

extern "sysv64" fn on_kernel_stack() -> ! {
    // SAFETY: written once before the switch.
    let (base, system_table) = unsafe { (mm::KERNEL_STACK_BASE, *SYSTEM_TABLE.get()) };
    kprintln!("[mm] kstack base={:#x} top={:#x}", base, base + mm::KERNEL_STACK_SIZE);
    mm::heap::init();
    mm::frame::prezero(mm::PREZEROED_PAGES);
    arch::gdt::init();
    arch::idt::init();
    kprintln!("[boot] gdt and idt loaded");
    loader::load_init(system_table as *const SystemTable, user::AddressSpace::new())
}

/// Fetches the memory map (growing the request on EFI_BUFFER_TOO_SMALL) and leaves boot
/// services; a stale map key earns one more try with a fresh map.
///
/// # Safety
/// Boot services must still be running.
unsafe fn exit_boot_services(
    image_handle: usize,
    system_table: *const SystemTable,
    buffer: &mut MapBuffer,
) -> MemoryMap {
    let boot_services = (*system_table).boot_services;
    let (map, key) = get_memory_map(system_table, buffer);
    let status = ((*boot_services).exit_boot_services)(image_handle, key);
    if status == efi::SUCCESS {
        return map;
    }
    kprintln!("[boot] ExitBootServices returned {:#x}, retrying with a fresh map", status);
    let (map, key) = get_memory_map(system_table, buffer);
    let status = ((*boot_services).exit_boot_services)(image_handle, key);
    if status != efi::SUCCESS {
        panic!("ExitBootServices failed: {:#x}", status);
    }
    map
}

unsafe fn get_memory_map(system_table: *const SystemTable, buffer: &mut MapBuffer) -> (MemoryMap, usize) {
    let boot_services = (*system_table).boot_services;
    let get_memory_map = (*boot_services).get_memory_map;
    let mut buffer = buffer.0.as_mut_ptr();
    let mut capacity = MEMORY_MAP_CAPACITY;
    // Start by asking for the size; the second round adds room for two more descriptors in
    // case the map grows between the calls (as it does when the pool buffer is allocated).
    let mut request = 0usize;
    for _ in 0..4 {
        let mut size = request;
        let mut key = 0usize;
        let mut descriptor_size = 0usize;
        let mut version = 0u32;
        let status = get_memory_map(&mut size, buffer, &mut key, &mut descriptor_size, &mut version);
        match status {
            efi::SUCCESS => {
                if descriptor_size < core::mem::size_of::<MemoryDescriptor>() {
                    panic!("memory map descriptor size {} too small", descriptor_size);
                }
                let map = MemoryMap { base: buffer, size, descriptor_size };
                return (map, key);
            }
            efi::BUFFER_TOO_SMALL => {
                request = size + 2 * descriptor_size.max(core::mem::size_of::<MemoryDescriptor>());
                if request > capacity {
                    let mut pool = core::ptr::null_mut();
                    let status = ((*boot_services).allocate_pool)(efi::LOADER_DATA, request, &mut pool);
                    if status != efi::SUCCESS || pool.is_null() {
                        panic!("memory map needs {} bytes, AllocatePool failed: {:#x}", request, status);
                    }
                    buffer = pool;
                    capacity = request;
                }
            }
            other => panic!("GetMemoryMap failed: {:#x}", other),
        }
    }
    panic!("GetMemoryMap kept asking for a bigger buffer")
}
