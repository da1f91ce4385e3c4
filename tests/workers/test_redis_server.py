"""Which Redis the farm uses when it starts one, and with which settings: a `redis-server` on
PATH first, else the embedded Valkey server; a Redis given by URL is used as it is."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from tests.workers.conftest import ROOT, RedisServer
from workers.redis_server import (
    PasswordError,
    embedded_dir,
    farm_password,
    find_server,
    write_config,
)


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
    # used as given, password and all, and named without the password
    assert f"Redis: the one at redis://:***@127.0.0.1:{redis_server.port}/0" in run.stderr
    assert "Redis: starting" not in run.stderr
    assert not (tmp_path / "farm" / "redis").exists()
    assert "Traceback" not in run.stderr
    logs = [p.read_text() for p in (tmp_path / "farm" / "logs").glob("*.log")]
    assert len(logs) == 2  # the worker's and the controller's
    for text in [run.stderr, *logs]:
        assert redis_server.password not in text


def _no_chmod(*_args: object, **_kwargs: object) -> None:
    raise AssertionError("the file must be created private, not made private afterwards")


def test_the_password_is_made_once_private_and_used_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("chmod", "fchmod", "lchmod"):
        monkeypatch.setattr(os, name, _no_chmod, raising=False)
    old = os.umask(0)  # whatever the umask, nobody else may read it
    try:
        password = farm_password(tmp_path)
        config = write_config(tmp_path, password)
    finally:
        os.umask(old)
    assert re.fullmatch(r"[0-9a-f]{64}", password)  # 32 random bytes
    for path in (tmp_path / "password", config):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert config.read_text().splitlines()[-1] == f"requirepass {password}"
    assert farm_password(tmp_path) == password
    assert sorted(p.name for p in tmp_path.iterdir()) == ["password", "redis.conf"]
    argv = find_server().command(6379, tmp_path, config)
    assert argv[1] == str(config) and password not in " ".join(argv)


def test_a_password_file_others_can_read_or_garbled_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "password"
    path.write_text("0123456789abcdef0123\n")
    path.chmod(0o644)
    with pytest.raises(PasswordError, match=r"readable by others \(mode 0644\)"):
        farm_password(tmp_path)
    path.chmod(0o600)
    assert farm_password(tmp_path) == "0123456789abcdef0123"
    for garbled in ("short", "has spaces in it, twenty+", "pass@word/with:url-chars"):
        path.write_text(garbled)
        with pytest.raises(PasswordError, match="must hold one password"):
            farm_password(tmp_path)
    path.unlink()
    (tmp_path / "elsewhere").write_text("0123456789abcdef0123")
    path.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(PasswordError, match="cannot read"):
        farm_password(tmp_path)


@pytest.mark.redis
def test_a_started_server_refuses_clients_without_the_password(
        redis_server: RedisServer) -> None:
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=redis_server.port, socket_connect_timeout=2).ping()
    wrong = f"redis://:{'0' * 64}@127.0.0.1:{redis_server.port}/0"
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(wrong, socket_connect_timeout=2).ping()
    assert redis.Redis.from_url(redis_server.url).ping()
    assert redis_server.proc is not None
    # the server rewrites its process title ("valkey-server 127.0.0.1:PORT"): the arguments
    # it was started with are what the test sees of the command line
    argv = [str(a) for a in redis_server.proc.args]
    assert redis_server.password not in " ".join(argv)
    assert argv[1] == str(redis_server.data / "redis.conf")
