"""How an input reaches the kernel as `bin/init`, as its profile's `[input]` table says.

- `firmware-ramdisk`: the input is the one file of a ramdisk (kernel_emu/ramdisk.py) that the
  emulated firmware hands over in its configuration table;
- `embedded`: the kernel carries its init program in its own image (a blob in its data, put
  there when it was built); the input is written over that blob.

Either way the input is placed after the snapshot is restored (or before a full boot reaches
the kernel's first read of it), and the kernel must not read it before the snapshot point:
`ranges` is what the snapshot boot watches.
"""

from __future__ import annotations

import struct

import lief

from kernel_emu.errors import ImageError, InputError
from kernel_emu.firmware import Firmware
from kernel_emu.image import KernelImage
from kernel_emu.machine import Machine
from kernel_emu.profile import TargetProfile
from kernel_emu.ramdisk import RamdiskTooLarge, init_ramdisk_head


class RamdiskChannel:
    """The input as the file of the firmware's ramdisk."""

    def __init__(self, firmware: Firmware) -> None:
        self.firmware = firmware
        self._previous = 0

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return self.firmware.ramdisk_ranges

    def place(self, *parts: bytes) -> None:
        """Place the input's encoding (`encode_parts`, or `encode`'s bytes)."""
        self._previous = self.firmware.hand_over_ramdisk(parts, self._previous)

    def forget(self) -> None:
        """A fresh machine: nothing of an earlier input is left to clear."""
        self._previous = 0


class EmbeddedChannel:
    """The input over the blob the kernel image carries its init program in."""

    def __init__(self, machine: Machine, profile: TargetProfile, image: KernelImage) -> None:
        layout = profile.input
        self.machine = machine
        self.base = image.symbol(layout.symbol).address
        self.size_at = self.base + layout.size_offset
        self.data_at = self.base + layout.data_offset
        self.capacity = layout.capacity
        # the image's own program is there at first: cleared with the first input
        self._previous = layout.capacity

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return [(self.size_at, self.size_at + 8), (self.data_at, self.data_at + self.capacity)]

    def place(self, *parts: bytes) -> None:
        m = self.machine
        size = 0
        for part in parts:
            m.write(self.data_at + size, part)
            size += len(part)
        if self._previous > size:
            m.zero(self.data_at + size, self._previous - size)
        m.write(self.size_at, struct.pack("<Q", size))
        self._previous = size

    def forget(self) -> None:
        self._previous = self.capacity


def encode_parts(profile: TargetProfile, data: bytes) -> tuple[bytes, ...]:
    """What `place` puts in guest memory for the input `data`, in parts written back to
    back: the ramdisk's head and the input itself, or the input alone (a run places the
    input where it lies, without a copy joined to the head). InputError when it does not
    fit."""
    layout = profile.input
    if layout.channel == "embedded":
        if len(data) > layout.capacity:
            raise InputError(f"input is {len(data)} bytes, over the {layout.capacity}-byte "
                             "capacity of the kernel's embedded init program")
        return (bytes(data),)
    try:
        return init_ramdisk_head(len(data)), bytes(data)
    except RamdiskTooLarge as e:
        raise InputError(str(e)) from e


def encode(profile: TargetProfile, data: bytes) -> bytes:
    """`encode_parts` as one string of bytes."""
    return b"".join(encode_parts(profile, data))


def channel_for(machine: Machine, firmware: Firmware, profile: TargetProfile,
                image: KernelImage) -> RamdiskChannel | EmbeddedChannel:
    if profile.input.channel == "embedded":
        return EmbeddedChannel(machine, profile, image)
    return RamdiskChannel(firmware)


def embed_in_image(profile: TargetProfile, data: bytes) -> bytes:
    """The profile's PE image as a file with `data` in its embedded-program blob (what a
    build embedding `data` would give, for booting it on real firmware): the blob's bytes
    are found through the section that holds the blob's symbol."""
    raw = bytearray(profile.image.read_bytes())
    layout = profile.input
    payload = encode(profile, data)
    binary = lief.PE.parse(list(raw)) if raw[:2] == b"MZ" else None
    if binary is None:
        raise ImageError(f"{profile.image}: not a PE image")
    image = KernelImage(profile.image)
    rva = image.symbol(layout.symbol).address - binary.optional_header.imagebase
    for section in binary.sections:
        start = section.virtual_address
        end = start + min(section.virtual_size, section.sizeof_raw_data)
        if start <= rva and rva + layout.data_offset + layout.capacity <= end:
            at = section.pointerto_raw_data + rva - start
            raw[at + layout.size_offset:at + layout.size_offset + 8] = \
                struct.pack("<Q", len(payload))
            blob = at + layout.data_offset
            raw[blob:blob + layout.capacity] = payload.ljust(layout.capacity, b"\0")
            return bytes(raw)
    raise ImageError(f"{profile.image}: the embedded program {layout.symbol} is not in the "
                     "file's data")
