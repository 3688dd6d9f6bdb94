"""Prometheus metrics, named like vLLM's (vllm:* -> longserve:*) so existing dashboards map over.

Engine state (running, waiting, KV usage, prefix-cache counters, preemptions) is read from
``engine.stats()`` at scrape time by a custom collector, so it is never stale. Token counts and latencies
are recorded per request as outputs arrive (``RequestTracker``). Each app has its own registry, so several
apps (tests) can live in one process.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..engine.sequence import RequestOutput

# Bucket edges as vLLM's, so dashboards' quantiles compare.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0)


class _EngineCollector:
    """Gauges and counters read from the engine's stats snapshot on every scrape."""

    def __init__(self, engine, model_name: str):
        self.engine = engine
        self.model_name = model_name

    def collect(self):
        s = self.engine.stats()
        labels = ["model_name"]
        value = [self.model_name]

        def gauge(name, doc, v):
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(value, v)
            return g

        def counter(name, doc, v):
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(value, v)
            return c

        yield gauge("longserve:num_requests_running", "Sequences in the running batch.", s.num_running)
        yield gauge("longserve:num_requests_waiting", "Sequences waiting to be scheduled.", s.num_waiting)
        yield gauge("longserve:kv_cache_usage_perc", "Share of KV-cache blocks in use (1 = 100%).", s.kv_cache_usage)
        yield gauge("longserve:num_kv_blocks", "KV-cache blocks in total.", s.num_kv_blocks)
        yield counter("longserve:prefix_cache_queries", "Prompt blocks looked up in the prefix cache.",
                      s.prefix_cache_queries)
        yield counter("longserve:prefix_cache_hits", "Prompt blocks found in the prefix cache.", s.prefix_cache_hits)
        yield counter("longserve:num_preemptions", "Sequences preempted to free KV blocks.", s.num_preemptions)


class ServerMetrics:
    def __init__(self, engine, model_name: str):
        disable_created_metrics()  # no *_created series: they double the output and dashboards ignore them
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine, model_name))
        r = self.registry
        m = ["model_name"]
        self.prompt_tokens = Counter("longserve:prompt_tokens", "Prompt tokens processed.", m, registry=r)
        self.generation_tokens = Counter("longserve:generation_tokens", "Tokens generated.", m, registry=r)
        self.request_success = Counter("longserve:request_success", "Completions finished, by finish reason.",
                                       m + ["finished_reason"], registry=r)
        self.request_aborted = Counter("longserve:request_aborted",
                                       "Requests aborted before finishing (client gone, shutdown, error).", m,
                                       registry=r)
        self.ttft = Histogram("longserve:time_to_first_token_seconds", "Time from arrival to the first token.",
                              m, buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("longserve:inter_token_latency_seconds", "Time between consecutive output tokens.",
                             m, buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("longserve:e2e_request_latency_seconds", "Time from arrival to the last token.",
                             m, buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("longserve:request_queue_time_seconds",
                                    "Time from arrival to first being scheduled.", m, buckets=LATENCY_BUCKETS,
                                    registry=r)
        # Create the labelled series now, so they read 0 (not absent) before the first request.
        for counter in (self.prompt_tokens, self.generation_tokens, self.request_aborted):
            counter.labels(model_name)
        for reason in ("stop", "length"):
            self.request_success.labels(model_name, reason)

    def tracker(self) -> "RequestTracker":
        return RequestTracker(self)


class RequestTracker:
    """Records one engine request's token counts and latencies from its stream of snapshots."""

    def __init__(self, metrics: ServerMetrics):
        self.m = metrics
        self.label = metrics.model_name
        self.tokens_seen: dict[int, int] = {}
        self.last_time: float | None = None
        self.prompt_counted = False
        self.done = False

    def observe(self, out: RequestOutput) -> None:
        m, label = self.m, self.label
        now = time.monotonic()
        new_tokens = 0
        for c in out.outputs:
            new = len(c.token_ids) - self.tokens_seen.get(c.index, 0)
            if new > 0:
                new_tokens += new
                self.tokens_seen[c.index] = len(c.token_ids)
        if new_tokens:
            m.generation_tokens.labels(label).inc(new_tokens)
        if not self.prompt_counted and new_tokens:
            self.prompt_counted = True
            m.prompt_tokens.labels(label).inc(len(out.prompt_token_ids))
            metrics = out.metrics
            if metrics is not None and metrics.first_token_time is not None:
                m.ttft.labels(label).observe(max(0.0, metrics.first_token_time - metrics.arrival_time))
            if metrics is not None and metrics.first_scheduled_time is not None:
                m.queue_time.labels(label).observe(max(0.0, metrics.first_scheduled_time - metrics.arrival_time))
        elif new_tokens and self.last_time is not None:
            # One engine step adds one token per sequence: the gap between snapshots is the per-token latency.
            m.itl.labels(label).observe(now - self.last_time)
        if new_tokens:
            self.last_time = now
        if out.finished and not self.done:
            self.done = True
            for c in out.outputs:
                if c.finish_reason in ("stop", "length"):
                    m.request_success.labels(label, c.finish_reason).inc()
            metrics = out.metrics
            if metrics is not None:
                end = metrics.finished_time if metrics.finished_time is not None else now
                m.e2e.labels(label).observe(max(0.0, end - metrics.arrival_time))

    def close(self) -> None:
        """The request ended; if no finished snapshot came, it was aborted."""
        if not self.done:
            self.done = True
            self.m.request_aborted.labels(self.label).inc()
