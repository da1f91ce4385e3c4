"""The farm's settings, read from the environment only (what docker-compose sets)."""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

REDACTED = "***"
# what follows the scheme up to the last '@' before the path: a URL urlsplit cannot parse
_USERINFO = re.compile(r"(?<=://)[^/?#]*@")


class SettingsError(ValueError):
    """A farm setting in the environment that cannot be read: the user's to fix."""


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, not {raw!r}") from None


def _switch(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value in ("1", "on", "yes", "true"):
        return True
    if value in ("0", "off", "no", "false"):
        return False
    raise SettingsError(f"{name} must be 1 or 0 (on or off), not {raw!r}")


@dataclass(frozen=True)
class Settings:
    redis_url: str = "redis://127.0.0.1:6379/0"
    # one fuzzing task: a job process run for this long on one kernel build
    slice_seconds: float = 60.0
    # the first slices of a campaign the farm starts (`up`, FUZZFARM_CAMPAIGN, `campaign
    # start`): short, so that its first findings are triaged soon after the start (0: off)
    first_slice_seconds: float = 15.0
    # above the longest task (a slice, a minimization), or Redis hands a running task out again
    visibility_timeout: float = 900.0
    slice_rss_mb: int = 1024
    minimize_executions: int = 4000
    # a running slice not finished this long after its end is lost (its worker died)
    lost_grace: float = 90.0
    # unfinished triage older than this is sent again
    triage_grace: float = 120.0
    # where a worker caches kernel builds and corpora on its own disk
    cache_dir: Path = Path(tempfile.gettempdir()) / f"fuzzfarm-cache-{os.getuid()}"
    # each minimized bucket of a UEFI build is booted on QEMU + OVMF too (by workers that have
    # them); a crosscheck holds a core for a few seconds
    crosscheck: bool = True

    @classmethod
    def from_env(cls) -> Settings:
        d = cls()
        return cls(
            redis_url=os.environ.get("REDIS_URL") or d.redis_url,
            slice_seconds=_float("FUZZFARM_SLICE_SECONDS", d.slice_seconds),
            first_slice_seconds=_float("FUZZFARM_FIRST_SLICE_SECONDS", d.first_slice_seconds),
            visibility_timeout=_float("FUZZFARM_VISIBILITY_TIMEOUT", d.visibility_timeout),
            slice_rss_mb=int(_float("FUZZFARM_SLICE_RSS_MB", d.slice_rss_mb)),
            minimize_executions=int(_float("FUZZFARM_MINIMIZE_EXECUTIONS",
                                           d.minimize_executions)),
            cache_dir=Path(os.environ.get("FUZZFARM_CACHE") or d.cache_dir),
            lost_grace=_float("FUZZFARM_LOST_GRACE", d.lost_grace),
            triage_grace=_float("FUZZFARM_TRIAGE_GRACE", d.triage_grace),
            crosscheck=_switch("FUZZFARM_CROSSCHECK", d.crosscheck),
        )


def redact_url(url: str) -> str:
    """`url` as it may be shown or logged: a password, in the user part or as a `password=`
    query parameter (both of which redis-py reads), replaced by ***. A user part without a
    colon is taken for a password too, as some clients read it so."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return _USERINFO.sub(f"{REDACTED}@", url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, colon, _password = userinfo.partition(":")
        netloc = f"{user}:{REDACTED}@{host}" if colon else f"{REDACTED}@{host}"
    query = "&".join(
        f"{field.split('=', 1)[0]}={REDACTED}"
        if field.split("=", 1)[0].lower() == "password" else field
        for field in parts.query.split("&")) if parts.query else ""
    return urlunsplit(parts._replace(netloc=netloc, query=query))
