"""The machine's fast paths give what the slow ones give: registers read and written through
the native walker against the Unicorn binding, memory words read from the first bank against
reads across banks and the open bus."""

from __future__ import annotations

import random

from kernel_emu.machine import REGISTERS, Machine

U64 = (1 << 64) - 1


def test_registers_through_the_native_path_match_the_binding() -> None:
    m = Machine([(0, 1 << 20)])
    rng = random.Random(3)
    for name, regid in REGISTERS.items():
        if name in ("rip", "rflags") or name.startswith("cr"):
            continue  # values these take have rules of their own
        value = rng.getrandbits(64)
        m.set_reg(name, value)
        assert m.uc.reg_read(regid) == value, name
        assert m.reg(name) == value, name
        m.uc.reg_write(regid, value ^ U64)
        assert m.reg(name) == value ^ U64, name
    m.set_reg("rip", 0x1234)
    assert m.reg("rip") == m.registers()["rip"] == 0x1234
    m.set_reg("rax", -1)  # as the binding does: the low 64 bits
    assert m.reg("rax") == U64
    assert m.registers() == {name: m.uc.reg_read(regid) for name, regid in REGISTERS.items()}


def test_words_read_the_same_inside_and_across_banks() -> None:
    m = Machine([(0, 0x4000), (0x10000, 0x1000)])
    rng = random.Random(4)
    for bank in m.banks:
        m.write(bank.base, rng.randbytes(bank.size))

    def slow(addr: int) -> int | None:
        if all(m.bank_for(addr + i) is not None for i in range(8)):
            return int.from_bytes(bytes(m.read(addr + i, 1)[0] for i in range(8)), "little")
        return None

    for addr in [0, 8, 0x3FF8, 0x3FF9, 0x3FFC, 0x4000, 0xFFFC, 0x10000, 0x10FF8, 0x10FF9,
                 0x11000, -8, 1 << 40]:
        want = slow(addr)
        assert m.u64_in_ram(addr) == want, hex(addr)
        if want is not None:
            assert m.u64(addr) == want
    # a read past the end of RAM reads as an open bus
    assert m.read(0x3FFF, 2)[1:] == b"\xff"
