"""Everything the farm keeps in Redis, and the only code that names or writes a key.

One module per aggregate, each with its part of the schema in its docstring (`SCHEMA.md` is
the index): `blobs` (bytes by sha256), `kernels`, `corpus`, `campaigns` (and their slices),
`buckets` (and reports, and triage not yet done), `stats` (counters, heartbeats, harness
errors, time series), `coverage`; `connection` holds the client and the errors callers catch.

Multi-key updates run as Lua scripts or MULTI/EXEC, so a worker killed midway leaves either the
old state or the new one, and every update is idempotent: doing it twice (a task delivered
again after a crash) changes nothing the second time.
"""

from __future__ import annotations

from collections.abc import Collection

from workers.store.blobs import Blobs, sha256
from workers.store.buckets import Bucket, Buckets, Reports, Triage, Upsert
from workers.store.campaigns import Campaign, Campaigns, Slice, StateWatch
from workers.store.connection import (
    Connection,
    StoreError,
    StoreUnavailable,
    wait_until_up,
)
from workers.store.corpus import Corpus
from workers.store.coverage import Coverage
from workers.store.kernels import KernelBuild, Kernels
from workers.store.stats import HarnessErrorRecord, Heartbeat, Stats

__all__ = [
    "Bucket", "Campaign", "FarmStore", "HarnessErrorRecord", "Heartbeat", "KernelBuild",
    "Slice", "StateWatch", "StoreError", "StoreUnavailable", "Upsert", "sha256",
    "wait_until_up",
]


class FarmStore:
    """The farm's Redis, one attribute per aggregate."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self.blobs = Blobs(conn)
        self.kernels = Kernels(conn)
        self.corpus = Corpus(conn)
        self.campaigns = Campaigns(conn)
        self.buckets = Buckets(conn)
        self.reports = Reports(conn)
        self.triage = Triage(conn)
        self.stats = Stats(conn)
        self.coverage = Coverage(conn)

    @classmethod
    def connect(cls, url: str, role: str = "client") -> FarmStore:
        """No command is sent yet: a Redis that is down raises StoreUnavailable on first use.
        `role` names the connection on the server (`fuzzfarm-<role>`): `worker` and
        `controller` are the ones a stopping farm waits for (workers/redis_guard.py)."""
        return cls(Connection.from_url(url, role))

    def ping(self) -> None:
        """Raises StoreError (StoreUnavailable when nothing answers) unless Redis answers."""
        self._conn.ping()

    def clients(self, roles: Collection[str] | None = None) -> int:
        """Client connections the Redis server has, this store's included; with `roles`, only
        the farm's connections of those roles."""
        return self._conn.clients(roles)

    def commands_processed(self) -> int:
        """Commands the Redis server ran since it started (for measuring the farm's load)."""
        return self._conn.commands_processed()

    def queue_length(self, queue: str) -> int:
        """Messages waiting in one of the farm's Celery queues."""
        return self._conn.queue_length(queue)

    def close(self) -> None:
        self._conn.close()
