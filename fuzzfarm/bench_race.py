"""`fuzzfarm bench compare` without `--other`: a race of fuzzers on one kernel build.

Competitors, each given the same wall time per trial, the same seeds (`corpus/seeds/`) and
the same kernel build (one core each):

* `farm`: the farm's own fuzzing job (`fuzzfarm fuzz`, one job: libFuzzer with guest coverage
  and compares, the ELF-aware mutator, every oracle);
* `afl`: AFL++ (Debian's `afl-fuzz`, Unicorn mode) on the farm's snapshot. The target side is
  the race's own harness (`fuzzfarm/race/afl_harness.py`), not unicornafl: it speaks AFL++'s
  fork server protocol and writes AFL's edge coverage into AFL++'s map from a Unicorn block
  hook in Python, without unicornafl's compare splitting. No PyPI release of unicornafl can run
  the snapshot (the harness's docstring and docs/performance.md say why);
* `unicorn`: a plain Unicorn fuzzer in Python, block hooks for coverage and a random
  byte-level mutator (`fuzzfarm/race/naive.py`), on the same snapshot;
* `qiling`: qiling booting the UEFI image (`fuzzfarm/race/qiling_boot.py`); fuzzing needs the
  kernel to reach its input, so when the boot stops before, the row says where and why.

The three others run in virtualenvs of their own, made here once (and reused) under
`~/.cache/fuzzfarm/race/<name>-<hash of its pins>`, so their Unicorn never meets the farm's;
they import nothing of the farm. What they need is exported (`fuzzfarm/race_export.py`): the
snapshot's memory and CPU state, how an input is written, where a run stops, the budget.

What counts as a crash: for the farm, any finding of its oracles (heap and vaddr corruption,
kernel mappings, bad entries, CPU faults, panics, hangs, ...); for `afl` and `unicorn`, what a
tool sees of a run on the snapshot (`fuzzfarm/race/resume.py`): the kernel's panic handler
reached, a CPU exception (Unicorn stops with an error, or a handler the IDT names is reached),
or the profile's budget of instructions spent (a hang); AFL++ adds its own timeouts (its
`hangs/`). An input a kernel loads and enters ring 3 with, or cleanly rejects, is no crash for
them, whatever it did to the heap on the way.

Time to bug X, identical for every competitor: the earliest time (from the competitor's start)
at which the tool itself reported an input as a crash or finding that, booted again on the
farm's executor with the build's canaries (the profile's `[canaries]`), triggers X. The time an
input was reported: AFL++'s `time:<ms>` in the file name, the naive fuzzer's milliseconds in
its file name, the farm's modification time of the file it saved under `solutions/`. Execs per
second per core: the tool's own count of executions over the wall time of its run and the
cores it used (AFL++: `execs_done` of `fuzzer_stats`).

Results: `OUT/race.json` (rewritten after every competitor, so a stopped race keeps what
finished), the competitors' saved inputs under `OUT/<trial>/<competitor>/`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fuzzfarm.bench_bugs import km_median, survival
from kernel_emu.canaries import canaries_for
from kernel_emu.errors import HarnessError, InputError
from kernel_emu.executor import Executor
from kernel_emu.profile import load_profile

ROOT = Path(__file__).resolve().parents[1]
SEEDS = ROOT / "corpus" / "seeds"
RACE = Path(__file__).resolve().parent / "race"
COMPETITORS = ("farm", "afl", "unicorn", "qiling")
# each competitor's virtualenv: exactly these packages
PINS = {
    "afl": ("unicorn==2.1.4",),
    "unicorn": ("unicorn==2.1.4",),
    "qiling": ("qiling==1.4.6",),
}
STOP_SLACK = 3.0
REBOOT_LIMIT = 400  # saved inputs of one competitor booted again per trial, earliest first

Say = Callable[..., None]


class Interrupted(Exception):
    """Ctrl-C during the race."""


@dataclass
class Finding:
    seconds: float
    path: str
    triggered: list[str] = field(default_factory=list)


@dataclass
class Run:
    competitor: str
    trial: int
    ran: bool
    reason: str | None = None
    execs: int = 0
    seconds: float = 0.0
    cores: int = 1
    findings: list[Finding] = field(default_factory=list)
    # bug -> seconds to the first finding that triggers it (None: never)
    time_to_bug: dict[str, float | None] = field(default_factory=dict)
    complete: bool = True

    @property
    def rate(self) -> float:
        return self.execs / self.seconds / self.cores if self.seconds > 0 else 0.0


# ------------------------------------------------------------------------------------------
# virtualenvs

def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fuzzfarm" / "race"


def venv_for(name: str, say: Say) -> Path:
    """The competitor's virtualenv (made with its pins the first time); its python."""
    pins = PINS[name]
    tag = hashlib.sha256(json.dumps([sys.version_info[:2], *pins]).encode()).hexdigest()[:12]
    where = cache_root() / f"{name}-{tag}"
    python = where / "bin" / "python"
    if (where / ".ready").is_file() and python.exists():
        return python
    say(f"  setting up the {name} virtualenv in {where} ({', '.join(pins)}) ...", flush=True)
    shutil.rmtree(where, ignore_errors=True)
    where.parent.mkdir(parents=True, exist_ok=True)
    base = getattr(sys, "_base_executable", sys.executable)
    for cmd in ([base, "-m", "venv", str(where)],
                [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                 *pins]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise HarnessError(f"cannot set up the {name} virtualenv: {last}")
    (where / ".ready").write_text("\n".join(pins) + "\n")
    return python


# ------------------------------------------------------------------------------------------
# competitors

def _wait(proc: subprocess.Popen[bytes], seconds: float, what: str, say: Say,
          stats: Callable[[], str] | None = None) -> bool:
    """Wait up to `seconds` (plus a grace) for `proc`, with a progress line every 10 s;
    False when Ctrl-C stopped it."""
    start = time.monotonic()
    next_line = start + 10
    try:
        while proc.poll() is None:
            time.sleep(0.25)
            now = time.monotonic()
            if now > start + seconds + 30:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                break
            if now >= next_line:
                extra = stats() if stats else ""
                say(f"    {what}: {now - start:.0f}/{seconds:.0f} s {extra}".rstrip(),
                    flush=True)
                next_line = now + 10
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        return False
    return True


def run_farm(kernel: str, seconds: float, trial: int, out: Path, say: Say) -> Run:
    from fuzz.campaign import run_campaign
    from fuzz.harness import JobConfig

    config = JobConfig(kernel=kernel, out=str(out), seeds=[str(SEEDS)], seconds=seconds,
                       seed=7919 * (trial + 1), canaries=True)
    start = time.time()
    summary = run_campaign(config, 1, live=False, stream=io.StringIO())
    findings = []
    root = out / "solutions"
    for path in sorted(root.glob("*/*.elf")) if root.is_dir() else []:
        findings.append(Finding(max(0.0, path.stat().st_mtime - start), str(path)))
    return Run("farm", trial, True, execs=summary.execs, seconds=summary.seconds,
               findings=findings, complete=summary.seconds >= seconds - STOP_SLACK)


def run_naive(export: Path, seconds: float, trial: int, out: Path, say: Say) -> Run:
    python = venv_for("unicorn", say)
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "naive.log").open("wb")
    proc = subprocess.Popen([str(python), str(RACE / "naive.py"), str(export), str(SEEDS),
                             str(out), str(seconds), str(trial + 1)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=RACE,
                            start_new_session=True)

    def stats() -> str:
        s = _json(out / "stats.json")
        return f"execs {s.get('execs', 0):,}, crashes saved {s.get('crashes', 0)}" if s else ""

    finished = _wait(proc, seconds, "unicorn", say, stats)
    log.close()
    s = _json(out / "stats.json")
    if not s:
        return Run("unicorn", trial, False, reason=_last_line(out / "naive.log")
                   or f"exit status {proc.returncode}", complete=finished)
    findings = []
    for path in sorted((out / "crashes").glob("*.bin")):
        ms = re.match(r"(\d+)-", path.name)
        if ms:
            findings.append(Finding(int(ms.group(1)) / 1000, str(path)))
    return Run("unicorn", trial, True, execs=int(s["execs"]), seconds=float(s["seconds"]),
               findings=findings, complete=finished)


def _afl_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(AFL_SKIP_CPUFREQ="1", AFL_NO_AFFINITY="1", AFL_NO_UI="1",
               AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES="1", AFL_FORKSRV_INIT_TMOUT="120000",
               AFL_SKIP_BIN_CHECK="1", AFL_SKIP_CRASHES="0")
    return env


def run_afl(export: Path, seconds: float, trial: int, out: Path, say: Say,
            max_input: int) -> Run:
    fuzz = shutil.which("afl-fuzz")
    if fuzz is None:
        return Run("afl", trial, False, reason="afl-fuzz is not installed (Debian: apt-get "
                   "install afl++)")
    python = venv_for("afl", say)
    out.mkdir(parents=True, exist_ok=True)
    seeds = out / "seeds"
    seeds.mkdir(exist_ok=True)
    for p in sorted(SEEDS.glob("*.elf")):
        if p.stat().st_size <= max_input:
            shutil.copy(p, seeds / p.name)
    harness = [str(python), str(RACE / "afl_harness.py"), str(export)]
    # first one seed through afl-showmap: a harness that dies under AFL++ says so here
    showmap = shutil.which("afl-showmap")
    first = next(iter(sorted(seeds.iterdir())))
    if showmap:
        proc = subprocess.run([showmap, "-U", "-t", "60000", "-o", str(out / "map.txt"),
                               "--", *harness, str(first)], env=_afl_env(), cwd=RACE,
                              capture_output=True, text=True, timeout=600)
        killed = re.search(r"killed by signal (\d+)", proc.stdout + proc.stderr)
        if proc.returncode != 0 and killed:
            name = signal.Signals(int(killed.group(1))).name
            return Run("afl", trial, False, reason=(
                f"the AFL++ harness dies with {name} under afl-showmap on a valid seed "
                f"({first.name}), before any input runs"))
        if proc.returncode == 0 and not _read(out / "map.txt").strip():
            return Run("afl", trial, False, reason=(
                f"the AFL++ harness reports no coverage under afl-showmap on {first.name}"))
    log = (out / "afl.log").open("wb")
    proc_ = subprocess.Popen([fuzz, "-U", "-i", str(seeds), "-o", str(out / "afl"),
                              "-t", "10000+", "-V", str(int(seconds)), "-s", str(trial + 1),
                              "--", *harness, "@@"], stdout=log, stderr=subprocess.STDOUT,
                             env=_afl_env(), cwd=RACE, start_new_session=True)
    stats_file = out / "afl" / "default" / "fuzzer_stats"

    def stats() -> str:
        s = _afl_stats(stats_file)
        return f"execs {int(s.get('execs_done', 0)):,}, crashes {s.get('saved_crashes', 0)}" \
            if s else ""

    finished = _wait(proc_, seconds, "afl", say, stats)
    log.close()
    s = _afl_stats(stats_file)
    if not s:
        text = (out / "afl.log").read_text(errors="replace")
        abort = re.findall(r"PROGRAM ABORT : (?:\x1b\[[0-9;]*m)*([^\x1b\n]+)", text)
        return Run("afl", trial, False, reason=f"afl-fuzz stopped: {abort[-1].strip()}"
                   if abort else f"afl-fuzz exit status {proc_.returncode}", complete=finished)
    findings = []
    for kind in ("crashes", "hangs"):
        for path in sorted((out / "afl" / "default" / kind).glob("id:*")):
            ms = re.search(r"time:(\d+)", path.name)
            if ms:
                findings.append(Finding(int(ms.group(1)) / 1000, str(path)))
    return Run("afl", trial, True, execs=int(s.get("execs_done", 0)),
               seconds=float(s.get("run_time", seconds)), findings=findings,
               complete=finished)


def run_qiling(kernel: str, seconds: float, trial: int, out: Path, say: Say) -> Run:
    python = venv_for("qiling", say)
    profile = load_profile(kernel)
    out.mkdir(parents=True, exist_ok=True)
    rootfs = out / "rootfs"
    rootfs.mkdir(exist_ok=True)
    try:
        proc = subprocess.run([str(python), str(RACE / "qiling_boot.py"), str(profile.image),
                               str(rootfs), str(min(seconds, 60.0))], capture_output=True,
                              text=True, timeout=max(120.0, seconds + 60), cwd=RACE)
    except subprocess.TimeoutExpired:
        return Run("qiling", trial, False, reason="qiling did not return from efi_main")
    (out / "qiling.log").write_text(proc.stdout + proc.stderr)
    try:
        report = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return Run("qiling", trial, False, reason="qiling failed: " + (
            _tail(proc.stderr) or f"exit status {proc.returncode}"))
    executor_image = Executor(profile, snapshot=False).image
    where = f"{report['pc']:#x}"
    if report.get("image_base") is not None:
        # the same place in the farm's load of the image, to name it by its symbol
        at = report["pc"] - report["image_base"] + executor_image.load_base
        where += f" ({executor_image.describe(at)})"
    lines = [line for text in report.get("ports", {}).values() for line in text.splitlines()]
    said = f"; the kernel's last log line: {lines[-1]!r}" if lines else ""
    error = f"; qiling raised {report['error']}" if report.get("error") else ""
    snapshot = profile.kernel.snapshot_symbol
    return Run("qiling", trial, False, reason=(
        f"qiling boots efi_main but the kernel stops at {where} before {snapshot} (its "
        f"input is never read){said}{error}"))


# ------------------------------------------------------------------------------------------
# attribution

class Judge:
    """Boots saved inputs on the farm's executor and reads which planted bugs they trigger."""

    def __init__(self, kernel: str) -> None:
        profile = load_profile(kernel)
        self.names = list(profile.canaries.names)
        self.executor = Executor(profile)
        self.canaries = canaries_for(profile, self.executor.image)

    def triggered(self, data: bytes) -> list[str]:
        if self.canaries is None:
            return []
        try:
            self.executor.run(data)
        except (HarnessError, InputError):
            return []
        return list(self.canaries.state(self.canaries.raw(self.executor.machine)).triggered)

    def attribute(self, run: Run) -> None:
        run.time_to_bug = {name: None for name in self.names}
        for finding in sorted(run.findings, key=lambda f: f.seconds)[:REBOOT_LIMIT]:
            try:
                data = Path(finding.path).read_bytes()
            except OSError:
                continue
            finding.triggered = self.triggered(data)
            for bug in finding.triggered:
                if run.time_to_bug.get(bug) is None:
                    run.time_to_bug[bug] = finding.seconds


# ------------------------------------------------------------------------------------------
# the race

def bench_race(kernel: str, competitors: list[str], seconds: float, trials: int, out: Path,
               say: Say = print) -> int:
    from fuzzfarm.race_export import export_snapshot

    out = out.resolve()  # the competitors run in their own directory
    out.mkdir(parents=True, exist_ok=True)
    profile = load_profile(kernel)
    names = list(profile.canaries.names)
    say(f"bench compare (race): {', '.join(competitors)} on {kernel}; {trials} trial(s) of "
        f"{seconds:.0f} s each, one core each; seeds {SEEDS.relative_to(ROOT)}; results in "
        f"{out}", flush=True)
    runs: list[Run] = []
    export = out / "snapshot"
    meta = {"kernel": kernel, "seconds": seconds, "trials": trials, "competitors": competitors,
            "bugs": names}
    judge: Judge | None = None
    try:
        if any(c in ("afl", "unicorn") for c in competitors):
            say("  exporting the snapshot for the competitors ...", flush=True)
            spec = export_snapshot(Executor(profile), export)
        else:
            spec = {"input": {"max_size": 0}}
        judge = Judge(kernel)
        for trial in range(trials):
            for name in competitors:
                where = out / f"trial-{trial}" / name
                shutil.rmtree(where, ignore_errors=True)
                say(f"  trial {trial + 1}/{trials}: {name} ...", flush=True)
                started = time.monotonic()
                run = _one(name, kernel, export, seconds, trial, where, say,
                           int(spec["input"]["max_size"]))
                if run.ran:
                    judge.attribute(run)
                runs.append(run)
                _write(out, meta, runs)
                found = sorted(b for b, t in run.time_to_bug.items() if t is not None)
                say(f"  trial {trial + 1}/{trials}: {name}: " + (
                    f"{run.execs:,} execs, {run.rate:,.1f}/s/core, {len(run.findings)} saved "
                    f"finding(s), bugs: {', '.join(found) or 'none'}" if run.ran
                    else f"could not run: {run.reason}")
                    + f" ({time.monotonic() - started:.0f} s)", flush=True)
                if not run.complete:
                    raise Interrupted
    except (Interrupted, KeyboardInterrupt):
        _write(out, meta, runs)
        say(f"stopped; what finished is in {out / 'race.json'}", flush=True)
        return 130
    say("\n" + table(runs, competitors, names, seconds), flush=True)
    say(f"results: {out / 'race.json'}", flush=True)
    return 0


def _one(name: str, kernel: str, export: Path, seconds: float, trial: int, where: Path,
         say: Say, max_input: int) -> Run:
    try:
        if name == "farm":
            return run_farm(kernel, seconds, trial, where, say)
        if name == "unicorn":
            return run_naive(export, seconds, trial, where, say)
        if name == "afl":
            return run_afl(export, seconds, trial, where, say, max_input)
        return run_qiling(kernel, seconds, trial, where, say)
    except HarnessError as e:
        return Run(name, trial, False, reason=str(e))
    except (OSError, subprocess.SubprocessError) as e:
        return Run(name, trial, False, reason=f"{type(e).__name__}: {e}")


DEFINITIONS = (
    "execs/s/core: the tool's own count of executions / wall seconds of its run / cores "
    "(1 each).",
    "time to bug X (s): the earliest time the tool itself reported an input as a crash or "
    "finding whose re-boot on the farm's executor triggers X's canary; median over trials "
    "(Kaplan-Meier, trials without it censored), '-' never.",
    "crash: farm = any finding of its oracles; afl, unicorn = panic handler reached, CPU "
    "exception, or the profile's instruction budget spent (AFL++ also: its own timeouts).",
)


def table(runs: list[Run], competitors: list[str], names: list[str], seconds: float) -> str:
    head = ["competitor", "execs/s/core", *names, "found"]
    rows = []
    notes = []
    for name in competitors:
        mine = [r for r in runs if r.competitor == name]
        ran = [r for r in mine if r.ran]
        if not ran:
            reason = next((r.reason for r in mine if r.reason), "not run")
            rows.append([name, "-", *["n/a"] * len(names), "could not run"])
            notes.append(f"{name}: could not run: {reason}")
            continue
        rate = statistics.median(r.rate for r in ran)
        cells = []
        for bug in names:
            curve = survival([r.time_to_bug.get(bug) for r in ran], seconds)
            median = km_median(curve)
            cells.append(f"{median:.1f}" if median is not None else "-")
        found = sum(1 for c in cells if c != "-")
        rows.append([name, f"{rate:,.1f}", *cells, f"{found}/{len(names)}"])
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in
                       enumerate(zip(head, widths, strict=True)))]
    for r in rows:
        lines.append("  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    return "\n".join([*lines, "", *notes, *DEFINITIONS])


def _write(out: Path, meta: dict[str, Any], runs: list[Run]) -> None:
    data = {**meta, "runs": [{**asdict(r), "execs_per_second_per_core": r.rate}
                             for r in runs]}
    tmp = out / "race.json.tmp"
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(out / "race.json")


def _json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _afl_stats(path: Path) -> dict[str, str]:
    try:
        text = path.read_text()
    except OSError:
        return {}
    return {k.strip(): v.strip() for k, _, v in
            (line.partition(":") for line in text.splitlines()) if k.strip()}


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _last_line(path: Path) -> str:
    try:
        return _tail(path.read_text(errors="replace"))
    except OSError:
        return ""


def _tail(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""
