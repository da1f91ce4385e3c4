"""Kernel builds as data: each build's profile and the sha256 of its image blob, so every worker
boots the same bytes (`workers/kernels.py` adds and materializes them).

Schema
------
`ff:kernels` (set)
    Names of kernel builds.
    Written by: `kernel add`, `ensure_builtin`.
`ff:kernel:<name>` (hash)
    `name`, `profile` (TOML with `image = "image.elf"`, or `"image.efi"` for a UEFI
    application), `image` (sha256 of the image blob), `map` (sha256 of the blob holding a UEFI
    image's link map, where its symbols come from; empty for an ELF image), `debug` (sha256
    of a UEFI image's DWARF companion, where its source lines come from; empty if none),
    `description`, `added`.
    Written by: `kernel add`, `ensure_builtin`.
`ff:image-files:<image sha256>` (hash)
    `map`, and `debug` if there is one: the blobs that go with that UEFI image, which the
    dashboard needs to name the functions and source lines of an image it fetched by sha256,
    even after its build was replaced.
    Written by: `kernel add`, `ensure_builtin`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from workers.store.connection import Connection, decode, decode_hash

KERNELS = "ff:kernels"


def kernel_key(name: str) -> str:
    return "ff:kernel:" + name


def image_files_key(image_sha: str) -> str:
    return "ff:image-files:" + image_sha


@dataclass(frozen=True)
class KernelBuild:
    name: str
    profile: str  # the profile's TOML, its image named `image.elf`
    image: str  # sha256 of the image blob
    description: str
    added: float
    map: str = ""  # sha256 of a UEFI image's link-map blob
    debug: str = ""  # sha256 of a UEFI image's DWARF companion blob


class Kernels:
    def __init__(self, conn: Connection) -> None:
        self._r = conn.client

    def put(self, name: str, profile_toml: str, image_sha: str, description: str,
            map_sha: str = "", debug_sha: str = "") -> None:
        with self._r.pipeline() as p:
            p.hset(kernel_key(name), mapping={
                "name": name, "profile": profile_toml, "image": image_sha, "map": map_sha,
                "debug": debug_sha, "description": description, "added": time.time()})
            files = {k: v for k, v in (("map", map_sha), ("debug", debug_sha)) if v}
            if files:
                p.hset(image_files_key(image_sha), mapping=files)
            p.sadd(KERNELS, name)
            p.execute()

    def image_files(self, image_sha: str) -> dict[str, str]:
        """The blobs stored with this UEFI image: `map`, and `debug` if it has one."""
        return decode_hash(self._r.hgetall(image_files_key(image_sha)))

    def get(self, name: str) -> KernelBuild | None:
        h = decode_hash(self._r.hgetall(kernel_key(name)))
        if not h:
            return None
        return KernelBuild(h.get("name", name), h.get("profile", ""), h.get("image", ""),
                           h.get("description", ""), float(h.get("added", 0) or 0),
                           h.get("map", ""), h.get("debug", ""))

    def names(self) -> list[str]:
        return sorted(decode(k) for k in self._r.smembers(KERNELS))
