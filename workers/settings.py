"""The farm's settings, read from the environment only (what docker-compose sets)."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, not {raw!r}") from None


@dataclass(frozen=True)
class Settings:
    redis_url: str = "redis://127.0.0.1:6379/0"
    # one fuzzing task: a job process run for this long on one kernel build
    slice_seconds: float = 60.0
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

    @classmethod
    def from_env(cls) -> Settings:
        d = cls()
        return cls(
            redis_url=os.environ.get("REDIS_URL") or d.redis_url,
            slice_seconds=_float("FUZZFARM_SLICE_SECONDS", d.slice_seconds),
            visibility_timeout=_float("FUZZFARM_VISIBILITY_TIMEOUT", d.visibility_timeout),
            slice_rss_mb=int(_float("FUZZFARM_SLICE_RSS_MB", d.slice_rss_mb)),
            minimize_executions=int(_float("FUZZFARM_MINIMIZE_EXECUTIONS",
                                           d.minimize_executions)),
            cache_dir=Path(os.environ.get("FUZZFARM_CACHE") or d.cache_dir),
            lost_grace=_float("FUZZFARM_LOST_GRACE", d.lost_grace),
            triage_grace=_float("FUZZFARM_TRIAGE_GRACE", d.triage_grace),
        )
