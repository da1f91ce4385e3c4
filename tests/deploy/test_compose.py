"""docker-compose.yml: valid for Compose, safe by default, and running only what the image has."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.deploy.compose import (
    ROOT,
    SCHEMA,
    TEST_ENV,
    InterpolationError,
    app_services,
    command,
    health_words,
    host_ports,
    interpolate_text,
    load,
    load_raw,
    service_env,
)

APP = ("worker", "controller", "dashboard")


def _fuzzfarm() -> Path:
    exe = Path(sys.executable).parent / "fuzzfarm"
    assert exe.is_file(), f"the fuzzfarm entry point is not installed next to {sys.executable}"
    return exe


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load()


def test_interpolation_follows_compose_syntax() -> None:
    env = {"SET": "v", "EMPTY": ""}
    cases = {
        "$$HOME": "$HOME", "$SET/x": "v/x", "${SET}": "v", "${NOPE}": "",
        "${NOPE:-d}": "d", "${EMPTY:-d}": "d", "${EMPTY-d}": "", "${SET:-d}": "v",
        "${SET:?e}": "v", "${SET:+alt}": "alt", "${EMPTY:+alt}": "", "${EMPTY+alt}": "alt",
        "a ${NOPE:-x y} b": "a x y b",
    }
    for text, expected in cases.items():
        assert interpolate_text(text, env) == expected, text
    for text in ("${NOPE:?needed}", "${EMPTY:?needed}", "${NOPE?needed}"):
        with pytest.raises(InterpolationError, match="needed"):
            interpolate_text(text, env)
    assert interpolate_text("${EMPTY?needed}", env) == ""


def test_the_file_validates_against_the_compose_specification(compose: dict[str, Any]) -> None:
    """The schema is compose-spec/compose-spec's schema/compose-spec.json as of its commit
    170098b (2026-06-23; the schema itself last changed 2025-10-28), Apache-2.0
    (compose-spec.LICENSE beside it)."""
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    # as written (what `docker-compose config` reads) and as Compose sees it after interpolation
    for document in (load_raw(), compose):
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                  for e in validator.iter_errors(document)]
        assert not errors, "\n".join(errors)


def test_the_file_has_no_version_key_and_the_expected_services(compose: dict[str, Any]) -> None:
    assert "version" not in load_raw()
    assert {"redis", *APP} <= set(compose["services"])
    assert set(app_services(compose)) == set(APP)


def test_secrets_are_required_not_defaulted() -> None:
    for missing in ("REDIS_PASSWORD", "FUZZFARM_DASHBOARD_TOKEN"):
        env = {k: v for k, v in TEST_ENV.items() if k != missing}
        with pytest.raises(InterpolationError, match=missing):
            load(env)
    # Flower is optional: its password is checked in its own container, not by Compose
    without_flower = {k: v for k, v in TEST_ENV.items() if not k.startswith("FLOWER_")}
    assert load(without_flower)["services"]["flower"]["environment"]["FLOWER_PASSWORD"] == ""


def test_workers_scale(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    assert "container_name" not in worker
    # a fixed host port would let only one replica start
    assert all(not published for _, published, _ in host_ports(worker))
    assert "hostname" not in worker


def test_app_services_wait_for_a_healthy_redis(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if name == "redis":
            continue
        depends = service.get("depends_on")
        assert isinstance(depends, dict), f"{name}: depends_on needs conditions"
        assert set(depends) == {"redis"}, name
        for dep in depends.values():
            assert dep["condition"] == "service_healthy", name


def test_every_service_has_a_health_check_but_flower(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if name != "flower":
            assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"


def _redis_settings(args: list[str]) -> dict[str, str]:
    """The redis service's server settings: the arguments after its `sh -c` script and $0."""
    assert args[:2] == ["sh", "-c"] and args[3] == "redis-server", args
    return dict(zip(args[4::2], args[5::2], strict=True))


