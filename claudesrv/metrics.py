"""
Prometheus metrics. Session figures are read from the registry's counters when scraped, so relaying a
line costs nothing extra; HTTP figures are counted per request.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from claudesrv.live import IDLE
from claudesrv.openapi import OPENAPI
from claudesrv.registry import SessionRegistry

OUTCOMES = ("ok", "error", "cancelled", "timeout", "disconnected", "server_shutdown")


class RegistryCollector:
    def __init__(self, registry: SessionRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        r = self.registry
        c = r.counters
        yield CounterMetricFamily("claudesrv_turns_started", "Turns started.", value=c.turns_started)
        ended = CounterMetricFamily("claudesrv_turns_ended", "Turns ended, by outcome.", labels=["outcome"])
        for outcome in sorted(set(OUTCOMES) | set(c.ended)):
            ended.add_metric([outcome], c.ended.get(outcome, 0))
        yield ended
        starts = CounterMetricFamily("claudesrv_turn_starts", "How turns found their CLI process: warm (a live "
                                     "process), spare (a process started ahead), cold (spawned for it).",
                                     labels=["kind"])
        for kind in ("warm", "spare", "cold"):
            starts.add_metric([kind], c.starts.get(kind, 0))
        yield starts
        sleeps = CounterMetricFamily("claudesrv_cli_sleeps", "Live CLI processes put to sleep, by reason.",
                                     labels=["reason"])
        for reason in sorted({"idle", "lru", "spare", "options", "deleted", "shutdown"} | set(c.sleeps)):
            sleeps.add_metric([reason], c.sleeps.get(reason, 0))
        yield sleeps
        exits = CounterMetricFamily("claudesrv_cli_exits", "CLI exits during a turn, by exit code or signal.",
                                    labels=["code"])
        for code, n in sorted(c.exit_codes.items()):
            exits.add_metric([code], n)
        yield exits
        yield CounterMetricFamily("claudesrv_cli_spawns", "CLI processes started.", value=c.spawns)
        live = GaugeMetricFamily("claudesrv_live_processes", "Live CLI processes, by state.", labels=["state"])
        for state, n in sorted(r.live_by_state().items()):
            live.add_metric([state], n)
        yield live
        yield GaugeMetricFamily("claudesrv_spares", "Spare CLI processes (started ahead for new sessions).",
                                value=len(r.spares))
        yield GaugeMetricFamily("claudesrv_spares_ready", "Spares that have finished starting.",
                                value=sum(1 for s in r.spares if s.state == IDLE))
        yield GaugeMetricFamily("claudesrv_turns_running", "Turns running now.", value=r.running)
        yield GaugeMetricFamily("claudesrv_turns_queued", "Turns waiting for a run slot or a process.",
                                value=len(r.queue))
        yield GaugeMetricFamily("claudesrv_event_log_bytes", "Bytes in the event logs of the sessions in use.",
                                value=r.log_bytes())
        decisions = CounterMetricFamily("claudesrv_permission_decisions", "Tool approval requests decided, by "
                                        "behavior and by whom (client, timeout, cancel, remembered, policy).",
                                        labels=["behavior", "by"])
        for (behavior, by), n in sorted(r.approvals.decisions.items()):
            decisions.add_metric([behavior, by], n)
        yield decisions
        yield GaugeMetricFamily("claudesrv_permissions_pending", "Tool approval requests waiting for a person.",
                                value=len(r.approvals.pending))
        cost = CounterMetricFamily("claudesrv_cost_usd", "What turns cost, by model (from the CLI's results).",
                                   labels=["model"])
        tokens = CounterMetricFamily("claudesrv_tokens", "Tokens used by turns, by model and kind.",
                                     labels=["model", "kind"])
        for model, figures in sorted(c.usage.items()):
            cost.add_metric([model], figures.get("cost_usd", 0))
            for kind in ("input", "output", "cache_read", "cache_creation"):
                tokens.add_metric([model, kind], figures.get(f"{kind}_tokens", 0))
        yield cost
        yield tokens
        yield CounterMetricFamily("claudesrv_relayed_bytes", "SSE bytes written to clients.", value=c.bytes_relayed)
        yield CounterMetricFamily("claudesrv_relayed_lines", "CLI lines logged as events.", value=c.lines_logged)


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


def registry_for(sessions: SessionRegistry) -> tuple[CollectorRegistry, HttpMetrics]:
    registry = CollectorRegistry()
    registry.register(RegistryCollector(sessions))
    return registry, HttpMetrics(registry)

