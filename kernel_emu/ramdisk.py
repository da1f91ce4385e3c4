"""The ramdisk image the emulated firmware hands to the kernel (format in guest/ABI.md).

Layout, all little-endian:
  superblock (32 bytes)  magic b"RXRAMFS1", version u32, file_count u32, total_size u64,
                         headers_offset u64 (= 32)
  file headers (32 each) name_offset u32, name_len u32, data_offset u64, data_size u64, mode u64
  names                  packed back to back, no terminator (name_len is authoritative)
  data                   each file's bytes starting on a 16-byte boundary
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

RAMDISK_MAGIC = b"RXRAMFS1"
RAMDISK_VERSION = 1
# The firmware maps a fixed 16 MiB region whatever the input size (see ABI.md).
RAMDISK_CAPACITY = 16 * 1024 * 1024
DATA_ALIGN = 16
INIT_PATH = "bin/init"
INIT_MODE = 0o100755

_SUPERBLOCK = struct.Struct("<8sIIQQ")
_FILE_HEADER = struct.Struct("<IIQQQ")
SUPERBLOCK_SIZE = _SUPERBLOCK.size
FILE_HEADER_SIZE = _FILE_HEADER.size

_U32_MAX = (1 << 32) - 1
_U64_MAX = (1 << 64) - 1


class RamdiskTooLarge(ValueError):
    """The image would not fit in the firmware's fixed ramdisk region."""

    def __init__(self, size: int, capacity: int = RAMDISK_CAPACITY) -> None:
        super().__init__(f"ramdisk image is {size} bytes, over the {capacity}-byte capacity")
        self.size = size
        self.capacity = capacity


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def build_ramdisk(files: Sequence[tuple[str, bytes, int]]) -> bytes:
    """Build an image from (name, contents, mode) triples, in the given order."""
    if len(files) > _U32_MAX:
        raise ValueError(f"too many files for a ramdisk: {len(files)}")
    names: list[bytes] = []
    for name, _contents, mode in files:
        encoded = name.encode("utf-8")
        if not 0 <= mode <= _U64_MAX:
            raise ValueError(f"mode {mode:#o} of {name!r} does not fit in a u64")
        names.append(encoded)

    # The whole layout is computed before anything is allocated so an oversized input fails
    # fast instead of building a huge buffer first.
    headers_end = SUPERBLOCK_SIZE + FILE_HEADER_SIZE * len(files)
    name_offsets: list[int] = []
    cursor = headers_end
    for encoded in names:
        name_offsets.append(cursor)
        cursor += len(encoded)
    data_offsets: list[int] = []
    for _name, contents, _mode in files:
        cursor = _align_up(cursor, DATA_ALIGN)
        data_offsets.append(cursor)
        cursor += len(contents)
    total_size = cursor
    if total_size > RAMDISK_CAPACITY:
        raise RamdiskTooLarge(total_size)

    image = bytearray(total_size)
    _SUPERBLOCK.pack_into(
        image, 0, RAMDISK_MAGIC, RAMDISK_VERSION, len(files), total_size, SUPERBLOCK_SIZE
    )
    for index, ((_name, contents, mode), encoded) in enumerate(zip(files, names, strict=True)):
        _FILE_HEADER.pack_into(
            image,
            SUPERBLOCK_SIZE + index * FILE_HEADER_SIZE,
            name_offsets[index],
            len(encoded),
            data_offsets[index],
            len(contents),
            mode,
        )
        image[name_offsets[index]:name_offsets[index] + len(encoded)] = encoded
        image[data_offsets[index]:data_offsets[index] + len(contents)] = contents
    return bytes(image)


_INIT_NAME = INIT_PATH.encode("utf-8")
_INIT_HEADERS = SUPERBLOCK_SIZE + FILE_HEADER_SIZE + len(_INIT_NAME)
_INIT_DATA = _align_up(_INIT_HEADERS, DATA_ALIGN)


def init_ramdisk_head(size: int) -> bytes:
    """The bytes of an image holding only bin/init that come before init's own, for an init
    of `size` bytes (`build_ramdisk`'s layout): the image is this, then init byte for byte.
    Every run of a fuzzing job places one, the input written after it where it lies."""
    total = _INIT_DATA + size
    if total > RAMDISK_CAPACITY:
        raise RamdiskTooLarge(total)
    return b"".join((
        _SUPERBLOCK.pack(RAMDISK_MAGIC, RAMDISK_VERSION, 1, total, SUPERBLOCK_SIZE),
        _FILE_HEADER.pack(SUPERBLOCK_SIZE + FILE_HEADER_SIZE, len(_INIT_NAME), _INIT_DATA,
                          size, INIT_MODE),
        _INIT_NAME, bytes(_INIT_DATA - _INIT_HEADERS)))


def build_init_ramdisk(init: bytes) -> bytes:
    """An image holding only bin/init, the fuzzed ELF byte for byte."""
    return init_ramdisk_head(len(init)) + bytes(init)


def parse_ramdisk(image: bytes) -> list[tuple[str, int, int]]:
    """(name, data_offset, data_size) for each file; ValueError when the image is malformed.

    `image` may be longer than total_size (for example the whole firmware region), but every
    range the image describes must lie within total_size.
    """
    size = len(image)
    if size < SUPERBLOCK_SIZE:
        raise ValueError(f"ramdisk is {size} bytes, shorter than the {SUPERBLOCK_SIZE}-byte "
                         "superblock")
    magic, version, file_count, total_size, headers_offset = _SUPERBLOCK.unpack_from(image, 0)
    if magic != RAMDISK_MAGIC:
        raise ValueError(f"bad ramdisk magic {magic!r}, expected {RAMDISK_MAGIC!r}")
    if version != RAMDISK_VERSION:
        raise ValueError(f"unsupported ramdisk version {version}, expected {RAMDISK_VERSION}")
    if total_size > size:
        raise ValueError(f"ramdisk total_size {total_size} exceeds the {size} bytes given")
    if headers_offset < SUPERBLOCK_SIZE:
        raise ValueError(f"ramdisk headers_offset {headers_offset} overlaps the superblock")
    headers_end = headers_offset + file_count * FILE_HEADER_SIZE
    if headers_end > total_size:
        raise ValueError(
            f"{file_count} file headers at offset {headers_offset} run past total_size "
            f"{total_size}"
        )

    entries: list[tuple[str, int, int]] = []
    for index in range(file_count):
        name_offset, name_len, data_offset, data_size, _mode = _FILE_HEADER.unpack_from(
            image, headers_offset + index * FILE_HEADER_SIZE
        )
        if name_offset + name_len > total_size:
            raise ValueError(f"ramdisk file {index}: name runs past total_size {total_size}")
        if data_offset + data_size > total_size:
            raise ValueError(f"ramdisk file {index}: data runs past total_size {total_size}")
        raw_name = bytes(image[name_offset:name_offset + name_len])
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"ramdisk file {index}: name {raw_name!r} is not UTF-8") from exc
        entries.append((name, data_offset, data_size))
    return entries
