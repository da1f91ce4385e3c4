"""Golden Results: what the emulator says of a fixed set of inputs, recorded once, so that a
change meant to keep results (a refactor, a speed-up) is checked to keep every byte of them.

The inputs are committed files only (examples, seeds, regression files), the bug reproducers
applied to a committed example, and byte mutations of each seed drawn from a fixed seed: none
depends on the machine's compiler. Each Result is kept as the sha256 of its JSON (without the
format version field, which names the format, not the run) plus a few readable fields.

A change that is meant to alter results regenerates the file, and says so in its commit:
`python -m tests.kernel_emu.golden`.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kernel_emu.executor import Executor
from kernel_emu.profile import load_profile
from tests.reproducers import REPRODUCERS

ROOT = Path(__file__).parents[2]
GOLDEN = Path(__file__).parent / "golden-results.jsonl"
KERNELS = ("seed", "fixed")
MUTANTS_PER_SEED = 6
WATCHDOG = 200_000  # the fuzzer's: runs that stall are stopped early


def inputs() -> Iterator[tuple[str, bytes]]:
    examples = sorted((ROOT / "fuzzfarm" / "examples").glob("*.elf"))
    seeds = sorted((ROOT / "corpus" / "seeds").glob("*.elf"))
    regressions = sorted((ROOT / "tests" / "kernel_emu" / "regressions").glob("*.elf"))
    for path in [*examples, *seeds, *regressions]:
        yield path.relative_to(ROOT).as_posix(), path.read_bytes()
    base = (ROOT / "fuzzfarm" / "examples" / "three-segments.elf").read_bytes()
    for rep in REPRODUCERS:
        yield f"reproducer:{rep.bug}", rep.make(base)
    for path in seeds:
        # each seed's own draws: a seed added later adds its mutants and changes no other
        rng = random.Random(f"golden:{path.name}")
        for i in range(MUTANTS_PER_SEED):
            data = bytearray(path.read_bytes())
            # the headers are where the loader's decisions are: most flips land there
            for _ in range(rng.randrange(1, 9)):
                where = rng.randrange(min(len(data), 0x200)) if rng.random() < 0.8 else \
                    rng.randrange(len(data))
                data[where] = rng.randrange(256)
            yield f"mutant:{path.stem}:{i}", bytes(data)


def digest(result_json: dict[str, Any]) -> str:
    body = {k: v for k, v in result_json.items() if k != "version"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def record(name: str, kernel: str, mode: str, result_json: dict[str, Any],
           coverage: bytes | None) -> dict[str, Any]:
    row = {"input": name, "kernel": kernel, "mode": mode, "sha256": digest(result_json),
           "verdict": result_json["verdict"], "signature": result_json["signature"],
           "instructions": result_json["instructions"], "stop": result_json["stop"]}
    if coverage is not None:
        row["coverage"] = hashlib.sha256(coverage).hexdigest()
    return row


def compute() -> list[dict[str, Any]]:
    """Per kernel: as `fuzzfarm boot` runs an input, and as a fuzzing job does (guest
    coverage on, the watchdog stopping stalled runs); the coverage map is part of the record."""
    out = []
    for kernel in KERNELS:
        profile = load_profile(kernel)
        for mode, executor in (("boot", Executor(profile)),
                               ("fuzz", Executor(profile, coverage=True, watchdog=WATCHDOG))):
            for name, data in inputs():
                result = executor.run(data).to_json()
                coverage = executor.coverage_map() if mode == "fuzz" else None
                out.append(record(name, kernel, mode, result, coverage))
    return out


def load() -> list[dict[str, Any]]:
    return [json.loads(line) for line in GOLDEN.read_text().splitlines() if line.strip()]


def main() -> int:
    rows = compute()
    GOLDEN.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    print(f"wrote {len(rows)} results to {GOLDEN.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
