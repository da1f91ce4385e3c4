"""Sampled coverage of each kernel build, and the one sampling job a build may have at a time
(the dashboard asks for a sample; a worker takes it: `workers/coverage.py`).

Schema
------
`ff:coverage:<kernel>` (string)
    JSON: `kernel`, `image` (sha256 of the image sampled), `load_base` (where a PE image was
    loaded, else null), `time`, `seconds`, `inputs`
    (booted), `corpus_inputs`, `reproducers`, `limit`, `verdicts` (class or verdict →
    count), `errors` (first 20), `error_count`, `entry_only` (routines hooked at their entry
    only), `blocks` (`[start, size]` of every executed translation block in the kernel's
    code).
    Written by: the coverage task.
`ff:coverage-job:<kernel>` (string, expires)
    JSON: `state` (starting: the task is queued; running, done, failed), `done`, `total`,
    `started`, `finished`, `error`, `limit`, `pid`; claimed by a script, so one sample is
    queued or runs per build; expires after 6 h while starting or running, 24 h when
    finished.
    Written by: the dashboard (claims it), the coverage task.
"""

from __future__ import annotations

import json
import time
from typing import Any

from workers.store.connection import Connection

# a job that died without saying so must not block the next one forever
JOB_TTL = 6 * 3600
DONE_TTL = 24 * 3600


def coverage_key(kernel: str) -> str:
    return "ff:coverage:" + kernel


def job_key(kernel: str) -> str:
    return "ff:coverage-job:" + kernel


# KEYS: job key. ARGV: new state JSON, ttl. Takes the slot unless a sample holds it.
CLAIM = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local ok, state = pcall(cjson.decode, cur)
  if ok and type(state) == 'table' and (state['state'] == 'starting' or
                                        state['state'] == 'running') then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[2]))
return 1
"""


class Coverage:
    def __init__(self, conn: Connection) -> None:
        self._r = conn.client
        self._claim = conn.script(CLAIM)

    def record(self, kernel: str) -> dict[str, Any] | None:
        raw = self._r.get(coverage_key(kernel))
        if raw is None:
            return None
        try:
            record = json.loads(raw)
        except ValueError:
            return None
        return record if isinstance(record, dict) else None

    def put_record(self, kernel: str, record: dict[str, Any]) -> None:
        self._r.set(coverage_key(kernel), json.dumps(record))

    def job(self, kernel: str) -> dict[str, Any] | None:
        raw = self._r.get(job_key(kernel))
        try:
            state = json.loads(raw) if raw else None
        except ValueError:
            return None
        return state if isinstance(state, dict) else None

    def claim_job(self, kernel: str, limit: int) -> bool:
        """Take the one sampling slot of this build (False: a sample is queued or running)."""
        state = {"state": "starting", "done": 0, "total": 0, "started": time.time(),
                 "limit": limit}
        return bool(self._claim(keys=[job_key(kernel)], args=[json.dumps(state), JOB_TTL]))

    def set_job(self, kernel: str, state: dict[str, Any]) -> None:
        """A job starting or running holds the slot for JOB_TTL at most, a finished one's
        outcome is kept for DONE_TTL."""
        active = state.get("state") in ("starting", "running")
        self._r.set(job_key(kernel), json.dumps(state), ex=JOB_TTL if active else DONE_TTL)
