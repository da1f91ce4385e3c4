"""Coverage sampling: which basic blocks of a kernel build a sample of its corpus reaches.

The fuzz jobs' coverage map is a hashed edge map kept per run, and it names no addresses, so
coverage is measured apart: up to N inputs of the build's shared corpus (plus the reproducers
of the build's buckets) are booted with a block hook over the kernel's code, and the executed
blocks are stored for the dashboard's Coverage page. The dashboard asks for a sample; a worker
runs it (`workers.tasks.sample_coverage`), since it boots untrusted inputs for a while.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from unicorn import UC_HOOK_BLOCK

from fuzz.harness import WATCHDOG
from kernel_emu.codescan import BULK_ROUTINES
from kernel_emu.errors import HarnessError
from kernel_emu.executor import Executor
from kernel_emu.image import KernelImage
from workers.kernels import NAME, KernelError, materialize
from workers.settings import Settings
from workers.store import FarmStore

log = logging.getLogger("fuzzfarm.workers")

MAX_SAMPLE = 5000
Progress = Callable[[int, int], None]


def hook_ranges(image: KernelImage) -> tuple[list[tuple[int, int]], list[str]]:
    """Inclusive address ranges to hook, and the bulk routines hooked at their entry only.

    memset and friends loop millions of times per boot (zeroing a segment), and a Python
    callback per iteration would make a sample take hours; their entry block still says
    whether they ran."""
    cut: list[tuple[int, int]] = []
    names = []
    for name in BULK_ROUTINES:
        sym = image.find_symbol(name)
        if sym is not None and sym.size > 0:
            cut.append((sym.address, sym.address + sym.size))
            names.append(name)
    out: list[tuple[int, int]] = []
    for lo, hi in image.text_ranges:
        pos = lo
        for c_lo, c_hi in sorted(cut):
            if c_hi <= pos or c_lo >= hi:
                continue
            if c_lo > pos:
                out.append((pos, c_lo - 1))
            out.append((c_lo, c_lo))
            pos = max(pos, c_hi)
        if pos < hi:
            out.append((pos, hi - 1))
    return out, names


@dataclass
class BlockRecorder:
    """Start and size of every translation block executed, however often."""

    blocks: dict[int, int]

    def attach(self, ranges: list[tuple[int, int]]) -> Callable[[Any], object]:
        def on_block(_uc: Any, address: int, size: int, _user: Any) -> None:
            self.blocks[address] = max(size, self.blocks.get(address, 0))

        def attach(uc: Any) -> object:
            return [uc.hook_add(UC_HOOK_BLOCK, on_block, None, lo, hi) for lo, hi in ranges]

        return attach


def _inputs(store: FarmStore, kernel: str, limit: int) -> tuple[list[str], list[str]]:
    """Corpus shas (the newest half, a random rest) and the bucket reproducers of `kernel`."""
    corpus = sorted(store.corpus.sample(kernel, limit // 2, limit - limit // 2))[:limit]
    repro: list[str] = []
    for b in store.buckets.all():
        if b.kernel == kernel:
            repro += [s for s in (b.reproducer, b.minimized) if s and s not in repro]
    return corpus, [s for s in repro if s not in corpus]


def sample_coverage(store: FarmStore, settings: Settings, kernel: str, limit: int,
                    progress: Progress | None = None) -> dict[str, Any]:
    """Boot the sample, store and return the coverage record."""
    t0 = time.time()
    profile = materialize(store, kernel, settings.cache_dir)
    corpus, repro = _inputs(store, kernel, limit)
    shas = corpus + repro
    recorder = BlockRecorder({})
    verdicts: Counter[str] = Counter()
    errors: list[str] = []
    ran = 0
    # The snapshot executor starts each input at the snapshot point, so the boot before it is
    # covered by one full boot (the executor checked that this part reads no input).
    full = Executor(profile, snapshot=False, watchdog=WATCHDOG)
    image = full.image
    ranges, bulk = hook_ranges(image)
    full.add_machine_hook(recorder.attach(ranges))
    snap: Executor | None = None
    for i in range(0, len(shas), 50):
        chunk = shas[i:i + 50]
        for sha, data in zip(chunk, store.blobs.get_many(chunk), strict=True):
            if data is None:
                errors.append(f"{sha}: not in Redis")
                continue
            if ran == 0:
                ex = full
            else:
                if snap is None:
                    snap = Executor(profile, snapshot=True, watchdog=WATCHDOG)
                    snap.add_machine_hook(recorder.attach(ranges))
                ex = snap
            try:
                result = ex.run(data)
            except HarnessError as e:
                errors.append(f"{sha}: {e}")
            else:
                verdicts[result.crash_class or result.verdict] += 1
            ran += 1
            if progress is not None:
                progress(ran, len(shas))
    record = {
        "kernel": kernel, "image": image.sha256, "load_base": image.load_base,
        "time": time.time(),
        "seconds": round(time.time() - t0, 1), "inputs": ran, "corpus_inputs": len(corpus),
        "reproducers": len(repro), "limit": limit, "verdicts": dict(verdicts),
        "errors": errors[:20], "error_count": len(errors), "entry_only": bulk,
        "blocks": sorted([a, s] for a, s in recorder.blocks.items()),
    }
    store.coverage.put_record(kernel, record)
    return record


def run_sample(store: FarmStore, settings: Settings, kernel: str, limit: Any) -> dict[str, Any]:
    """What the coverage task does: sample, saying how far it got in the build's job slot
    (the dashboard polls it); a failure is said there too, then raised."""
    if not NAME.match(kernel):
        raise KernelError(f"bad kernel build name {kernel!r:.80}")
    started = time.time()
    coverage = store.coverage
    inputs = 0  # the limit, once it is known to be a number

    def progress(done: int, total: int) -> None:
        coverage.set_job(kernel, {"state": "running", "done": done, "total": total,
                                  "started": started, "limit": inputs, "pid": os.getpid()})

    try:
        inputs = max(1, min(int(limit), MAX_SAMPLE))
        progress(0, 0)
        record = sample_coverage(store, settings, kernel, inputs, progress)
    except Exception as e:
        coverage.set_job(kernel, {"state": "failed", "error": f"{type(e).__name__}: {e}",
                                  "started": started, "finished": time.time()})
        raise
    coverage.set_job(kernel, {"state": "done", "done": record["inputs"],
                              "total": record["inputs"], "started": started,
                              "finished": time.time()})
    log.info("coverage of %s: %d inputs in %.1f s", kernel, record["inputs"], record["seconds"])
    return record
