//! Interior mutability for kernel globals. The kernel runs on one CPU with interrupts off, so
//! a global is only ever touched by the code currently running.

use core::cell::UnsafeCell;

#[repr(transparent)]
pub struct KCell<T>(UnsafeCell<T>);

// SAFETY: single CPU, no interrupt handlers that return; see the module comment.
unsafe impl<T> Sync for KCell<T> {}

impl<T> KCell<T> {
    pub const fn new(value: T) -> Self {
        KCell(UnsafeCell::new(value))
    }

    pub fn get(&self) -> *mut T {
        self.0.get()
    }
}
