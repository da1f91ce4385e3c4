"""Values a mutator should try, learnt from the kernel image itself: the immediates its code
compares against and the constants it loads, in the functions the input can reach (what
AFL++'s autodictionary collects at compile time, read here from the machine code).

The walk starts at the profile's snapshot point (the first code that reads the input) and
follows direct calls through functions with a sized symbol, breadth first. Values are kept in
the order they are first met, so the loader's own checks come before those of what it calls;
when the entry's name has a crate prefix (`rustux::…`), only functions of that crate count:
the formatting and memory routines of the language's library hold bit tricks, not checks.
"""

from __future__ import annotations

from collections import deque

import capstone
from capstone import x86

from kernel_emu.image import KernelImage

MAX_FUNCTIONS = 400
MAX_VALUES = 256
# instructions whose immediate is something the code holds a value against
_COMPARING = frozenset(("cmp", "test", "sub", "and", "add", "mov", "movabs"))
_U64 = (1 << 64) - 1

_md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
_md.detail = True


def _is_text(value: int) -> bool:
    """Bytes of an inlined string (a log line written a word at a time), not a check."""
    raw = value.to_bytes(8, "little").rstrip(b"\0")
    return len(raw) >= 3 and all(0x20 <= b < 0x7F for b in raw)


def learn_values(image: KernelImage, entry: str, *, max_functions: int = MAX_FUNCTIONS,
                 max_values: int = MAX_VALUES) -> tuple[int, ...]:
    """Immediates of the functions reachable from the symbol `entry` by direct calls, in the
    order first met, at most `max_values`. Trivial values (0, 1, -1) and addresses inside the
    image (code and data pointers, which move with the load address) and the bytes of inlined
    strings are left out."""
    root = image.find_symbol(entry)
    if root is None or root.size <= 0:
        return ()
    crate = root.name.split("::", 1)[0] + "::" if "::" in root.name else ""
    values: dict[int, None] = {}  # first met first
    seen = {root.address}
    queue = deque([root])
    visited = 0
    while queue and visited < max_functions:
        fn = queue.popleft()
        visited += 1
        own = fn.name.startswith(crate)
        for insn in _md.disasm(image.bytes_at(fn.address, fn.size) or b"", fn.address):
            if insn.mnemonic == "call":
                op = insn.operands[0] if insn.operands else None
                if op is not None and op.type == x86.X86_OP_IMM:
                    callee = image.function_at(op.imm)
                    if callee is not None and callee.size > 0 and callee.address not in seen:
                        seen.add(callee.address)
                        queue.append(callee)
                continue
            if not own or insn.mnemonic not in _COMPARING:
                continue
            for op in insn.operands:
                if op.type != x86.X86_OP_IMM:
                    continue
                value = op.imm & _U64
                if value in (0, 1, _U64) or image.start <= value < image.end or \
                        _is_text(value):
                    continue
                values.setdefault(value)
    return tuple(values)[:max_values]
