"""The farm's state for Prometheus: a collector that reads the store on every scrape (nothing
is kept between scrapes, so any number of dashboards report the same values)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from workers.store import FarmStore

RUNNING = ("running", "stopping")


class FarmCollector(Collector):
    def __init__(self, store: FarmStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        store = self.store
        campaigns = store.campaigns.all()
        latest = {c.id: store.stats.latest_point(c.id) for c in campaigns}

        def rate(cid: str) -> float:
            return float(latest[cid].get("execs_per_second", 0.0))

        total = CounterMetricFamily("fuzzfarm_execs", "Executions of all campaigns.")
        total.add_metric([], sum(c.execs for c in campaigns))
        yield total
        yield GaugeMetricFamily(
            "fuzzfarm_execs_per_second",
            "Executions per second of the running campaigns (their latest series points).",
            value=sum(rate(c.id) for c in campaigns if c.state in RUNNING))
        execs = CounterMetricFamily("fuzzfarm_campaign_execs", "Executions of one campaign.",
                                    labels=["campaign", "kernel", "state"])
        per_second = GaugeMetricFamily(
            "fuzzfarm_campaign_execs_per_second",
            "Executions per second of one campaign at its latest series point.",
            labels=["campaign", "kernel"])
        edges = GaugeMetricFamily(
            "fuzzfarm_campaign_edges",
            "Guest edges covered by one campaign (the most any of its slices saw).",
            labels=["campaign", "kernel"])
        for c in campaigns:
            execs.add_metric([c.id, c.kernel, c.state], c.execs)
            per_second.add_metric([c.id, c.kernel], rate(c.id))
            edges.add_metric([c.id, c.kernel], c.edges)
        yield from (execs, per_second, edges)

        buckets = store.buckets.all()
        by_class = GaugeMetricFamily("fuzzfarm_buckets", "Crash buckets by class.",
                                     labels=["class"])
        for cls, n in sorted(Counter(b.crash_class for b in buckets).items()):
            by_class.add_metric([cls], n)
        yield by_class
        yield GaugeMetricFamily("fuzzfarm_crashing_inputs", "Crashing inputs counted in buckets.",
                                value=sum(b.count for b in buckets))

        corpus = GaugeMetricFamily("fuzzfarm_corpus_size",
                                   "Inputs in the shared corpus of a kernel build.",
                                   labels=["kernel"])
        for k in store.kernels.names():
            corpus.add_metric([k], store.corpus.size(k))
        yield corpus
        yield GaugeMetricFamily("fuzzfarm_workers_alive",
                                "Workers with a heartbeat in the last 2 min.",
                                value=len(store.stats.workers()))
        yield GaugeMetricFamily("fuzzfarm_triage_backlog", "Crashing inputs waiting for triage.",
                                value=store.triage.backlog())
        errors = CounterMetricFamily("fuzzfarm_harness_errors",
                                     "Failures of the farm itself (never findings).")
        errors.add_metric([], store.stats.counters().get("harness_errors", 0))
        yield errors


def render(store: FarmStore) -> tuple[bytes, str]:
    """One scrape: the exposition text and its content type (text format 0.0.4, which every
    Prometheus reads)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FarmCollector(store))
    return generate_latest(registry), CONTENT_TYPE_PLAIN_0_0_4
