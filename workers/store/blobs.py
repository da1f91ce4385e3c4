"""Bytes by sha256: every input and every kernel image is stored once, under its own hash, and
everything else refers to it by that id.

Schema
------
`ff:blob:<sha256>` (string)
    Bytes: an input or a kernel image, named by its sha256. Never changed or deleted: writing
    one that exists writes the same bytes. (`kernel add` reads its image back and replaces
    a blob whose bytes do not match its name, which only a writer outside the farm can make.)
    Written by: slices (corpus, findings), triage, minimize, `kernel add`.
"""

from __future__ import annotations

import hashlib

from workers.store.connection import Connection


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def blob_key(sha: str) -> str:
    return "ff:blob:" + sha


def blob_entries(by_sha: dict[str, bytes]) -> dict[str, bytes]:
    """Keys and values for an MSET, for the store modules that write blobs together with keys
    of their own in one command."""
    return {blob_key(sha): data for sha, data in by_sha.items()}


class Blobs:
    def __init__(self, conn: Connection) -> None:
        self._r = conn.client

    def put(self, data: bytes) -> str:
        sha = sha256(data)
        self._r.set(blob_key(sha), data, nx=True)
        return sha

    def put_many(self, inputs: list[bytes]) -> list[str]:
        """Store several in one command (a blob's bytes are its name, so writing one that
        exists changes nothing)."""
        shas = [sha256(d) for d in inputs]
        if shas:
            self._r.mset(blob_entries(dict(zip(shas, inputs, strict=True))))
        return shas

    def get(self, sha: str) -> bytes | None:
        return self._r.get(blob_key(sha))

    def get_many(self, shas: list[str]) -> list[bytes | None]:
        return self._r.mget([blob_key(s) for s in shas]) if shas else []

    def holds(self, sha: str) -> bool:
        """The blob named `sha` is there and its bytes hash to `sha`."""
        data = self.get(sha)
        return data is not None and sha256(data) == sha

    def overwrite(self, data: bytes) -> str:
        """Store `data` even over a blob of its name holding other bytes."""
        sha = sha256(data)
        self._r.set(blob_key(sha), data)
        return sha
