"""The farm's state in the Prometheus text exposition format (version 0.0.4)."""

from __future__ import annotations

from collections import Counter

from workers.store import FarmStore

RUNNING = ("running", "stopping")


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


class _Out:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, doc: str) -> None:
        self.lines += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}"]

    def sample(self, name: str, value: float, **labels: str) -> None:
        text = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
        self.lines.append(f"{name}{{{text}}} {_num(value)}" if text else f"{name} {_num(value)}")


def render(store: FarmStore) -> str:
    out = _Out()
    campaigns = store.campaigns.all()
    latest = {c.id: store.stats.latest_point(c.id) for c in campaigns}
    running = [c for c in campaigns if c.state in RUNNING]

    out.family("fuzzfarm_execs_total", "counter", "Executions of all campaigns.")
    out.sample("fuzzfarm_execs_total", sum(c.execs for c in campaigns))
    out.family("fuzzfarm_execs_per_second", "gauge",
               "Executions per second of the running campaigns (their latest series points).")
    out.sample("fuzzfarm_execs_per_second",
               float(sum(float(latest[c.id].get("execs_per_second", 0.0)) for c in running)))
    out.family("fuzzfarm_campaign_execs_total", "counter", "Executions of one campaign.")
    for c in campaigns:
        out.sample("fuzzfarm_campaign_execs_total", c.execs,
                   campaign=c.id, kernel=c.kernel, state=c.state)
    out.family("fuzzfarm_campaign_execs_per_second", "gauge",
               "Executions per second of one campaign at its latest series point.")
    for c in campaigns:
        out.sample("fuzzfarm_campaign_execs_per_second",
                   float(latest[c.id].get("execs_per_second", 0.0)),
                   campaign=c.id, kernel=c.kernel)
    out.family("fuzzfarm_campaign_edges", "gauge",
               "Guest edges covered by one campaign (the most any of its slices saw).")
    for c in campaigns:
        out.sample("fuzzfarm_campaign_edges", c.edges, campaign=c.id, kernel=c.kernel)

    buckets = store.buckets.all()
    by_class = Counter(b.crash_class for b in buckets)
    out.family("fuzzfarm_buckets", "gauge", "Crash buckets by class.")
    for cls, n in sorted(by_class.items()):
        out.sample("fuzzfarm_buckets", n, **{"class": cls})
    out.family("fuzzfarm_crashing_inputs", "gauge", "Crashing inputs counted in buckets.")
    out.sample("fuzzfarm_crashing_inputs", sum(b.count for b in buckets))

    out.family("fuzzfarm_corpus_size", "gauge", "Inputs in the shared corpus of a kernel build.")
    for k in store.kernels.names():
        out.sample("fuzzfarm_corpus_size", store.corpus.size(k), kernel=k)
    out.family("fuzzfarm_workers_alive", "gauge", "Workers with a heartbeat in the last 2 min.")
    out.sample("fuzzfarm_workers_alive", len(store.stats.workers()))
    out.family("fuzzfarm_triage_backlog", "gauge", "Crashing inputs waiting for triage.")
    out.sample("fuzzfarm_triage_backlog", store.triage.backlog())
    out.family("fuzzfarm_harness_errors_total", "counter",
               "Failures of the farm itself (never findings).")
    out.sample("fuzzfarm_harness_errors_total",
               store.stats.counters().get("harness_errors", 0))
    return "\n".join(out.lines) + "\n"
