# Types of the native page-table walks and page copies (kernel_emu/native/walk.c).
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from typing import Any, Literal, TypeVar, overload

from typing_extensions import Buffer

T = TypeVar("T")

def restore_pages(ram: Buffer, saved: Sequence[bytes | None], bitmap: Buffer,
                  give_back: Buffer | None = ..., /) -> None: ...
def user_leaves(
    ram: Buffer, base: int, cr3: int, max_leaves: int, runs: bool = ..., /
) -> tuple[list[tuple[int, int, int, bool, bool, int, bool]], list[int]] | None: ...
def user_space_judge(
    ram: Buffer, base: int, cr3: int, rsp: int, user_top: int,
    segments: Sequence[tuple[int, int, int, int, int]], file: Buffer,
    kernel_phys: Sequence[tuple[int, int]], stack: tuple[int, int] | None, max_leaves: int, /
) -> tuple[Any, ...] | None: ...

# the forms of a dirty walk's answer: lists, bit masks (bytes), a count, one bit mask
@overload
def dirty_leaves(
    ram: Buffer, base: int, root: int, accessed_level: int, max_pages: int, max_tables: int,
    form: Literal[0] = ..., /
) -> tuple[list[int], list[int], list[tuple[int, int, int]]] | None: ...
@overload
def dirty_leaves(
    ram: Buffer, base: int, root: int, accessed_level: int, max_pages: int, max_tables: int,
    form: Literal[1], /
) -> tuple[bytes, bytes, list[tuple[int, int, int]]] | None: ...
@overload
def dirty_leaves(
    ram: Buffer, base: int, root: int, accessed_level: int, max_pages: int, max_tables: int,
    form: Literal[2], /
) -> int | None: ...
@overload
def dirty_leaves(
    ram: Buffer, base: int, root: int, accessed_level: int, max_pages: int, max_tables: int,
    form: Literal[3], forbidden: Buffer, /
) -> bytes | None: ...
def held_words(data: Buffer, start: int, keys: Sequence[int], /) -> list[int]: ...
def leaks_reached(ram: Buffer, base: int, live: Sequence[Sequence[Any]],
                  roots: Sequence[tuple[int, int]], values: Sequence[int], scan_limit: int,
                  max_live: int, /) -> bool: ...
def read_register(uc_reg_read: int, uc: int, regid: int, /) -> int: ...
def read_registers(uc_reg_read: int, uc: int, regids: tuple[int, ...], /) -> tuple[int, ...]: ...
def write_register(uc_reg_write: int, uc: int, regid: int, value: int, /) -> None: ...
def bits_meet(a: Buffer, b: Buffer, /) -> bool: ...
def bits_or(a: Buffer, b: Buffer, /) -> bytes: ...
def bits_and_indexes(a: Buffer, b: Buffer, /) -> list[int]: ...
def replay_allocations(events: Sequence[Any], alloc_entry: int, returns: AbstractSet[int],
                       dealloc_entry: int, realloc_entry: int,
                       registers: tuple[int, int, int, int], allocation: type[T], /
                       ) -> tuple[list[T], list[T]] | None: ...
def heap_blocks(ram: Buffer, base: int, heap_base: int, heap_end: int,
                layout: tuple[int, int, int, int, int, int, int, int], head: tuple[int, bool],
                by_address: bool, max_blocks: int, block: type[T], /) -> list[T] | None: ...
