"""
Prometheus metrics. Run figures are read from the run manager's counters when scraped, so relaying a
line costs nothing extra; HTTP figures are counted per request.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from claudesrv.openapi import OPENAPI
from claudesrv.runs import RunManager

OUTCOMES = ("ok", "error", "cancelled", "timeout", "disconnected", "server_shutdown")


class RunCollector:
    def __init__(self, runs: RunManager) -> None:
        self.runs = runs

    def collect(self) -> Iterator[Metric]:
        c = self.runs.counters
        yield CounterMetricFamily("claudesrv_runs_started", "CLI runs started.", value=c.started)
        ended = CounterMetricFamily("claudesrv_runs_ended", "CLI runs ended, by outcome.", labels=["outcome"])
        for outcome in sorted(set(OUTCOMES) | set(c.ended)):
            ended.add_metric([outcome], c.ended.get(outcome, 0))
        yield ended
        exits = CounterMetricFamily("claudesrv_cli_exits", "CLI exits, by exit code or signal.", labels=["code"])
        for code, n in sorted(c.exit_codes.items()):
            exits.add_metric([code], n)
        yield exits
        yield GaugeMetricFamily("claudesrv_runs_running", "CLI processes running now.", value=len(self.runs.running))
        yield GaugeMetricFamily("claudesrv_runs_queued", "Requests waiting for a run slot.", value=len(self.runs.queue))
        yield CounterMetricFamily("claudesrv_relayed_bytes", "SSE bytes written to clients.", value=c.bytes_relayed)
        yield CounterMetricFamily("claudesrv_relayed_lines", "CLI lines relayed to clients.", value=c.lines_relayed)


class HttpMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("claudesrv_http_requests", "HTTP requests, by route and status.",
                                ["route", "status"], registry=registry)
        self.duration = Histogram("claudesrv_http_request_duration_seconds",
                                  "Time from request to the end of the response (streams included).",
                                  ["route"], registry=registry,
                                  buckets=(0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 15, 60, 300, 1800, 3600))

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.duration.labels(route).observe(seconds)


_ROUTES = [(re.compile("^" + re.sub(r"\\{\w+\\}", "[^/]+", re.escape(p)) + "$"), p) for p in OPENAPI["paths"]]


def route_of(path: bytes) -> str:
    """The documented route pattern of a path (``/api/sessions/{session_id}``), so labels stay few."""
    text = path.decode("latin-1")
    return next((route for pattern, route in _ROUTES if pattern.match(text)), "other")


def registry_for(runs: RunManager) -> tuple[CollectorRegistry, HttpMetrics]:
    registry = CollectorRegistry()
    registry.register(RunCollector(runs))
    return registry, HttpMetrics(registry)