def test_redis_is_durable_and_password_protected(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    assert redis["image"].startswith("redis:7")
    args = command(redis)
    pairs = _redis_settings(args)
    assert pairs["--appendonly"] == "yes"
    assert pairs["--appendfsync"] == "everysec"
    assert pairs["--maxmemory-policy"] == "noeviction"
    # the password is on no command line: the script hands it over in a file
    assert "--requirepass" not in args
    assert all(TEST_ENV["REDIS_PASSWORD"] not in arg for arg in args)
    assert 'exec redis-server "$conf" "$@"' in args[2]
    assert service_env(redis)["REDIS_PASSWORD"] == TEST_ENV["REDIS_PASSWORD"]
    assert redis["user"] == "redis" and redis["tmpfs"] == ["/tmp"]
    # the health check must authenticate, or it fails on a password-protected Redis, and it
    # must do so without a password on its own command line
    words = health_words(redis)
    assert words[0] == "redis-cli" and "ping" in words
    assert "-a" not in words and "--pass" not in words
    assert service_env(redis).get("REDISCLI_AUTH") == TEST_ENV["REDIS_PASSWORD"]
    assert any(str(v).endswith(":/data") for v in redis["volumes"])
    assert not redis.get("ports"), "Redis is reached over the compose network only"


def _run_redis_script(tmp_path: Path, compose: dict[str, Any],
                      password: str) -> subprocess.CompletedProcess[str]:
    """The redis service's command, run by sh with a `redis-server` that notes its arguments
    and its config file's mode and text instead of serving."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    fake = bindir / "redis-server"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$NOTES/argv"\n'
                    'stat -c %a "$1" > "$NOTES/mode"\ncat "$1" > "$NOTES/config"\n')
    fake.chmod(0o755)
    redis = compose["services"]["redis"]
    env = {**service_env(redis), "REDIS_PASSWORD": password, "PATH": f"{bindir}:/usr/bin:/bin",
           "TMPDIR": str(tmp_path), "NOTES": str(tmp_path)}
    return subprocess.run(command(redis), env=env, capture_output=True, text=True, timeout=30)


def test_the_redis_password_reaches_the_server_in_a_private_file(
        tmp_path: Path, compose: dict[str, Any]) -> None:
    password = TEST_ENV["REDIS_PASSWORD"]
    run = _run_redis_script(tmp_path, compose, password)
    assert run.returncode == 0, run.stderr
    argv = (tmp_path / "argv").read_text().splitlines()
    assert Path(argv[0]).parent == tmp_path and password not in "\n".join(argv)
    assert argv[1:] == command(compose["services"]["redis"])[4:]
    assert (tmp_path / "mode").read_text().strip() == "600"
    assert (tmp_path / "config").read_text() == f"requirepass {password}\n"
    # a password that would not survive REDIS_URL or the config file is refused, in one line
    bad = _run_redis_script(tmp_path, compose, "pass word#1")
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1
    assert "REDIS_PASSWORD may hold only" in bad.stderr


def test_app_services_reach_redis_with_the_password(compose: dict[str, Any]) -> None:
    expected = f"redis://:{TEST_ENV['REDIS_PASSWORD']}@redis:6379/0"
    for name, service in app_services(compose).items():
        assert service_env(service)["REDIS_URL"] == expected, name
    flower = compose["services"]["flower"]
    assert service_env(flower)["CELERY_BROKER_URL"] == expected


def test_published_ports_are_on_the_loopback_only(compose: dict[str, Any]) -> None:
    dashboard = compose["services"]["dashboard"]
    assert host_ports(dashboard) == [("127.0.0.1", "8000", "8000")]
    args = command(dashboard)
    assert args[args.index("--port") + 1] == "8000"
    assert "http://127.0.0.1:8000/healthz" in " ".join(health_words(dashboard))
    assert service_env(dashboard)["FUZZFARM_DASHBOARD_TOKEN"] == TEST_ENV[
        "FUZZFARM_DASHBOARD_TOKEN"]
    # read protection is passed through when set, and off (empty) when not
    assert {k: v for k, v in service_env(dashboard).items() if "READ" in k or "TRUST" in k} == {
        "FUZZFARM_DASHBOARD_READ_TOKEN": "", "FUZZFARM_DASHBOARD_TRUST_HEADER": ""}
    env = {**TEST_ENV, "FUZZFARM_DASHBOARD_READ_TOKEN": "r", "FUZZFARM_DASHBOARD_TRUST_HEADER":
           "X-Forwarded-User"}
    guarded = service_env(load(env)["services"]["dashboard"])
    assert guarded["FUZZFARM_DASHBOARD_READ_TOKEN"] == "r"
    assert guarded["FUZZFARM_DASHBOARD_TRUST_HEADER"] == "X-Forwarded-User"
    for name, service in compose["services"].items():
        for host, _, _ in host_ports(service):
            assert host == "127.0.0.1", f"{name} publishes beyond localhost"


def test_flower_is_optional_and_behind_basic_auth(compose: dict[str, Any]) -> None:
    flower = compose["services"]["flower"]
    assert flower["profiles"] == ["flower"]
    script = " ".join(command(flower))
    # Flower reads FLOWER_BASIC_AUTH from its environment: no password on its command line
    assert 'export FLOWER_BASIC_AUTH="$FLOWER_USER:$FLOWER_PASSWORD"' in script
    assert "--basic-auth" not in script
    assert 'test -n "$FLOWER_PASSWORD"' in script


def test_the_controller_starts_a_campaign_on_seed(compose: dict[str, Any]) -> None:
    env = service_env(compose["services"]["controller"])
    assert env["FUZZFARM_CAMPAIGN"] == "seed"
    assert int(env["FUZZFARM_CAMPAIGN_SLICES"]) >= 1


def test_the_worker_health_check_pings_its_own_node(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    args = command(worker)
    name = args[args.index("--name") + 1] if "--name" in args else "worker"
    words = health_words(worker)
    assert words[:5] == ["celery", "-A", "workers.app", "inspect", "ping"]
    # `fuzzfarm worker --name N` runs the node N@%h; in a container %h is $HOSTNAME
    assert words[words.index("-d") + 1] == f"{name}@$HOSTNAME"


def _installed_scripts() -> set[str]:
    return {ep.name for ep in importlib.metadata.entry_points(group="console_scripts")}


def _project_scripts() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])


def _check_runnable(words: list[str], where: str) -> None:
    """What the image has: the project's own entry points, the dependencies' (celery) and
    python; a module named with -A or -m must import, code given with -c must compile."""
    exe = words[0]
    if exe in ("python", "python3"):
        if words[1] == "-m":
            assert importlib.util.find_spec(words[2]), f"{where}: no module {words[2]}"
        else:
            assert words[1] == "-c", where
            compile(words[2], where, "exec")
        return
    if exe in _project_scripts():
        return
    assert exe in _installed_scripts(), f"{where}: {exe} is not an installed entry point"
    if "-A" in words:
        module = words[words.index("-A") + 1]
        assert importlib.util.find_spec(module), f"{where}: no module {module}"


def test_every_command_is_an_entry_point_of_the_image(compose: dict[str, Any]) -> None:
    assert "fuzzfarm" in _project_scripts()
    for name, service in app_services(compose).items():
        assert "entrypoint" not in service, name
        _check_runnable(command(service), f"{name} command")
        _check_runnable(health_words(service), f"{name} health check")


def _subcommands(compose: dict[str, Any]) -> set[str]:
    subs = set()
    for service in app_services(compose).values():
        for words in (command(service), health_words(service)):
            if words[0] == "fuzzfarm":
                subs.add(words[1])
    return subs


def test_every_fuzzfarm_subcommand_used_exists(compose: dict[str, Any]) -> None:
    subs = _subcommands(compose)
    assert {"worker", "controller", "dashboard"} <= subs
    for sub in sorted(subs):
        run = subprocess.run([str(_fuzzfarm()), sub, "--help"], capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 0, f"fuzzfarm {sub} --help: {run.stderr}"
