"""Reading a build's coverage record (a worker samples it: `workers/coverage.py`)."""

from __future__ import annotations

import bisect

# inputs a sample boots unless `python -m dashboard --coverage-sample N` says otherwise
DEFAULT_SAMPLE = 200


class Intervals:
    """Merged executed address ranges, for 'was the instruction at A executed'."""

    def __init__(self, blocks: list[list[int]]) -> None:
        merged: list[list[int]] = []
        for start, size in sorted((int(a), max(int(s), 1)) for a, s in blocks):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], start + size)
            else:
                merged.append([start, start + size])
        self._starts = [m[0] for m in merged]
        self._ends = [m[1] for m in merged]

    def __contains__(self, address: int) -> bool:
        i = bisect.bisect_right(self._starts, address) - 1
        return i >= 0 and address < self._ends[i]
