"""Reading docker-compose.yml the way Compose does, so tests can run what it would run."""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
# the Compose Specification's JSON schema, vendored: see test_compose's validation test
SCHEMA = Path(__file__).parent / "compose-spec.json"

# values a user would put in .env; only the tests' own, never real secrets
TEST_ENV = {
    "REDIS_PASSWORD": "test-redis-password-1f2e",
    "FUZZFARM_DASHBOARD_TOKEN": "test-dashboard-token-9a8b",
    "FLOWER_USER": "ops",
    "FLOWER_PASSWORD": "test-flower-password",
}

_REFERENCE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")
_BRACED = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>.*))?$",
                     re.DOTALL)


class InterpolationError(ValueError):
    """A required variable is unset (Compose refuses the file), or a reference is malformed."""


def interpolate_text(text: str, env: Mapping[str, str]) -> str:
    """Compose's variable syntax: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default},
    ${VAR:?error}, ${VAR?error}, ${VAR:+other}, ${VAR+other}."""

    def one(m: re.Match[str]) -> str:
        if m.group("escaped"):
            return "$"
        if m.group("named"):
            return env.get(m.group("named"), "")
        braced = _BRACED.match(m.group("braced"))
        if braced is None or "${" in m.group("braced"):
            raise InterpolationError(f"unsupported reference {m.group(0)!r}")
        name, op, arg = braced.group("name"), braced.group("op"), braced.group("arg") or ""
        value = env.get(name)
        # the ':' forms treat an empty value as unset
        unset = value is None or (value == "" and op is not None and op.startswith(":"))
        if op is None:
            return value or ""
        if op.endswith("-"):
            return arg if unset else str(value)
        if op.endswith("?"):
            if unset:
                raise InterpolationError(f"{name}: {arg}")
            return str(value)
        return "" if unset else arg  # '+': the alternative when set

    return _REFERENCE.sub(one, text)


def interpolate(node: Any, env: Mapping[str, str]) -> Any:
    """Interpolate every string value of a parsed compose file (keys stay as they are)."""
    if isinstance(node, str):
        return interpolate_text(node, env)
    if isinstance(node, list):
        return [interpolate(x, env) for x in node]
    if isinstance(node, dict):
        return {k: interpolate(v, env) for k, v in node.items()}
    return node


def load_raw() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


def load(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    return interpolate(load_raw(), TEST_ENV if env is None else env)


def app_services(compose: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run this project's image (built from the Dockerfile)."""
    return {name: s for name, s in compose["services"].items() if "build" in s}


def service_env(service: Mapping[str, Any]) -> dict[str, str]:
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        pairs = (item.split("=", 1) for item in raw)
        return {k: v for k, v in (p if len(p) == 2 else (p[0], "") for p in pairs)}
    return {str(k): "" if v is None else str(v) for k, v in raw.items()}


def command(service: Mapping[str, Any]) -> list[str]:
    cmd = service.get("command")
    if cmd is None:
        return []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(x) for x in cmd]


def healthcheck_argv(service: Mapping[str, Any]) -> tuple[str, list[str]]:
    """("CMD", argv) or ("CMD-SHELL", [script]) for a service's health check."""
    test = service["healthcheck"]["test"]
    if isinstance(test, str):
        return "CMD-SHELL", [test]
    kind, *rest = test
    assert kind in ("CMD", "CMD-SHELL"), f"health check form {kind!r}"
    return kind, [str(x) for x in rest]


def health_words(service: Mapping[str, Any]) -> list[str]:
    """The health check as words, whichever form it is written in."""
    kind, argv = healthcheck_argv(service)
    return shlex.split(argv[0]) if kind == "CMD-SHELL" else argv


def host_ports(service: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(host address, host port, container port) for each published port."""
    out = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            out.append((str(port.get("host_ip", "")), str(port.get("published", "")),
                        str(port["target"])))
            continue
        parts = str(port).split(":")
        if len(parts) == 3:
            out.append((parts[0], parts[1], parts[2]))
        elif len(parts) == 2:
            out.append(("", parts[0], parts[1]))
        else:
            out.append(("", "", parts[0]))
    return out
