"""The race's naive baseline: a plain Unicorn fuzzer in Python.

Run with a competitor's own interpreter (it imports only the standard library, `unicorn` and
`resume.py` beside it):

    python naive.py EXPORT SEEDS OUT SECONDS [RNG_SEED]

It resumes the exported snapshot (resume.py), and for every input restores the machine
(Unicorn's own context save/restore with memory), writes the input and runs it to a stop.
Coverage: a Python block hook records edges (previous block, this block). Mutation: a random
stack of one to six byte-level changes (bit flips, random bytes, interesting integers,
deleted, duplicated or spliced chunks) of a random corpus entry. An input that shows a new
edge joins the corpus. A crash (resume.py: panic, fault, hang) is saved when it shows an edge
no earlier crash showed, as AFL keeps "unique" crashes, to
`OUT/crashes/<milliseconds since start>-<kind>-<sha256 prefix>.bin`. `OUT/stats.json` is
rewritten every two seconds and at the end: execs, elapsed seconds, corpus size, crashes.
SIGTERM or SIGINT ends the run early, statistics written.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

from resume import Export
from unicorn.unicorn_const import (
    UC_CTL_CONTEXT_CPU,
    UC_CTL_CONTEXT_MEMORY,
    UC_CTL_CONTEXT_MODE,
    UC_CTL_IO_WRITE,
    UC_HOOK_BLOCK,
)

INTERESTING = (0, 1, 0x7F, 0x80, 0xFF, 0x100, 0x1000, 0x7FFF, 0x8000, 0xFFFF, 0x10000,
               0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF, 0x1_0000_0000, 0x7FFF_FFFF_FFFF_FFFF,
               0x8000_0000_0000_0000, 0xFFFF_FFFF_FFFF_FFFF)
MAX_LEN = 1 << 20


def mutate(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    out = bytearray(data or b"\0")
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(7)
        at = rng.randrange(len(out)) if out else 0
        if op == 0 and out:
            out[at] ^= 1 << rng.randrange(8)
        elif op == 1 and out:
            out[at] = rng.randrange(256)
        elif op == 2:
            size = rng.choice((1, 2, 4, 8))
            value = rng.choice(INTERESTING) & ((1 << 8 * size) - 1)
            out[at:at + size] = value.to_bytes(size, "little")
        elif op == 3 and len(out) > 1:
            del out[at:at + rng.randint(1, min(64, len(out) - 1))]
        elif op == 4:
            chunk = out[at:at + rng.randint(1, 64)]
            out[at:at] = chunk
        elif op == 5:
            other = rng.choice(corpus)
            cut = rng.randrange(len(other) + 1)
            out = out[:at] + bytearray(other[cut:])
        elif op == 6 and out:
            out[at] = (out[at] + rng.choice((-1, 1))) & 0xFF
    return bytes(out[:MAX_LEN])


def main(argv: list[str]) -> int:
    export_dir, seeds_dir, out_dir, seconds = argv[1], Path(argv[2]), Path(argv[3]), argv[4]
    rng = random.Random(int(argv[5]) if len(argv) > 5 else 1)
    deadline = time.monotonic() + float(seconds)
    out = Path(out_dir)
    (out / "crashes").mkdir(parents=True, exist_ok=True)
    export = Export(export_dir)
    uc = export.machine()
    edges: set[int] = set()
    run_edges: set[int] = set()
    last = [0]

    stop = [False]

    def on_block(uc_: Any, address: int, _size: int, _user: Any) -> None:
        run_edges.add((last[0] << 1 ^ address) & 0xFFFF_FFFF_FFFF)
        last[0] = address
        if stop[0]:
            uc_.emu_stop()

    uc.hook_add(UC_HOOK_BLOCK, on_block)
    # a context that holds memory too (Unicorn 2.1: copy-on-write snapshots of the RAM)
    uc.ctl(UC_CTL_CONTEXT_MODE, UC_CTL_IO_WRITE,
           ctypes.c_int(UC_CTL_CONTEXT_CPU | UC_CTL_CONTEXT_MEMORY))
    snapshot = uc.context_save()

    def request_stop(_signum: int, _frame: Any) -> None:
        stop[0] = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGALRM, request_stop)  # the deadline, even in the middle of a run
    signal.setitimer(signal.ITIMER_REAL, float(seconds))
    start = time.monotonic()
    execs = 0
    crash_edges: set[int] = set()
    crashes = 0
    corpus = [p.read_bytes() for p in sorted(seeds_dir.iterdir()) if p.is_file()]
    queue = [d for d in corpus if export.fits(d)]
    if not queue:
        print("no seed fits the input channel", file=sys.stderr)
        return 2
    pending = list(queue)  # the seeds run first, as they are
    corpus = []
    next_stats = 0.0

    def write_stats(done: bool = False) -> None:
        stats = {"execs": execs, "seconds": time.monotonic() - start, "corpus": len(corpus),
                 "crashes": crashes, "edges": len(edges), "done": done}
        tmp = out / "stats.json.tmp"
        tmp.write_text(json.dumps(stats) + "\n")
        tmp.replace(out / "stats.json")

    while not stop[0] and time.monotonic() < deadline:
        data = pending.pop() if pending else mutate(rng, rng.choice(corpus), corpus)
        if not export.fits(data):
            continue
        uc.context_restore(snapshot)
        run_edges.clear()
        last[0] = 0
        outcome = export.run(uc, data)
        if stop[0]:
            break  # cut short: not a run
        execs += 1
        new = run_edges - edges
        if new:
            edges |= new
            corpus.append(data)
        if outcome.crash and run_edges - crash_edges:
            crash_edges |= run_edges
            crashes += 1
            ms = int((time.monotonic() - start) * 1000)
            sha = hashlib.sha256(data).hexdigest()[:16]
            (out / "crashes" / f"{ms:09d}-{outcome.kind}-{sha}.bin").write_bytes(data)
        if time.monotonic() >= next_stats:
            write_stats()
            next_stats = time.monotonic() + 2.0
    write_stats(done=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
