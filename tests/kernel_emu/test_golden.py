"""Every golden input gives, byte for byte, the Result recorded in golden-results.jsonl."""

from __future__ import annotations

from collections import Counter

from tests.kernel_emu import golden


def test_results_are_the_recorded_ones() -> None:
    want = golden.load()
    got = golden.compute()
    keys = [(r["input"], r["kernel"], r["mode"]) for r in want]
    assert [(r["input"], r["kernel"], r["mode"]) for r in got] == keys
    changed = [(w["input"], w["kernel"], w["mode"], w["signature"], g["signature"])
               for w, g in zip(want, got, strict=True) if w != g]
    assert not changed, f"{len(changed)} Results changed, e.g. {changed[:5]}"


def test_the_golden_inputs_reach_every_verdict_and_many_classes() -> None:
    rows = golden.load()
    verdicts = Counter(r["verdict"] for r in rows)
    assert set(verdicts) == {"ok", "rejected", "crash"}
    classes = {r["signature"].split(" | ")[0] for r in rows if r["signature"]}
    assert len(classes) >= 6, classes
