"""Ramdisk image layout (guest/ABI.md), round trips, capacity and malformed images."""

from __future__ import annotations

import random
import struct
from collections.abc import Callable

import pytest

from kernel_emu.ramdisk import (
    DATA_ALIGN,
    FILE_HEADER_SIZE,
    INIT_MODE,
    RAMDISK_CAPACITY,
    RAMDISK_MAGIC,
    SUPERBLOCK_SIZE,
    RamdiskTooLarge,
    build_init_ramdisk,
    build_ramdisk,
    parse_ramdisk,
)


def _superblock(image: bytes) -> tuple[bytes, int, int, int, int]:
    magic, version, count, total, headers = struct.unpack_from("<8sIIQQ", image, 0)
    return magic, version, count, total, headers


def _header(image: bytes, index: int) -> tuple[int, int, int, int, int]:
    fields = struct.unpack_from("<IIQQQ", image, SUPERBLOCK_SIZE + index * FILE_HEADER_SIZE)
    return fields[0], fields[1], fields[2], fields[3], fields[4]


def test_sizes_match_the_abi() -> None:
    assert SUPERBLOCK_SIZE == 32
    assert FILE_HEADER_SIZE == 32
    assert RAMDISK_CAPACITY == 16 * 1024 * 1024


def test_init_ramdisk_layout() -> None:
    init = b"\x7fELF" + bytes(range(256)) * 3
    image = build_init_ramdisk(init)

    assert _superblock(image) == (RAMDISK_MAGIC, 1, 1, len(image), 32)
    name_offset, name_len, data_offset, data_size, mode = _header(image, 0)
    assert image[name_offset:name_offset + name_len] == b"bin/init"
    assert name_offset >= SUPERBLOCK_SIZE + FILE_HEADER_SIZE
    assert data_offset % DATA_ALIGN == 0
    assert data_offset >= name_offset + name_len
    assert data_size == len(init)
    assert mode == INIT_MODE == 0o100755
    assert image[data_offset:data_offset + data_size] == init
    assert parse_ramdisk(image) == [("bin/init", data_offset, len(init))]


def test_init_ramdisk_is_the_general_layout() -> None:
    """The one-file image is put together on its own; byte for byte what the general
    builder makes of the same file."""
    for size in (0, 1, 15, 16, 17, 100, 4096, 32768):
        init = bytes((i * 7 + size) & 0xFF for i in range(size))
        assert build_init_ramdisk(init) == build_ramdisk([("bin/init", init, INIT_MODE)])


def test_empty_init_still_round_trips() -> None:
    image = build_init_ramdisk(b"")
    [(name, offset, size)] = parse_ramdisk(image)
    assert (name, size) == ("bin/init", 0)
    assert offset % DATA_ALIGN == 0


def test_multi_file_round_trip() -> None:
    rng = random.Random(7)
    files = [
        ("bin/init", rng.randbytes(1234), 0o100755),
        ("etc/motd", b"hello\n", 0o100644),
        ("empty", b"", 0o100600),
        ("dir/ünïcode-名前", rng.randbytes(17), 0o100444),
        ("a" * 300, rng.randbytes(4096), 0o100755),
    ]
    image = build_ramdisk(files)
    magic, version, count, total, headers = _superblock(image)
    assert (magic, version, count, total, headers) == (RAMDISK_MAGIC, 1, len(files), len(image), 32)

    parsed = parse_ramdisk(image)
    assert [name for name, _, _ in parsed] == [name for name, _, _ in files]
    previous_end = SUPERBLOCK_SIZE + FILE_HEADER_SIZE * len(files)
    for index, ((_, contents, mode), (_, offset, size)) in enumerate(zip(files, parsed,
                                                                        strict=True)):
        assert offset % DATA_ALIGN == 0
        assert offset >= previous_end
        assert size == len(contents)
        assert image[offset:offset + size] == contents
        assert _header(image, index)[4] == mode
        previous_end = offset + size


