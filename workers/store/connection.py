"""The farm's connection to Redis: the client, the loading of the store's Lua scripts, the
errors callers catch, and the few questions asked of the server itself.

Only the store modules beside this one hold a client; everything else in the farm goes through
:class:`workers.store.FarmStore` and catches :data:`StoreError` or :data:`StoreUnavailable`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from typing import Any

import redis
from redis.commands.core import Script

# Anything Redis refused or failed to answer.
StoreError = redis.exceptions.RedisError
# No answer at all: the server is down, restarting, or still replaying its AOF.
StoreUnavailable = redis.exceptions.ConnectionError

# a blocking pop's socket must stay open past the wait itself
BLOCKING_SLACK = 15
# the farm's connections are named by role on the server: fuzzfarm-worker, fuzzfarm-controller…
CLIENT_PREFIX = "fuzzfarm-"


def decode(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def decode_hash(raw: dict[Any, Any]) -> dict[str, str]:
    return {decode(k): decode(v) for k, v in raw.items()}


def server_time(r: redis.Redis) -> float:
    """Redis's clock in seconds: every time the farm compares across machines is in it, so
    that their own clocks may disagree."""
    seconds, micros = r.time()
    return float(seconds) + micros / 1e6


def hashes(r: redis.Redis, keys: list[str]) -> list[dict[str, str]]:
    """The hashes at `keys` that exist, decoded, in one round trip."""
    if not keys:
        return []
    with r.pipeline(transaction=False) as p:
        for key in keys:
            p.hgetall(key)
        raws = p.execute()
    return [decode_hash(raw) for raw in raws if raw]


class Connection:
    """One Redis client and what the store modules need from it."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._blocking: redis.Redis | None = None

    @classmethod
    def from_url(cls, url: str, role: str = "client") -> Connection:
        """`role` names the connection on the server (CLIENT LIST): `fuzzfarm-<role>`."""
        return cls(redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=5,
                                        retry_on_timeout=True, health_check_interval=30,
                                        client_name=CLIENT_PREFIX + role))

    def script(self, source: str) -> Script:
        """A Lua script run by its sha (EVALSHA), loaded again by itself after a restart."""
        return self.client.register_script(source)

    def blocking(self, seconds: int) -> redis.Redis:
        """A client of its own for blocking commands of up to `seconds`: the shared one's
        socket timeout would cut a longer wait short."""
        if self._blocking is None:
            pool = self.client.connection_pool
            kwargs = {**pool.connection_kwargs, "socket_timeout": seconds + BLOCKING_SLACK}
            self._blocking = redis.Redis(connection_pool=redis.ConnectionPool(
                connection_class=pool.connection_class, **kwargs))
        return self._blocking

    def ping(self) -> None:
        """Raises StoreError (StoreUnavailable when nothing answers) unless Redis answers."""
        self.client.ping()

    def clients(self, roles: Collection[str] | None = None) -> int:
        """Client connections the server has, this one included; with `roles`, only the
        farm's connections of those roles."""
        listed = self.client.client_list()
        if roles is None:
            return len(listed)
        names = {CLIENT_PREFIX + role for role in roles}
        return sum(c.get("name") in names for c in listed)

    def commands_processed(self) -> int:
        """The server's count of commands run since it started (INFO stats)."""
        return int(self.client.info("stats")["total_commands_processed"])

    def queue_length(self, queue: str) -> int:
        """Messages waiting in a Celery queue (Kombu keeps each as a Redis list of its name)."""
        return int(self.client.llen(queue))

    def close(self) -> None:
        self.client.close()
        if self._blocking is not None:
            self._blocking.close()


def wait_until_up(url: str, timeout: float, check: Callable[[], None] = lambda: None,
                  poll: float = 0.2) -> bool:
    """Until the Redis at `url` answers PING: True, or False once `timeout` seconds passed.
    A server replaying its AOF is not up yet. `check` runs between tries and may raise to give
    up early (the server we started has exited, say)."""
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=5)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                if client.ping():
                    return True
            except StoreUnavailable:  # BusyLoadingError too: it is a ConnectionError
                pass
            check()
            if time.monotonic() > deadline:
                return False
            time.sleep(poll)
    finally:
        client.close()
