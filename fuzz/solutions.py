"""Where a local campaign keeps what it found, on disk, shared by its jobs.

Layout of a campaign's output directory::

    corpus/                      libFuzzer's queue, shared by the jobs (inputs that added coverage)
    solutions/<bucket>/<sha>.elf a crashing input; <bucket> is derived from the signature
    solutions/<bucket>/<sha>.json its Result
    harness-errors/<sha>.json    our own failures: never kernel findings
    harness-errors/<sha>.bin     the input that provoked one
    jobs/job-<n>.json            per-job statistics, rewritten about once a second
    jobs/job-<n>.log             the job's libFuzzer output

Every file is written to a temporary name and renamed, so a reader (or a job killed midway)
never sees half a file. Several jobs may store reproducers of one bucket at once: each input is
its own file, named by its sha256, and the smallest one is the bucket's reproducer.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kernel_emu.result import Result


def bucket_id(signature: str) -> str:
    return hashlib.sha256(signature.encode()).hexdigest()[:16]


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class Bucket:
    id: str
    signature: str
    crash_class: str
    reproducer: Path
    size: int
    reproducers: int


class Solutions:
    """The crashing inputs of one campaign, one directory per signature."""

    def __init__(self, out: Path) -> None:
        self.root = out / "solutions"
        self.errors = out / "harness-errors"

    def record(self, data: bytes, result: Result) -> Path:
        """Store a crashing input with its Result; returns the input's path."""
        assert result.signature is not None
        sha = hashlib.sha256(data).hexdigest()
        folder = self.root / bucket_id(result.signature)
        path = folder / f"{sha}.elf"
        # the Result first: an input without its Result would be a bucket with no report
        write_atomic(folder / f"{sha}.json", result.dumps().encode())
        write_atomic(path, data)
        return path

    def record_error(self, data: bytes, error: str, detail: str) -> Path:
        sha = hashlib.sha256(data).hexdigest()
        write_atomic(self.errors / f"{sha}.bin", data)
        report = {"error": error, "detail": detail, "input_sha256": sha}
        path = self.errors / f"{sha}.json"
        write_atomic(path, json.dumps(report, indent=2).encode())
        return path

    def buckets(self) -> list[Bucket]:
        out = []
        if not self.root.is_dir():
            return out
        for folder in sorted(self.root.iterdir()):
            inputs = [p for p in folder.glob("*.elf") if p.with_suffix(".json").is_file()]
            if not inputs:
                continue
            smallest = min(inputs, key=lambda p: (p.stat().st_size, p.name))
            report = _read_json(smallest.with_suffix(".json"))
            out.append(Bucket(folder.name, str(report.get("signature", "?")),
                              str(report.get("crash_class", "?")), smallest,
                              smallest.stat().st_size, len(inputs)))
        return out

    def error_count(self) -> int:
        return len(list(self.errors.glob("*.json"))) if self.errors.is_dir() else 0


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