def test_parse_accepts_the_whole_firmware_region() -> None:
    image = build_init_ramdisk(b"abc")
    region = image.ljust(RAMDISK_CAPACITY, b"\0")
    assert parse_ramdisk(region) == parse_ramdisk(image)


def test_capacity_boundary() -> None:
    [(_, data_offset, _)] = parse_ramdisk(build_init_ramdisk(b""))
    largest = RAMDISK_CAPACITY - data_offset
    image = build_init_ramdisk(bytes(largest))
    assert len(image) == RAMDISK_CAPACITY

    with pytest.raises(RamdiskTooLarge) as info:
        build_init_ramdisk(bytes(largest + 1))
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "\n" not in message
    assert str(RAMDISK_CAPACITY + 1) in message
    assert str(RAMDISK_CAPACITY) in message


def test_many_small_files_over_capacity() -> None:
    files = [(f"f{i}", bytes(1), 0o100644) for i in range(RAMDISK_CAPACITY // 48)]
    with pytest.raises(RamdiskTooLarge):
        build_ramdisk(files)


def test_bad_mode_is_rejected() -> None:
    with pytest.raises(ValueError, match="mode"):
        build_ramdisk([("x", b"", -1)])
    with pytest.raises(ValueError, match="mode"):
        build_ramdisk([("x", b"", 1 << 64)])


def _with(image: bytes, offset: int, fmt: str, value: int | bytes) -> bytes:
    out = bytearray(image)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda im: im[:31], "shorter than"),
        (lambda im: _with(im, 0, "<8s", b"RXRAMFS2"), "magic"),
        (lambda im: _with(im, 8, "<I", 2), "version"),
        (lambda im: _with(im, 16, "<Q", 1 << 40), "total_size"),
        (lambda im: _with(im, 24, "<Q", 8), "overlaps the superblock"),
        (lambda im: _with(im, 24, "<Q", (1 << 64) - 1), "file headers"),
        (lambda im: _with(im, 12, "<I", 0xFFFF_FFFF), "file headers"),
        (lambda im: _with(im, 32, "<I", 0xFFFF_FFFF), "name runs past"),
        (lambda im: _with(im, 36, "<I", 0xFFFF_FFFF), "name runs past"),
        (lambda im: _with(im, 40, "<Q", (1 << 64) - 1), "data runs past"),
        (lambda im: _with(im, 48, "<Q", 1 << 33), "data runs past"),
        (lambda im: _with(im, SUPERBLOCK_SIZE + FILE_HEADER_SIZE, "<B", 0xFF), "not UTF-8"),
    ],
    ids=["short", "magic", "version", "total", "headers-overlap", "headers-far",
         "count", "name-offset", "name-len", "data-offset", "data-size", "name-utf8"],
)
def test_malformed_images_raise_value_error(
    mutate: Callable[[bytes], bytes], message: str
) -> None:
    image = build_init_ramdisk(b"\x7fELF" * 10)
    with pytest.raises(ValueError, match=message):
        parse_ramdisk(mutate(image))


def test_garbage_only_ever_raises_value_error() -> None:
    rng = random.Random(0xD15C)
    good = build_ramdisk([("bin/init", rng.randbytes(300), 0o100755),
                          ("x", rng.randbytes(40), 0o100644)])
    for i in range(3000):
        if i % 3 == 0:
            data = rng.randbytes(rng.randrange(200))
        else:
            out = bytearray(good)
            for _ in range(rng.randint(1, 6)):
                position = rng.randrange(len(out))
                out[position] = rng.randrange(256)
            if i % 3 == 2:
                out = out[:rng.randrange(len(out) + 1)]
            data = bytes(out)
        try:
            entries = parse_ramdisk(data)
        except ValueError:
            continue
        for name, offset, size in entries:
            assert isinstance(name, str)
            assert offset + size <= len(data)
