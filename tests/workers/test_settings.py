"""The farm's settings: a Redis URL as it may be shown, switches read from the environment."""

from __future__ import annotations

import pytest

from workers.settings import Settings, redact_url


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("redis://:s3cret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
    ("redis://farm:s3cret@redis:6379/0", "redis://farm:***@redis:6379/0"),
    ("rediss://s3cret@farm.example:6380/1", "rediss://***@farm.example:6380/1"),
    ("redis://redis:6379/0?password=s3cret&db=2", "redis://redis:6379/0?password=***&db=2"),
    ("redis://redis/0?socket_timeout=5&PASSWORD=s3cret", "redis://redis/0?socket_timeout=5"
     "&PASSWORD=***"),
    ("unix://:s3cret@/run/redis.sock?db=0", "unix://:***@/run/redis.sock?db=0"),
    ("redis://:s3c@ret@127.0.0.1/0", "redis://:***@127.0.0.1/0"),
    # urlsplit refuses this one: the user part goes all the same
    ("redis://:s3cret@[::1:6379/0", "redis://***@[::1:6379/0"),
    ("", ""),
])
def test_a_url_is_shown_without_its_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "s3cret" not in redact_url(url)


@pytest.mark.parametrize(("raw", "on"), [("", True), ("1", True), ("on", True), ("Yes", True),
                                         ("0", False), ("off", False), ("false", False)])
def test_crosschecks_are_on_unless_turned_off(monkeypatch: pytest.MonkeyPatch, raw: str,
                                              on: bool) -> None:
    from workers.app import worker_queues

    monkeypatch.setenv("FUZZFARM_CROSSCHECK", raw)
    assert Settings.from_env().crosscheck is on
    if not on:
        assert "crosscheck" not in worker_queues()


def test_a_crosscheck_switch_that_is_neither_on_nor_off_is_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FUZZFARM_CROSSCHECK", "maybe")
    with pytest.raises(ValueError, match="FUZZFARM_CROSSCHECK must be 1 or 0"):
        Settings.from_env()
