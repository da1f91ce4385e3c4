"""The shared corpus of each kernel build: the inputs fuzz slices found worth keeping.

Schema
------
`ff:corpus:<kernel>` (zset)
    Input sha256 → time added: the shared corpus of one build (the bytes are blobs).
    Written by: fuzz slices (`Corpus.add`, `ZADD NX`).
"""

from __future__ import annotations

import time

from workers.store.blobs import blob_entries, sha256
from workers.store.connection import Connection, decode


def corpus_key(kernel: str) -> str:
    return "ff:corpus:" + kernel


class Corpus:
    def __init__(self, conn: Connection) -> None:
        self._r = conn.client

    def sample(self, kernel: str, recent: int, sampled: int) -> set[str]:
        """The `recent` newest inputs plus up to `sampled` others picked at random."""
        key = corpus_key(kernel)
        with self._r.pipeline(transaction=False) as p:
            p.zrevrange(key, 0, recent - 1)
            # as many as both parts: enough left to pick `sampled` outside the newest
            p.zrandmember(key, recent + sampled)
            newest, random_ones = p.execute()
        chosen = {decode(m) for m in newest}
        others = [m for m in dict.fromkeys(decode(m) for m in random_ones or [])
                  if m not in chosen]
        return chosen | set(others[:sampled])

    def add(self, kernel: str, inputs: list[bytes]) -> int:
        """Add inputs to the shared corpus in three commands, whatever their number; returns
        how many were new."""
        if not inputs:
            return 0
        by_sha = {sha256(d): d for d in inputs}
        key = corpus_key(kernel)
        scores = self._r.zmscore(key, list(by_sha))
        new = {sha: by_sha[sha] for sha, score in zip(by_sha, scores, strict=True)
               if score is None}
        if not new:
            return 0
        # no MULTI: the blobs go first, so the corpus never names a missing one, and a blob
        # left without its corpus entry by a crash in between is harmless
        with self._r.pipeline(transaction=False) as p:
            p.mset(blob_entries(new))  # content-addressed: overwriting writes the same bytes
            p.zadd(key, dict.fromkeys(new, time.time()), nx=True)
            return int(p.execute()[-1])

    def has(self, kernel: str, sha: str) -> bool:
        return self._r.zscore(corpus_key(kernel), sha) is not None

    def size(self, kernel: str) -> int:
        return int(self._r.zcard(corpus_key(kernel)))
