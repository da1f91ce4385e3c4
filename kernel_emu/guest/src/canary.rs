//! Canaries of the seed build's planted bugs (BUGS.md), in the manner of the Magma benchmark:
//! one byte per bug in `CANARIES`, bit 0 set once the bug's code runs ("reached"), bit 1 once
//! its condition holds ("triggered"), and in bits 2-7 the order in which the bugs were first
//! triggered in the run (1 for the first): the cause of a finding is most likely the bug
//! triggered first. The fixed and upstream builds have none: there the
//! `canary!` macro is empty and its condition is not even evaluated.
//!
//! Benchmarks read the bytes through the profile's `[canaries]` table to tell which bug a
//! finding is; the emulator's oracles never read them.

#[cfg(all(not(rustux_fixed), not(rustux_upstream)))]
pub mod planted {
    use core::ptr::{addr_of_mut, read_volatile, write_volatile};

    pub const RX_01: usize = 0;
    pub const RX_02: usize = 1;
    pub const RX_03: usize = 2;
    pub const RX_04: usize = 3;
    pub const RX_05: usize = 4;
    pub const RX_06: usize = 5;
    pub const RX_07: usize = 6;
    pub const RX_08: usize = 7;
    pub const RX_09: usize = 8;
    pub const RX_10: usize = 9;
    pub const RX_11: usize = 10;
    pub const RX_12: usize = 11;
    pub const RX_13: usize = 12;
    pub const RX_14: usize = 13;
    pub const RX_15: usize = 14;
    pub const RX_16: usize = 15;
    pub const RX_17: usize = 16;
    const COUNT: usize = 32;

    /// Read by benchmarks through its symbol.
    #[used]
    pub static mut CANARIES: [u8; COUNT] = [0; COUNT];
    /// How many bugs this run has triggered so far.
    static mut TRIGGERED: u8 = 0;

    #[inline(always)]
    pub fn mark(bug: usize, triggered: bool) {
        // SAFETY: single CPU; volatile so every mark is a real store the benchmark can see.
        unsafe {
            let byte = addr_of_mut!(CANARIES[bug]);
            let old = read_volatile(byte);
            if triggered && old & 2 == 0 {
                let order = read_volatile(addr_of_mut!(TRIGGERED)).saturating_add(1).min(63);
                write_volatile(addr_of_mut!(TRIGGERED), order);
                write_volatile(byte, old | 3 | (order << 2));
            } else if old & 1 == 0 {
                write_volatile(byte, old | 1);
            }
        }
    }
}

/// `canary!(RX_nn, condition)`: the bug's code is reached here, and triggered if `condition`.
#[cfg(all(not(rustux_fixed), not(rustux_upstream)))]
macro_rules! canary {
    ($bug:ident, $triggered:expr) => {
        $crate::canary::planted::mark($crate::canary::planted::$bug, $triggered)
    };
}

#[cfg(any(rustux_fixed, rustux_upstream))]
macro_rules! canary {
    ($bug:ident, $triggered:expr) => {};
}
