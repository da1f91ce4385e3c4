"""`fuzzfarm bench bugs`: the Kaplan–Meier arithmetic, and a short real trial whose buckets
are told apart by the seed build's canaries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fuzzfarm.bench_bugs import (
    UNATTRIBUTED,
    Trial,
    bench_bugs,
    bucket_bugs,
    km_median,
    rebucket,
    rows,
    survival,
    survival_svg,
)


def test_kaplan_meier_with_censored_trials() -> None:
    # 4 trials: found at 1 s and 3 s, two never (censored at the horizon)
    curve = survival([1.0, None, 3.0, None], horizon=10.0)
    assert curve == [(0.0, 1.0), (1.0, 0.75), (3.0, 0.5)]
    assert km_median(curve) == 3.0
    assert km_median(survival([None, None], 10.0)) is None
    # ties die together
    assert survival([2.0, 2.0, 5.0], 10.0) == [(0.0, 1.0), (2.0, pytest.approx(1 / 3)),
                                               (5.0, 0.0)]


def _trial(index: int, bucketed: dict[str, float | None],
           buckets: dict[str, list[str]]) -> Trial:
    names = ["RX-01", "RX-02"]
    return Trial("seed", index, 10.0, 1000, {n: 0.1 for n in names},
                 {n: bucketed.get(n) for n in names}, bucketed, buckets)


def test_rows_count_buckets_per_bug_and_merges() -> None:
    trials = [
        _trial(0, {"RX-01": 1.0, "RX-02": None},
               {"sig-a": ["RX-01"], "sig-b": ["RX-01"], "sig-c": []}),
        _trial(1, {"RX-01": 4.0, "RX-02": 2.0}, {"sig-a": ["RX-01"], "sig-d": ["RX-02"]}),
    ]
    by_bug = {r.bug: r for r in rows(trials, ["RX-01", "RX-02", UNATTRIBUTED])}
    assert by_bug["RX-01"].bucketed == 2 and by_bug["RX-01"].buckets_per_bug == 1.5
    assert by_bug["RX-01"].merges_needed == 1 and by_bug["RX-01"].median_seconds == 1.0
    # found in one trial of two: half the trials have found it by then
    assert by_bug["RX-02"].bucketed == 1 and by_bug["RX-02"].median_seconds == 2.0
    assert by_bug[UNATTRIBUTED].buckets_per_bug == 1.0
    svg = survival_svg("seed", trials, ["RX-01", "RX-02"])
    assert svg.startswith("<svg") and svg.count("<polyline") == 2


def test_a_bucket_is_the_most_specific_bug_all_its_inputs_trigger() -> None:
    inputs = {
        # RX-08 is triggered on the way in almost every bucket: it is RX-11's bucket
        "overlap": [("RX-08", "RX-11"), ("RX-06", "RX-08", "RX-11")],
        "bad-entry": [("RX-08",), ("RX-06", "RX-08")],
        "table": [("RX-08", "RX-03"), ("RX-03",)],
        # two bugs, each in one bucket: the first to trigger
        "both": [("RX-08", "RX-02", "RX-09"), ("RX-02", "RX-09")],
        "split": [("RX-04",), ("RX-05",), ("RX-05", "RX-04")],
        "none": [(), ()],
    }
    assert bucket_bugs(inputs) == {"overlap": ["RX-11"], "bad-entry": ["RX-08"],
                                   "table": ["RX-03"], "both": ["RX-02"],
                                   "split": ["RX-05", "RX-04"], "none": []}
    # of two bugs all inputs trigger, the one whose class the bucket has
    inputs = {"heap-corruption | allocate < read | free_list": [("RX-14", "RX-11")] * 2,
              "memory-leak | allocate < keep | allocation.leak": [("RX-14", "RX-11")],
              "cpu-fault | memcpy": [("RX-02", "RX-05")]}
    expected = {"RX-11": "heap-corruption", "RX-14": "memory-leak", "RX-02": "cpu-fault",
                "RX-05": "heap-corruption"}
    assert bucket_bugs(inputs, expected) == {
        "heap-corruption | allocate < read | free_list": ["RX-11"],
        "memory-leak | allocate < keep | allocation.leak": ["RX-14"],
        "cpu-fault | memcpy": ["RX-02"]}


@pytest.mark.slow
def test_a_short_trial_tells_buckets_apart_by_their_canaries(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]
                                                             ) -> None:
    assert bench_bugs(["seed"], trials=1, seconds=8.0, jobs=1, out=tmp_path) == 0
    data = json.loads((tmp_path / "bugs.json").read_text())
    trial = data["seed"]["trials"][0]
    # every seed reaches the checks of RX-02..RX-07 at once
    assert trial["reached"]["RX-03"] is not None
    # the buckets found are planted bugs, told by what their reproducer triggers
    attributed = [bugs for bugs in trial["buckets"].values() if bugs]
    assert attributed, trial["buckets"]
    assert all(set(bugs) <= set(trial["bucketed"]) for bugs in attributed)
    for bugs in attributed:
        for bug in bugs:
            assert trial["triggered"][bug] is not None  # a bucket's bug was triggered
    assert (tmp_path / "survival-seed.svg").read_text().startswith("<svg")
    out = capsys.readouterr().out
    assert "median s (KM)" in out and "buckets/bug" in out
    # judged again by the same checkout: the same buckets, what the campaign saw kept
    again = tmp_path / "again"
    assert rebucket(tmp_path, again, say=lambda *a, **k: None) == 0
    judged = json.loads((again / "bugs.json").read_text())["seed"]["trials"][0]
    assert judged["buckets"] == trial["buckets"]
    assert (judged["execs"], judged["reached"], judged["triggered"]) == \
        (trial["execs"], trial["reached"], trial["triggered"])
    assert (again / "survival-seed.svg").is_file()


def test_rebucket_wants_an_earlier_run(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no bench bugs results"):
        rebucket(tmp_path, tmp_path / "out")
    (tmp_path / "bugs.json").write_text('{"seed": []}')
    with pytest.raises(ValueError, match="not the results of fuzzfarm bench bugs"):
        rebucket(tmp_path, tmp_path / "out")
    # a trial whose folder is gone is left out, and said to be
    (tmp_path / "bugs.json").write_text('{"seed": {"trials": [{"index": 0, "seconds": 8}]}}')
    said: list[str] = []
    assert rebucket(tmp_path, tmp_path / "out", say=lambda s, **k: said.append(s)) == 0
    assert any("holds no campaign, left out" in s for s in said)


def test_a_stopped_trial_ends_the_benchmark_and_keeps_the_finished_ones(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fuzzfarm.bench_bugs as bench

    calls: list[int] = []

    def fake_trial(kernel: str, index: int, seconds: float, jobs: int, out: Path) -> Trial:
        calls.append(index)
        trial = _trial(index, {"RX-01": 1.0}, {"sig-a": ["RX-01"]})
        trial.complete = index == 0  # the second is stopped by Ctrl-C
        return trial

    monkeypatch.setattr(bench, "run_trial", fake_trial)
    assert bench_bugs(["seed"], trials=5, seconds=10.0, jobs=1, out=tmp_path,
                      say=lambda *a, **k: None) == 130
    assert calls == [0, 1]
    data = json.loads((tmp_path / "bugs.json").read_text())
    assert [t["index"] for t in data["seed"]["trials"]] == [0]
