"""Which Redis the farm uses when it starts one, and with which settings: a `redis-server` on
PATH first, else the embedded Valkey server; a Redis given by URL is used as it is."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from tests.workers.conftest import ROOT, RedisServer
from workers.redis_server import embedded_dir, find_server


def test_without_redis_on_path_the_embedded_server_is_used(tmp_path: Path) -> None:
    server = find_server(path=str(tmp_path))  # an empty PATH
    assert server.origin == "embedded"
    assert server.product == "Valkey" and re.fullmatch(r"\d+\.\d+\.\d+", server.version)
    assert server.server.parent == embedded_dir()
    assert server.describe().startswith(f"embedded Valkey {server.version}")


def test_a_redis_server_on_path_comes_first(tmp_path: Path) -> None:
    embedded = find_server(path=str(tmp_path / "nothing"))
    (tmp_path / "redis-server").symlink_to(embedded.server)  # a real server under that name
    server = find_server(path=str(tmp_path))
    assert server.origin == "PATH"
    assert server.server == tmp_path / "redis-server"
    assert "found on PATH" in server.describe()


@pytest.mark.redis
def test_a_started_server_has_the_farms_persistence_settings(
        redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    config = {k: client.config_get(k)[k] for k in (
        "appendonly", "appendfsync", "save", "maxmemory-policy", "bind", "dir")}
    assert config == {"appendonly": "yes", "appendfsync": "everysec", "save": "",
                      "maxmemory-policy": "noeviction", "bind": "127.0.0.1",
                      "dir": str(redis_server.data)}


@pytest.mark.redis
@pytest.mark.farm
def test_up_uses_a_redis_given_by_url_and_starts_none(redis_server: RedisServer,
                                                        tmp_path: Path) -> None:
    env = {**os.environ, "REDIS_URL": redis_server.url, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "fuzzfarm.cli", "up", "--workers", "1",
                          "--seconds", "2", "--data", str(tmp_path / "farm")], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert f"Redis: the one at {redis_server.url}" in run.stderr
    assert "Redis: starting" not in run.stderr
    assert not (tmp_path / "farm" / "redis").exists()
    assert "Traceback" not in run.stderr
