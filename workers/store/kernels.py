"""Kernel builds as data: each build's profile and the sha256 of its image blob, so every worker
boots the same bytes (`workers/kernels.py` adds and materializes them).

Schema
------
`ff:kernels` (set)
    Names of kernel builds.
    Written by: `kernel add`, `ensure_builtin`.
`ff:kernel:<name>` (hash)
    `name`, `profile` (TOML with `image = "image.elf"`), `image` (sha256 of the image blob),
    `description`, `added`.
    Written by: `kernel add`, `ensure_builtin`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from workers.store.connection import Connection, decode, decode_hash

KERNELS = "ff:kernels"


def kernel_key(name: str) -> str:
    return "ff:kernel:" + name


@dataclass(frozen=True)
class KernelBuild:
    name: str
    profile: str  # the profile's TOML, its image named `image.elf`
    image: str  # sha256 of the image blob
    description: str
    added: float


class Kernels:
    def __init__(self, conn: Connection) -> None:
        self._r = conn.client

    def put(self, name: str, profile_toml: str, image_sha: str, description: str) -> None:
        with self._r.pipeline() as p:
            p.hset(kernel_key(name), mapping={
                "name": name, "profile": profile_toml, "image": image_sha,
                "description": description, "added": time.time()})
            p.sadd(KERNELS, name)
            p.execute()

    def get(self, name: str) -> KernelBuild | None:
        h = decode_hash(self._r.hgetall(kernel_key(name)))
        if not h:
            return None
        return KernelBuild(h.get("name", name), h.get("profile", ""), h.get("image", ""),
                           h.get("description", ""), float(h.get("added", 0) or 0))

    def names(self) -> list[str]:
        return sorted(decode(k) for k in self._r.smembers(KERNELS))
