"""ELF-aware mutation and crossover for inputs that the Rustux kernel loads as `bin/init`.

Blind byte flips almost never get past the loader's header checks with a meaningful change:
most of what makes the loader interesting is in a handful of 64-bit fields whose dangerous
values are far apart (page boundaries, sizes near the kernel heap's end, wrap points at 2**32
and 2**64, the kernel half).  This mutator edits those fields directly, reshapes the program
header table, and moves segment data around while keeping the rest of the file consistent,
so that one mutation changes one thing the loader checks.

Everything here works on untrusted bytes: no operation may raise, whatever the input, and
every result fits in the size libFuzzer allows.  A call is deterministic for a given
(data, max_size, seed) unless libFuzzer's own byte mutation is used for that call.
"""

from __future__ import annotations

import random
import sys
from bisect import bisect_right
from collections.abc import Callable, Sequence
from itertools import compress

from fuzz.facts import HeapFacts, KernelFacts
from kernel_emu.elflayout import (
    EI_ABIVERSION,
    EI_CLASS,
    EI_DATA,
    EI_NIDENT,
    EI_OSABI,
    EI_PAD,
    EI_VERSION,
    ELF64_EHDR,
    ELF64_EHDR_SIZE,
    ELF64_PHDR,
    ELF64_PHDR_SIZE,
    ELF_MAGIC,
    ELFCLASS64,
    ELFDATA2LSB,
    EM_386,
    EM_AARCH64,
    EM_ARM,
    EM_RISCV,
    EM_X86_64,
    ET_CORE,
    ET_DYN,
    ET_EXEC,
    ET_REL,
    EV_CURRENT,
    PF_R,
    PF_W,
    PF_X,
    PT_DYNAMIC,
    PT_GNU_STACK,
    PT_INTERP,
    PT_LOAD,
    PT_NOTE,
    PT_PHDR,
    PT_TLS,
)

try:
    from fuzz import _rng
except ImportError:  # pragma: no cover - exercised only where the extension is not built
    _rng = None  # type: ignore[assignment]

ByteMutate = Callable[[bytes, int], bytes]

PAGE = 0x1000

U16_MAX = 0xFFFF
U32_MAX = 0xFFFF_FFFF
U64_MAX = 0xFFFF_FFFF_FFFF_FFFF

# share of calls handed to the plain byte mutation even when the input parses as ELF
BYTE_MUTATION_SHARE = 0.25
# share of non-ELF inputs that get an ELF header planted instead of a byte mutation
PLANT_SHARE = 0.1
# how often a call stacks a second (and third) ELF-aware operation
STACK_SHARE = 0.3
# share of field values taken from the kernel's dictionary (fuzz.facts) when it has one
DICTIONARY_SHARE = 0.2

_EHDR = ELF64_EHDR.le
_PHDR = ELF64_PHDR.le
# positions in the tuples those unpack to
_E_ENTRY = ELF64_EHDR["e_entry"].index
_E_PHOFF = ELF64_EHDR["e_phoff"].index
_E_SHOFF = ELF64_EHDR["e_shoff"].index
_E_PHENTSIZE = ELF64_EHDR["e_phentsize"].index
_E_PHNUM = ELF64_EHDR["e_phnum"].index
_P_VADDR = ELF64_PHDR["p_vaddr"].index
_P_MEMSZ = ELF64_PHDR["p_memsz"].index
_P_TYPE = ELF64_PHDR["p_type"]
_P_OFFSET = ELF64_PHDR["p_offset"]
# the program header table can be read as native 32-bit words on a little-endian host
_LITTLE_HOST = sys.byteorder == "little"
_IS_PT_LOAD = PT_LOAD.__eq__
_P_FILESZ = ELF64_PHDR["p_filesz"]
_P_ALIGN = ELF64_PHDR["p_align"]

_PHDR_FIELD_NAMES = ELF64_PHDR.names
# the fields the loader reads get picked far more often than p_paddr
_PHDR_FIELD_WEIGHTS = {"p_type": 3, "p_flags": 2, "p_offset": 4, "p_vaddr": 4, "p_paddr": 1,
                       "p_filesz": 4, "p_memsz": 6, "p_align": 3}
_PHDR_FIELD_WEIGHT_LIST = tuple(_PHDR_FIELD_WEIGHTS[name] for name in _PHDR_FIELD_NAMES)

# --- interesting values ------------------------------------------------------------------
KERNEL_HALF = 0xFFFF_8000_0000_0000
KERNEL_TOP = 0xFFFF_FFFF_8000_0000
# generic ones here; the kernel's own (its heap, its image, values its code checks) come from
# its profile and image (fuzz.facts)
ADDRESSES: tuple[int, ...] = (
    0, 1, 0xFFF, PAGE, PAGE + 1, 0x10_0000, 0x20_0000, 0x40_0000, 0x800_0000, 0xFFFF_F000,
    0x1_0000_0000,
    0x7FFF_FFFF_F000, 0x0000_8000_0000_0000, 0x0000_8000_0000_1000, KERNEL_HALF,
    KERNEL_HALF + 0x40_0000, KERNEL_TOP, 0xFFFF_FFFF_FFFF_F000, U64_MAX, 1 << 63,
)
SIZES: tuple[int, ...] = (
    0, 1, 7, 8, 0x27, 0x28, 0x29, 0x50, 0x9F, 0xA0, 0xA1, 0xA8, 0xFFF, PAGE, PAGE + 1,
    0x2000, 0x1_0000, 0x20_0000, 0x200_0000, 0x7FFF_FFFF, 0x8000_0000, U32_MAX, 1 << 32,
    (1 << 32) + PAGE, (1 << 32) + 0x2000, 1 << 63, U64_MAX - PAGE + 1, U64_MAX,
)
ALIGNS: tuple[int, ...] = (0, 1, 2, 3, 8, 0x10, 0xFFF, PAGE, PAGE + 1, 0x20_0000, 1 << 63,
                           U64_MAX)
