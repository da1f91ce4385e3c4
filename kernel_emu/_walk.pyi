# Types of the native page-table walks and page copies (kernel_emu/native/walk.c).
from collections.abc import Sequence
from typing import Literal, overload

from typing_extensions import Buffer

def restore_pages(ram: Buffer, saved: Sequence[bytes | None], bitmap: bytes, /) -> None: ...
def user_leaves(
    ram: Buffer, base: int, cr3: int, max_leaves: int, runs: bool = ..., /
) -> tuple[list[tuple[int, int, int, bool, bool, int, bool]], list[int]] | None: ...

# the three forms of a dirty walk's answer: lists, bit masks (bytes), a count
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
def held_words(data: Buffer, start: int, keys: Sequence[int], /) -> list[int]: ...
def read_register(uc_reg_read: int, uc: int, regid: int, /) -> int: ...
def write_register(uc_reg_write: int, uc: int, regid: int, value: int, /) -> None: ...