PHDR_TYPES: tuple[int, ...] = (0, PT_LOAD, PT_DYNAMIC, PT_INTERP, PT_NOTE, PT_PHDR, PT_TLS,
                               PT_GNU_STACK, 0x6000_0000, 0x7000_0000, U32_MAX)
SEGMENT_FLAGS: tuple[int, ...] = (0, PF_X, PF_W, PF_R, PF_R | PF_X, PF_R | PF_W,
                                  PF_R | PF_W | PF_X, 8, 0x8000_0000, U32_MAX)
PHNUMS: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 8, 15, 16, 17, 32, 64, 0x7FFF, 0xFFFE, U16_MAX)
PHENTSIZES: tuple[int, ...] = (0, 1, 8, 32, 55, 56, 57, 64, 112, 0x8000, U16_MAX)
ELF_TYPES: tuple[int, ...] = (0, ET_REL, ET_EXEC, ET_DYN, ET_CORE, 0xFE00, 0xFF00, U16_MAX)
MACHINES: tuple[int, ...] = (0, EM_386, EM_X86_64, EM_ARM, EM_AARCH64, EM_RISCV, U16_MAX)
# free bytes to leave after a segment buffer (with multiples of the heap's header size, around
# which an allocator decides whether to split a block)
LEFTOVERS: tuple[int, ...] = (0, 8, 16, 32, 64, 96, 128, 200, 256)
DELTAS: tuple[int, ...] = (1, 2, 3, 4, 7, 8, 16, 40, 48, 56, 64, 160, 168, 0xFFF, PAGE,
                           0x1_0000, 1 << 32)
# ELF notes (gABI "Note Section"): owners and types of the notes real programs carry, and the
# description sizes they come in (a SHA-1 or MD5 build ID, an ABI tag, a UUID)
NOTE_OWNERS: tuple[bytes, ...] = (b"GNU\0", b"Go\0", b"FreeBSD\0", b"NetBSD\0", b"LINUX\0",
                                  b"stapsdt\0", b"Xen\0", b"")
NOTE_TYPES: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 0x100, 0x4000_0000, U32_MAX)
NOTE_SIZES: tuple[int, ...] = (0, 1, 3, 4, 5, 8, 16, 20, 21, 24, 32, 36, 64, 0xFF, PAGE,
                               0x7FFF_FFFF, U32_MAX)
GENERIC: tuple[int, ...] = (0, 1, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, U16_MAX, 0x1_0000,
                            0x7FFF_FFFF, 0x8000_0000, U32_MAX, 1 << 32, 1 << 63, U64_MAX)


def _round8(n: int) -> int:
    return (n + 7) & ~7


def _align_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


class _Elf:
    """The few header facts the operations need, decoded from a bytearray they edit.

    Entries are `stride` bytes apart like kernel_emu.elfview reads them (e_phentsize when that
    is larger than an Elf64_Phdr, else 56); only the `count` entries inside the file exist
    here, however large e_phnum claims to be.
    """

    __slots__ = ("buf", "entry", "phoff", "shoff", "phentsize", "phnum", "stride", "count")

    def __init__(self, buf: bytearray) -> None:
        self.buf = buf
        fields = _EHDR.unpack_from(buf)
        self.entry: int = fields[_E_ENTRY]
        self.phoff: int = fields[_E_PHOFF]
        self.shoff: int = fields[_E_SHOFF]
        self.phentsize: int = fields[_E_PHENTSIZE]
        self.phnum: int = fields[_E_PHNUM]
        self.stride = max(self.phentsize, ELF64_PHDR_SIZE)
        size = len(buf)
        if self.phnum == 0 or self.phoff > size - ELF64_PHDR_SIZE:
            self.count = 0
        else:
            fit = (size - self.phoff - ELF64_PHDR_SIZE) // self.stride + 1
            self.count = min(self.phnum, fit)

    def at(self, index: int) -> int:
        return self.phoff + index * self.stride

    def phdr(self, index: int) -> tuple[int, ...]:
        return _PHDR.unpack_from(self.buf, self.at(index))

    def get(self, index: int, name: str) -> int:
        f = ELF64_PHDR[name]
        value: int = f.le.unpack_from(self.buf, self.at(index) + f.offset)[0]
        return value

    def set(self, index: int, name: str, value: int) -> None:
        f = ELF64_PHDR[name]
        f.le.pack_into(self.buf, self.at(index) + f.offset, value & f.mask)

    def set_header(self, name: str, value: int) -> None:
        f = ELF64_EHDR[name]
        f.le.pack_into(self.buf, f.offset, value & f.mask)

    def get_header(self, name: str) -> int:
        f = ELF64_EHDR[name]
        value: int = f.le.unpack_from(self.buf, f.offset)[0]
        return value

    def loads(self) -> list[int]:
        """The indexes of the PT_LOAD entries."""
        count, stride = self.count, self.stride
        if count == 0:
            return []
        if _LITTLE_HOST and stride % 4 == 0:
            # every entry's p_type at once: the table as 32-bit words, one per `stride` bytes
            # (the last entry may be cut short after its 56 bytes: padded)
            table = bytes(self.buf[self.phoff:self.phoff + count * stride])
            words = memoryview(table.ljust(count * stride, b"\0")).cast("I")
            p_types = words[_P_TYPE.offset // 4::stride // 4].tolist()
            return list(compress(range(count), map(_IS_PT_LOAD, p_types)))
        buf = self.buf
        start = self.phoff + _P_TYPE.offset
        p_type_of = _P_TYPE.le
        return [i for i in range(count)
                if p_type_of.unpack_from(buf, start + i * stride)[0] == PT_LOAD]

    def entries(self) -> list[bytes]:
        """Every entry's 56 bytes, in order."""
        stride = self.stride
        table = bytes(self.buf[self.phoff:self.phoff + self.count * stride])
        return [table[p:p + ELF64_PHDR_SIZE] for p in range(0, self.count * stride, stride)]

    def entry_bytes(self, index: int) -> bytes:
        """Entry `index`'s 56 bytes."""
        at = self.at(index)
        return bytes(self.buf[at:at + ELF64_PHDR_SIZE])


def parse(data: bytes | bytearray) -> _Elf | None:
    """An editable view when `data` starts like an ELF file and holds a whole ELF64 header.

    Class and data bytes are not required to be right: a header with a broken EI_CLASS is
    still worth mutating back into shape, and its fields sit where an ELF64 header has them.
    """
    if len(data) < ELF64_EHDR_SIZE or data[:4] != ELF_MAGIC:
        return None
    return _Elf(data if isinstance(data, bytearray) else bytearray(data))


def heap_free_before(heap: HeapFacts, record: int, table_entries: int,
                     load_memsz: Sequence[int], index: int) -> int:
    """Free bytes a first-fit heap that starts as one block has left when a loader that keeps
    its segments in heap buffers asks for the buffer of PT_LOAD `index`: after a segment table
    (`record` bytes per entry), a table of pointers and the earlier buffers, each request split
    off the front of the block with its header. A guess at a loader's bookkeeping, good enough
    to land near the heap's end."""
    free = heap.size - heap.header
    requests = [record * table_entries, 8 * len(load_memsz), *load_memsz[:index]]
    for size in requests:
        free -= _round8(max(size, 1)) + heap.header
    return free


class _CallRandom(random.Random):
    """random.Random's draws (randrange, choice, sample, ...) over fuzz._rng's generator,
    which seeds in well under a microsecond where the Mersenne Twister takes ~4 µs: one is
    made for every mutator call. Not a general-purpose Random: it cannot be reseeded."""

    def __init__(self, seed: int) -> None:  # no super().__init__: nothing of MT to seed
        generator = _rng.Generator(seed)
        # instance attributes, found before the methods below by every draw of the class
        self.random = generator.random  # type: ignore[method-assign]
        self.getrandbits = generator.getrandbits  # type: ignore[method-assign]
        self.gauss_next = None  # as random.Random.__init__ leaves it, for gauss()

    # Defined so that random.Random builds its integer draws on getrandbits; never called
    def random(self) -> float:  # pragma: no cover
        raise NotImplementedError

    def getrandbits(self, k: int) -> int:  # pragma: no cover
        raise NotImplementedError

    def seed(self, *args: object, **kwargs: object) -> None:
        raise TypeError("a mutator call's generator is seeded once, when it is made")


def call_random(seed: int) -> random.Random:
    """The generator of one mutator call: fuzz._rng's when it is built, else the Mersenne
    Twister. Either draws the same for the same seed every time; the two draw differently."""
    return _CallRandom(seed) if _rng is not None else random.Random(seed)


Operation = Callable[[random.Random, _Elf, int], bool]


class ElfMutator:
    """libFuzzer custom mutator and crossover for ELF64 inputs.

    `byte_mutate` is libFuzzer's own mutation (atheris.Mutate); it gets a share of the calls,
    and all of the calls whose input is not an ELF file.  Without it a small built-in byte
    mutation stands in.  `seed` is mixed into every call's seed so that two mutators can
    explore differently from the same libFuzzer seeds.  `raise_errors` lets a bug in an
    operation propagate (for tests) instead of falling back to a byte mutation.
    """

    def __init__(self, byte_mutate: ByteMutate | None = None, *, seed: int | None = None,
                 raise_errors: bool = False, facts: KernelFacts | None = None) -> None:
        self.byte_mutate = byte_mutate
        self.facts = facts or KernelFacts()
        self._places = self.facts.places
        self._addresses = ADDRESSES + self._places
        self._sizes = SIZES + self.facts.sizes
        self._values = self.facts.values
        self._salt = 0 if seed is None else (int(seed) & U64_MAX) << 64
        self._raise = raise_errors
        ops: list[tuple[str, Operation, int]] = [
            ("header_field", self._op_header_field, 10),
            ("ident", self._op_ident, 2),
            ("phnum", self._op_phnum, 5),
            ("insert", self._op_insert, 5),
            ("drop", self._op_drop, 4),
            ("duplicate", self._op_duplicate, 3),
            ("reorder", self._op_reorder, 4),
            ("phdr_field", self._op_phdr_field, 20),
            ("arith", self._op_arith, 12),
            ("relation", self._op_relation, 10),
            # rare on purpose: its outputs fill the 16 MiB heap, ~100 ms per boot
            ("heap_fit", self._op_heap_fit, 1),
            ("flip_segment", self._op_flip_segment, 6),
            ("resize_segment", self._op_resize_segment, 5),
            ("note", self._op_note, 4),
        ]
        self._by_name = {name: op for name, op, _ in ops}
        self._ops = [op for _, op, _ in ops]
        total = 0
        self._cum_weights: list[int] = []
        for _, _, weight in ops:
            total += weight
            self._cum_weights.append(total)
        self._total = total

    @property
    def operations(self) -> tuple[str, ...]:
        """Names of the ELF-aware operations, for `apply`."""
        return tuple(self._by_name)

    # public API -------------------------------------------------------------------------
    def mutate(self, data: bytes, max_size: int, seed: int) -> bytes:
        """One mutation of `data`, at most `max_size` bytes long."""
        max_size = max(0, int(max_size))
        rng = call_random((int(seed) & U64_MAX) ^ self._salt)
        try:
            out = self._mutate(rng, bytes(data), max_size)
        except Exception:
            if self._raise:
                raise
            out = _simple_byte_mutation(rng, bytes(data), max_size)
        return bytes(out[:max_size])

    def apply(self, operation: str, data: bytes, max_size: int, seed: int) -> bytes | None:
        """Exactly one named ELF-aware operation (for reproducing and testing a mutation);
        None when it does not apply to `data` (not an ELF file, no suitable entry, no room).
        Unlike `mutate`, errors propagate."""
        op = self._by_name[operation]
        elf = parse(bytes(data)[:max(0, max_size)])
        if elf is None:
            return None
        rng = call_random((int(seed) & U64_MAX) ^ self._salt)
        if not op(rng, elf, max_size):
            return None
        return bytes(elf.buf[:max_size])

    def crossover(self, a: bytes, b: bytes, max_size: int, seed: int) -> bytes:
        """A mix of `a` and `b`: `a` with program headers (and their data) taken from `b`,
        or a byte-level splice when either is not an ELF file."""
        max_size = max(0, int(max_size))
        rng = call_random((int(seed) & U64_MAX) ^ self._salt)
        a, b = bytes(a), bytes(b)
        try:
            out = self._crossover(rng, a, b, max_size)
        except Exception:
            if self._raise:
                raise
            out = _splice(rng, a, b)
        return bytes(out[:max_size])

    # mutation driver ----------------------------------------------------------------------
    def _mutate(self, rng: random.Random, data: bytes, max_size: int) -> bytes | bytearray:
        if max_size == 0:
            return b""
        elf = parse(data[:max_size])
        if elf is None:
            if rng.random() < PLANT_SHARE:
                return _plant_header(rng, data, max_size)
            return self._bytes(rng, data, max_size)
        if rng.random() < BYTE_MUTATION_SHARE:
            return self._bytes(rng, data, max_size)
        rounds = 1 + (rng.random() < STACK_SHARE) + (rng.random() < STACK_SHARE / 3)
        buf = elf.buf
        for _ in range(rounds):
            elf = _Elf(buf)
            for _attempt in range(4):
                op = self._ops[bisect_right(self._cum_weights, rng.random() * self._total)]
                if op(rng, elf, max_size):
                    break
            else:
                self._op_header_field(rng, elf, max_size)
            buf = elf.buf
            if len(buf) < ELF64_EHDR_SIZE or buf[:4] != ELF_MAGIC:
                break
        return buf

    def _bytes(self, rng: random.Random, data: bytes, max_size: int) -> bytes | bytearray:
        if self.byte_mutate is not None:
            try:
                out = self.byte_mutate(data, max_size)
            except Exception:
                if self._raise:
                    raise
            else:
                if isinstance(out, (bytes, bytearray)):
                    return out
        return _simple_byte_mutation(rng, data, max_size)

    # ELF header ---------------------------------------------------------------------------
    def _op_header_field(self, rng: random.Random, elf: _Elf, max_size: int) -> bool:
        name = rng.choice(("e_entry", "e_entry", "e_entry", "e_phoff", "e_phoff", "e_phentsize",
                           "e_phentsize", "e_phnum", "e_type", "e_machine", "e_version",
                           "e_shoff", "e_shnum", "e_ehsize", "e_flags"))
        size = len(elf.buf)
        if name == "e_entry":
            value = self._entry_value(rng, elf)
        elif name == "e_phoff":
            table = elf.phnum * ELF64_PHDR_SIZE
            value = rng.choice((0, 1, 8, ELF64_EHDR_SIZE - 1, ELF64_EHDR_SIZE,
                                ELF64_EHDR_SIZE + 1, ELF64_EHDR_SIZE + ELF64_PHDR_SIZE,
                                size - table, size - table + 1, size - ELF64_PHDR_SIZE, size,
                                size + 1, U64_MAX - table + 1, U64_MAX, 1 << 63,
                                rng.randrange(size + 1)))
        elif name == "e_phentsize":
            value = rng.choice(PHENTSIZES)
        elif name == "e_phnum":
            value = rng.choice(PHNUMS + (max(elf.count - 1, 0), elf.count + 1))
        elif name == "e_type":
            value = rng.choice(ELF_TYPES)
        elif name == "e_machine":
            value = rng.choice(MACHINES)
        elif name == "e_ehsize":
            value = rng.choice((0, ELF64_EHDR_SIZE - 1, ELF64_EHDR_SIZE, 52, U16_MAX))
        elif name in ("e_shoff", "e_shnum"):
            value = rng.choice(GENERIC + (size, size - ELF64_EHDR_SIZE))
        else:
            value = rng.choice(GENERIC)
        elf.set_header(name, value)
        return True

    def _entry_value(self, rng: random.Random, elf: _Elf) -> int:
        roll = rng.random()
        loads = elf.loads()
        if roll < 0.5 and loads:
            ph = elf.phdr(rng.choice(loads))
            vaddr, memsz = ph[_P_VADDR], ph[_P_MEMSZ]
            value = rng.choice((vaddr, vaddr + 0x100, vaddr + memsz, vaddr + memsz - 1,
                                vaddr + rng.randrange(max(memsz, 1) & U32_MAX or 1),
                                vaddr - 1))
        elif roll < 0.85:
            value = self._pick(rng, self._addresses)
        else:
            value = elf.entry + rng.choice(DELTAS) * rng.choice((1, -1))
        return value & U64_MAX

    def _op_ident(self, rng: random.Random, elf: _Elf, max_size: int) -> bool:
        buf = elf.buf
        index = rng.choice((EI_CLASS, EI_CLASS, EI_DATA, EI_DATA, EI_VERSION, EI_OSABI,
                            EI_ABIVERSION, rng.randrange(EI_PAD, EI_NIDENT)))
        if index == EI_CLASS:
            buf[index] = rng.choice((0, 1, ELFCLASS64, 3, 0xFF))
        elif index == EI_DATA:
            buf[index] = rng.choice((0, ELFDATA2LSB, 2, 3, 0xFF))
        elif index == EI_VERSION:
            buf[index] = rng.choice((0, EV_CURRENT, 2, 0xFF))
        else:
            buf[index] = rng.randrange(256)
        return True

    # program header table -----------------------------------------------------------------
    def _store_table(self, elf: _Elf, entries: list[bytes], max_size: int, move: bool) -> bool:
        """Write `entries` as the program header table, in place or appended to the file
        (e_phoff repointed), and set e_phnum to their number."""
        entries = entries[:U16_MAX]
        count = len(entries)
        stride = elf.stride
        span = (count - 1) * stride + ELF64_PHDR_SIZE if count else 0
        buf = elf.buf
        fits_in_place = elf.phoff <= len(buf) - span
        if move or not fits_in_place:
            start = _round8(len(buf))
            if start + span <= max_size:
                buf.extend(bytes(start + span - len(buf)))
                elf.phoff = start
                elf.set_header("e_phoff", start)
            elif not fits_in_place:
                return False
        blob = bytes(stride - ELF64_PHDR_SIZE).join(entries)
        buf[elf.phoff:elf.phoff + len(blob)] = blob
        elf.set_header("e_phnum", count)
        elf.phnum = elf.count = count
        return True

    def _fresh_load(self, rng: random.Random, elf: _Elf) -> bytes:
        """A plausible PT_LOAD placed after the highest segment, over existing file data."""
        top = 0x40_0000
        for i in elf.loads():
            ph = elf.phdr(i)
            end = ph[_P_VADDR] + ph[_P_MEMSZ]
            if ph[_P_VADDR] < 1 << 47 and end < 1 << 47:
                top = max(top, end)
        size = len(elf.buf)
        offset = rng.choice((0, _align_up(size // 2, PAGE) if size > 2 * PAGE else 0,
                             rng.randrange(size) & ~(PAGE - 1)))
        offset = min(offset, size)
        filesz = rng.choice((0, min(PAGE, size - offset), size - offset, rng.randrange(0x200)))
        filesz = min(filesz, size - offset)
        memsz = rng.choice((filesz, filesz + PAGE, _round8(filesz), self._pick(rng, self._sizes)))
        vaddr = _align_up(top, PAGE) + rng.choice((0, PAGE, 0x20_0000)) + offset % PAGE
        flags = rng.choice((PF_R, PF_R | PF_X, PF_R | PF_W, PF_R | PF_W | PF_X))
        return _PHDR.pack(PT_LOAD, flags, offset, vaddr, vaddr, filesz, memsz & U64_MAX, PAGE)

    def _op_insert(self, rng: random.Random, elf: _Elf, max_size: int) -> bool:
        entries = elf.entries()
        loads = elf.loads()
        if loads and rng.random() < 0.5:
            new = entries[rng.choice(loads)]
        elif entries and rng.random() < 0.3:
            new = rng.choice(entries)
        else:
            new = self._fresh_load(rng, elf)
        entries.insert(rng.randrange(len(entries) + 1), new)
        # growing in place writes over whatever follows the table: sometimes that is the point
        return self._store_table(elf, entries, max_size, move=rng.random() < 0.85)

    def _op_drop(self, rng: random.Random, elf: _Elf, max_size: int) -> bool:
        entries = elf.entries()
        if not entries:
            return False
        del entries[rng.randrange(len(entries))]
        return self._store_table(elf, entries, max_size, move=False)

    def _op_duplicate(self, rng: random.Random, elf: _Elf, max_size: int) -> bool:
        entries = elf.entries()
        if len(entries) < 2:
            return False
        src, dst = rng.sample(range(len(entries)), 2)
        entries[dst] = entries[src]
        return self._store_table(elf, entries, max_size, move=False)

    def _op_reorder(self, rng: random.Random, elf: _Elf, max_size: int) -> bool:
        entries = elf.entries()
        if len(entries) < 2:
            return False
        roll = rng.random()
        if roll < 0.6:
            i, j = rng.sample(range(len(entries)), 2)
            entries[i], entries[j] = entries[j], entries[i]
        elif roll < 0.8:
            entries.reverse()
        else:
            rng.shuffle(entries)
        return self._store_table(elf, entries, max_size, move=False)

    def _op_phnum(self, rng: random.Random, elf: _Elf, max_size: int) -> bool:
        """Change e_phnum: just the field (the loader then reads whatever follows, or the
        table sticks out of the file), or a table actually grown/shrunk to that size."""
        target = rng.choice(PHNUMS + (elf.count + 1, elf.count + 2, max(elf.count - 1, 0)))
        if rng.random() < 0.5 or target <= elf.count:
            if target <= elf.count and rng.random() < 0.5:
                return self._store_table(elf, elf.entries()[:target], max_size, move=False)
            elf.set_header("e_phnum", target)
            return True
        entries = elf.entries()
        room = (max_size - _round8(len(elf.buf))) // elf.stride
        target = min(target, max(room, 0))
        if target <= len(entries):
            return False
        missing = target - len(entries)
        # one filler for the whole tail keeps a jump to thousands of entries cheap
        roll = rng.random()
        if roll < 0.5 and entries:
            entries += [rng.choice(entries)] * missing
        elif roll < 0.7:
            entries += [bytes(ELF64_PHDR_SIZE)] * missing
        else:
            fresh = [self._fresh_load(rng, elf) for _ in range(min(missing, 4))]
            entries += fresh + [fresh[-1]] * (missing - len(fresh))
        return self._store_table(elf, entries, max_size, move=True)

    # program header fields ----------------------------------------------------------------
    def _pick_entry(self, rng: random.Random, elf: _Elf) -> int | None:
        if elf.count == 0:
            return None
        if rng.random() < 0.8:
            loads = elf.loads()
            if loads:
                return rng.choice(loads)
        return rng.randrange(elf.count)

    def _field_value(self, rng: random.Random, elf: _Elf, index: int, name: str) -> int:
        ph = elf.phdr(index)
        _, flags, offset, vaddr, _, filesz, memsz, align = ph
        size = len(elf.buf)
        if name == "p_type":
            return rng.choice(PHDR_TYPES)
        if name == "p_flags":
            return rng.choice(SEGMENT_FLAGS)
        if name == "p_align":
            return rng.choice(ALIGNS)
        if name == "p_offset":
            return rng.choice((0, 1, offset + 1, offset - 1, offset + PAGE, size, size - filesz,
                               size - 1, U64_MAX - PAGE + 1, U64_MAX - filesz + 1,
                               (1 << 32) - PAGE, 1 << 63, vaddr % PAGE))
        if name in ("p_vaddr", "p_paddr"):
            near = (vaddr + 1, vaddr - PAGE, vaddr + PAGE, vaddr | (1 << 32),
                    (1 << 64) - memsz, (1 << 64) - memsz + 1, (1 << 32) - memsz,
                    KERNEL_HALF + (vaddr & (PAGE - 1)), KERNEL_TOP + (vaddr & (PAGE - 1)))
            return self._pick(rng, self._addresses + near)
        if name == "p_filesz":
            return self._pick(rng, self._sizes + (memsz, memsz + 1, memsz + PAGE, size - offset,
                                       size - offset + 1, (1 << 64) - offset))
        # p_memsz
        near = (filesz, filesz - 1, filesz + 1, memsz | (1 << 32), memsz + (1 << 32),
                (1 << 64) - vaddr, (1 << 32) - vaddr)
        heap = self.facts.heap
        if heap is not None:
            near += (heap.size - rng.choice(self.facts.record_sizes) * elf.phnum,)
        return self._pick(rng, self._sizes + near)

    def _pick(self, rng: random.Random, choices: tuple[int, ...]) -> int:
        """One of `choices`, or now and then one of the values the kernel's code compares
        against (its dictionary)."""
        if self._values and rng.random() < DICTIONARY_SHARE:
            return rng.choice(self._values)
        return rng.choice(choices)

    def _op_phdr_field(self, rng: random.Random, elf: _Elf, max_size: int) -> bool:
        index = self._pick_entry(rng, elf)
        if index is None:
            return False
        name = rng.choices(_PHDR_FIELD_NAMES, weights=_PHDR_FIELD_WEIGHT_LIST)[0]
        elf.set(index, name, self._field_value(rng, elf, index, name))
        return True

    def _op_arith(self, rng: random.Random, elf: _Elf, max_size: int) -> bool:
        delta = rng.choice(DELTAS) if rng.random() < 0.7 else rng.randrange(1, 64)
        if rng.random() < 0.5:
            delta = -delta
        index = self._pick_entry(rng, elf)
        if index is None or rng.random() < 0.2:
            name = rng.choice(("e_entry", "e_phoff", "e_phnum", "e_phentsize"))
            elf.set_header(name, elf.get_header(name) + delta)
            return True
        name = rng.choices(_PHDR_FIELD_NAMES, weights=_PHDR_FIELD_WEIGHT_LIST)[0]
        elf.set(index, name, elf.get(index, name) + delta)
        return True

    def _op_relation(self, rng: random.Random, elf: _Elf, max_size: int) -> bool:
        """Break one relation between fields of an entry that loaders rely on."""
        index = self._pick_entry(rng, elf)
        if index is None:
            return False
        _, _, offset, vaddr, _, filesz, memsz, align = elf.phdr(index)
        size = len(elf.buf)
        kind = rng.randrange(8)
        if kind == 0:  # more file bytes than memory
            if filesz > 1 and rng.random() < 0.5:
                elf.set(index, "p_memsz", max(1, filesz // rng.choice((2, 4, 16))))
            else:
                grown = filesz + rng.choice((1, 8, 0x100, 0xF00, PAGE))
                elf.set(index, "p_filesz", min(grown, max(size - offset, filesz + 1)))
                elf.set(index, "p_memsz", filesz)
        elif kind == 1:  # file range that wraps past 2**64 back into the file
            back = PAGE * rng.randrange(1, 4) + rng.choice((0, 0, 8, 0x10))
            elf.set(index, "p_offset", (1 << 64) - back)
            new_filesz = back + rng.choice((0, 0x100, PAGE, size)) % (size + 1)
            elf.set(index, "p_filesz", new_filesz)
            elf.set(index, "p_memsz", max(memsz, new_filesz))
        elif kind == 2:  # memory range that wraps 2**64 or crosses 2**32
            limit = rng.choice((1 << 64, 1 << 32, 1 << 47))
            start = limit - PAGE * rng.randrange(1, 3) + (offset & (PAGE - 1))
            elf.set(index, "p_vaddr", start)
            elf.set(index, "p_memsz", max(memsz, 2 * PAGE))
        elif kind == 3:  # size with high bits that a 32-bit truncation drops
            elf.set(index, "p_memsz", memsz | (1 << rng.choice((32, 33, 48, 63))))
        elif kind == 4:  # address and offset disagreeing modulo the alignment
            if rng.random() < 0.5:
                elf.set(index, "p_align", rng.choice((0, 3, PAGE + 1)))
            else:
                elf.set(index, "p_vaddr", vaddr + rng.choice((1, 8, 0x800)))
        elif kind == 5:  # segment in the kernel half (entry follows it sometimes)
            places = (KERNEL_HALF, KERNEL_TOP, 0x0000_8000_0000_0000, 0x10_0000)
            target = rng.choice(places + self._places) + (vaddr & (PAGE - 1))
            elf.set(index, "p_vaddr", target)
            if rng.random() < 0.5:
                elf.set_header("e_entry", target + (elf.entry - vaddr) % max(memsz, 1))
        elif kind == 6:  # entry point into a non-executable or unrelated place
            elf.set(index, "p_flags", rng.choice((PF_R, PF_R | PF_W, 0)))
            if not vaddr <= elf.entry < vaddr + memsz:
                elf.set_header("e_entry", vaddr + rng.randrange(max(min(memsz, PAGE), 1)))
        else:  # a huge or empty allocation
            huge = (0, 0x200_0000, 0x7FFF_FFF8, U32_MAX)
            if self.facts.heap is not None:
                huge += (self.facts.heap.size, self.facts.heap.size + 8)
            elf.set(index, "p_memsz", rng.choice(huge))
        return True

    def _op_heap_fit(self, rng: random.Random, elf: _Elf, max_size: int) -> bool:
        """Size one PT_LOAD so that its buffer leaves only a few bytes of the heap free: a
        heap allocator's rarely taken path (no split, then an exhausted free list)."""
        loads = elf.loads()
        heap = self.facts.heap
        if not loads or heap is None:
            return False
        pos = len(loads) - 1 if rng.random() < 0.6 else rng.randrange(len(loads))
        index = loads[pos]
        # a kernel's segment table may be sized by e_phnum or by the PT_LOAD count
        table = elf.phnum if rng.random() < 0.7 else len(loads)
        memsz = [elf.get(i, "p_memsz") for i in loads]
        free = heap_free_before(heap, rng.choice(self.facts.record_sizes), table, memsz, pos)
        if rng.random() < 0.8:
            leftover = rng.choice(LEFTOVERS) if rng.random() < 0.4 else \
                heap.header * rng.randrange(1, 6) + rng.choice((-8, -1, 0, 8))
        else:
            leftover = rng.randrange(-heap.header, 4 * heap.header + 40)
        size = free - leftover - rng.randrange(8)
        if size < 1:
            return False
        if rng.random() < 0.1:
            size |= 1 << 32
        elf.set(index, "p_memsz", size)
        if elf.get(index, "p_filesz") > size and rng.random() < 0.5:
            elf.set(index, "p_filesz", size)
        return True

    # segment data -------------------------------------------------------------------------
    def _file_range(self, elf: _Elf, index: int) -> tuple[int, int] | None:
        offset, filesz = elf.get(index, "p_offset"), elf.get(index, "p_filesz")
        size = len(elf.buf)
        if offset >= size:
            return None
        return offset, min(offset + filesz, size)

    def _op_flip_segment(self, rng: random.Random, elf: _Elf, max_size: int) -> bool:
        index = self._pick_entry(rng, elf)
        if index is None:
            return False
        span = self._file_range(elf, index)
        if span is None or span[1] <= span[0]:
            return False
        start, end = span
        buf = elf.buf
        for _ in range(rng.randrange(1, 9)):
            at = rng.randrange(start, end)
            if rng.random() < 0.7:
                buf[at] ^= 1 << rng.randrange(8)
            else:
                buf[at] = rng.choice((0, 0xFF, 0xCC, 0x90, 0xEB, 0xFE))
        return True

    def _op_resize_segment(self, rng: random.Random, elf: _Elf, max_size: int) -> bool:
        """Grow or shrink the file data at the end of one segment, moving everything after it
        (later segments, the section headers, the program header table) along."""
        index = self._pick_entry(rng, elf)
        if index is None:
            return False
        span = self._file_range(elf, index)
        if span is None:
            return False
        start, end = span
        buf = elf.buf
        table_start = elf.phoff
        table_end = elf.phoff + (elf.count - 1) * elf.stride + ELF64_PHDR_SIZE if elf.count \
            else elf.phoff
        offsets = [elf.get(i, "p_offset") for i in range(elf.count)]
        # later segments keep their offset modulo the page size, or their p_align check fails
        later = any(end <= off < len(buf) for j, off in enumerate(offsets) if j != index)
        quantum = PAGE if later else 1
        grow = rng.random() < 0.5 or end == start
        if grow:
            delta = quantum * rng.randrange(1, 3) if later else \
                rng.choice((1, 8, 40, 160, PAGE, rng.randrange(1, 0x200)))
            if len(buf) + delta > max_size or table_start < end < table_end \
                    or end < ELF64_EHDR_SIZE:
                return False
            filler = rng.choice((b"\x00", b"\xcc", b"\x90"))
            buf[end:end] = filler * delta
        else:
            most = (end - start) // quantum
            if most < 1:
                return False
            delta = quantum * rng.randrange(1, most + 1)
            if (end - delta < table_end and end > table_start) \
                    or end - delta < ELF64_EHDR_SIZE:
                return False
            del buf[end - delta:end]
            delta = -delta
        if table_start >= end:
            elf.phoff += delta
            elf.set_header("e_phoff", elf.phoff)
        new_filesz = elf.get(index, "p_filesz") + delta
        elf.set(index, "p_filesz", new_filesz)
        if elf.get(index, "p_memsz") < new_filesz and rng.random() < 0.8:
            elf.set(index, "p_memsz", new_filesz)
        if elf.shoff >= end:
            elf.set_header("e_shoff", elf.shoff + delta)
        for j, off in enumerate(offsets):
            if j != index and end <= off < len(buf) - delta:
                elf.set(j, "p_offset", off + delta)
        return True

    # notes ------------------------------------------------------------------------------------
    def _notes(self, elf: _Elf) -> list[tuple[int, int, int]]:
        """Every note header in the file data of the PT_NOTE entries: (offset, namesz,
        descsz), walked as a loader walks them (name and description padded to 4)."""
        out: list[tuple[int, int, int]] = []
        buf = elf.buf
        for index in range(elf.count):
            if elf.get(index, "p_type") != PT_NOTE:
                continue
            span = self._file_range(elf, index)
            if span is None:
                continue
            at, end = span
            while at + 12 <= end and len(out) < 64:
                namesz = int.from_bytes(buf[at:at + 4], "little")
                descsz = int.from_bytes(buf[at + 4:at + 8], "little")
                out.append((at, namesz, descsz))
                at += 12 + _align_up(namesz, 4) + _align_up(descsz, 4)
        return out

    def _op_note(self, rng: random.Random, elf: _Elf, max_size: int) -> bool:
        """Change one note of a PT_NOTE: its name size, description size or type, or its
        owner's name (rewritten in place, as long as the name's room allows)."""
        notes = self._notes(elf)
        if not notes:
            return False
        at, namesz, descsz = rng.choice(notes)
        buf = elf.buf
        before = bytes(buf[at:at + 12 + _align_up(namesz, 4)])
        what = rng.randrange(4)
        if what == 0:  # description size: a neighbouring or a usual size
            value = rng.choice((descsz + 1, descsz - 1, descsz + 4, descsz - 4, descsz * 2,
                                *NOTE_SIZES))
            buf[at + 4:at + 8] = (value & U32_MAX).to_bytes(4, "little")
        elif what == 1:
            value = rng.choice((namesz + 1, namesz - 1, *NOTE_SIZES))
            buf[at:at + 4] = (value & U32_MAX).to_bytes(4, "little")
        elif what == 2:
            value = self._pick(rng, NOTE_TYPES) & U32_MAX
            buf[at + 8:at + 12] = value.to_bytes(4, "little")
        else:  # another owner, its size with it
            owner = rng.choice(NOTE_OWNERS)
            room = _align_up(namesz, 4)
            if len(owner) > room or at + 12 + room > len(buf):
                return False
            buf[at + 12:at + 12 + room] = owner + bytes(room - len(owner))
            buf[at:at + 4] = len(owner).to_bytes(4, "little")
        return buf[at:at + len(before)] != before

    # crossover ----------------------------------------------------------------------------
    def _crossover(self, rng: random.Random, a: bytes, b: bytes, max_size: int) -> bytes:
        ea, eb = parse(a[:max_size]), parse(b)
        if ea is None or eb is None or eb.count == 0:
            return bytes(_splice(rng, a, b))
        donors = eb.loads() or list(range(eb.count))
        picked = rng.sample(donors, min(len(donors), rng.randrange(1, 4)))
        entries = ea.entries()
        a_loads = ea.loads()
        buf = ea.buf
        for d in picked:
            raw = bytearray(eb.entry_bytes(d))
            offset, filesz, align = (f.le.unpack_from(raw, f.offset)[0]
                                     for f in (_P_OFFSET, _P_FILESZ, _P_ALIGN))
            chunk = b[offset:offset + filesz] if offset < len(b) else b""
            # keep the data's offset congruent with its address modulo the alignment
            modulus = align if 0 < align <= PAGE and align & (align - 1) == 0 else PAGE
            place = len(buf) + (offset - len(buf)) % modulus
            if place + len(chunk) > max_size:
                place = len(buf) + (offset - len(buf)) % 8
                chunk = chunk[:max(0, max_size - place)]
            if chunk:
                buf.extend(bytes(place - len(buf)))
                buf.extend(chunk)
                _P_OFFSET.le.pack_into(raw, _P_OFFSET.offset, place)
                if len(chunk) < filesz:
                    _P_FILESZ.le.pack_into(raw, _P_FILESZ.offset, len(chunk))
            if a_loads and rng.random() < 0.7:
                slot = a_loads.pop(rng.randrange(len(a_loads)))
                entries[slot] = bytes(raw)
            else:
                entries.insert(rng.randrange(len(entries) + 1), bytes(raw))
        ea = _Elf(buf)
        if rng.random() < 0.2:
            ea.set_header("e_entry", eb.entry)
        if not self._store_table(ea, entries, max_size, move=len(entries) > ea.count):
            return bytes(_splice(rng, a, b))
        return bytes(ea.buf)


# non-ELF fallbacks ------------------------------------------------------------------------
def _simple_byte_mutation(rng: random.Random, data: bytes, max_size: int) -> bytearray:
    """A small stand-in for libFuzzer's byte mutations when none was supplied."""
    buf = bytearray(data[:max_size])
    kind = rng.randrange(6)
    if not buf or kind == 0:
        if len(buf) < max_size:
            count = rng.randrange(1, min(8, max_size - len(buf)) + 1)
            at = rng.randrange(len(buf) + 1)
            buf[at:at] = bytes(rng.randrange(256) for _ in range(count))
        return buf
    at = rng.randrange(len(buf))
    if kind == 1:
        buf[at] ^= 1 << rng.randrange(8)
    elif kind == 2:
        buf[at] = rng.randrange(256)
    elif kind == 3:
        width = rng.choice((1, 2, 4, 8))
        value = rng.choice(GENERIC) & ((1 << (8 * width)) - 1)
        raw = value.to_bytes(width, "little")[:len(buf) - at]
        buf[at:at + len(raw)] = raw
    elif kind == 4:
        del buf[at:at + rng.randrange(1, 17)]
    else:
        length = rng.randrange(1, 17)
        src = rng.randrange(len(buf))
        chunk = buf[src:src + length]
        buf[at:at + len(chunk)] = chunk
    return buf


def _splice(rng: random.Random, a: bytes, b: bytes) -> bytes:
    """Head of `a` then tail of `b`, cut at random points."""
    cut_a = rng.randrange(len(a) + 1)
    cut_b = rng.randrange(len(b) + 1)
    return a[:cut_a] + b[cut_b:]


def _plant_header(rng: random.Random, data: bytes, max_size: int) -> bytes:
    """Put a minimal loadable ELF header and one PT_LOAD in front of `data` (the template the
    loader accepts: RWX segment at 0x400000 covering the whole file, entry at its 0x100)."""
    body = data[:max(0, max_size - 0x100)]
    size = 0x100 + len(body)
    ident = ELF_MAGIC + bytes((ELFCLASS64, ELFDATA2LSB, EV_CURRENT, 0))
    header = _EHDR.pack(ident, ET_EXEC, EM_X86_64, EV_CURRENT, 0x40_0100, ELF64_EHDR_SIZE, 0, 0,
                        ELF64_EHDR_SIZE, ELF64_PHDR_SIZE, 1, 0, 0, 0)
    memsz = rng.choice((size, _align_up(size, PAGE), rng.choice(SIZES)))
    phdr = _PHDR.pack(PT_LOAD, PF_R | PF_W | PF_X, 0, 0x40_0000, 0x40_0000, size,
                      memsz & U64_MAX, PAGE)
    out = header + phdr
    out += bytes(0x100 - len(out)) + body
    return out[:max_size]
