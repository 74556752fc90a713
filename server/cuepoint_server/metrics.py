"""Prometheus metrics: counters and histograms fed by the core's hooks, served over plain HTTP.

Each server has its own CollectorRegistry, so several servers in one process (tests) never
share or collide on metrics. The exposition endpoint is a few lines of asyncio on the
server's own event loop rather than prometheus_client's threaded server: collection then
reads the core's live state on the loop that mutates it, and the endpoint stops with the server.

Metrics (README, "Reporting and observability"):

- cuepoint_signals_received_total, cuepoint_signals_duplicate_total (counters)
- cuepoint_evaluations_total (counter): scenario and milestone evaluations by the engine
- cuepoint_cues_total{scenario, outcome} (counter): offered, accepted, declined, dismissed,
  expired, withdrawn
- cuepoint_decisions_blocked_total{scenario, reason} (counter)
- cuepoint_streams{kind="device"|"associate"} (gauge): open sessions
- cuepoint_pending_cues (gauge), cuepoint_engagements_waiting{queue} (gauge)
- cuepoint_engagement_queue_wait_seconds{queue} (histogram): queued -> assigned to an associate
- cuepoint_cue_latency_seconds (histogram): signal batch (or timer) -> cue handed to the device stream
- cuepoint_rate_limit_per_second{bucket} (gauge), cuepoint_rate_limited_total{bucket} (counter),
  cuepoint_rate_limit_keys{bucket} (gauge): the abuse budgets (api/limits.py) and their refusals
- cuepoint_storage_transactions_total, cuepoint_storage_rows_total, cuepoint_storage_failed_writes_total
  (counters): the store's committed write transactions and rows, and failed writes; bench_ingest.py divides
  signals by transactions
- cuepoint_storage_round_trips_total (counter, PostgreSQL only): requests the store sent the database and
  waited for (statements, BEGIN and COMMIT); bench_replicas.py divides it by decisions and signal batches
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from .api.limits import BUCKETS, RateLimiter
from .core.observers import CoreObserver
from .core.service import Core
from .engine.state import EVENT_MEMORY
from .storage import DecisionRecord

__all__ = ["Metrics"]

log = structlog.get_logger("cuepoint.metrics")

_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_WAIT_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
_MAX_REQUEST_HEAD = 64 * 1024


class _LiveState(Collector):
    """Read at scrape time from the core: counts that are state, not events."""

    def __init__(self, core: Core) -> None:
        self._core = core

    def collect(self) -> Iterable[Metric]:
        core = self._core
        stats = core.stats()
        yield CounterMetricFamily(
            "cuepoint_evaluations", "Scenario and milestone evaluations by the engine.", value=stats["evaluations"]
        )
        streams = GaugeMetricFamily("cuepoint_streams", "Open device and associate streams.", labels=["kind"])
        streams.add_metric(["device"], stats["sessions"])
        streams.add_metric(["associate"], stats["associates"])
        yield streams
        memory = EVENT_MEMORY
        yield GaugeMetricFamily(
            "cuepoint_remembered_event_bytes",
            "Estimated bytes of event occurrences held for windows.",
            value=memory.bytes,
        )
        yield GaugeMetricFamily(
            "cuepoint_remembered_events", "Event occurrences held in memory for windows.", value=memory.count
        )
        yield CounterMetricFamily(
            "cuepoint_remembered_events_dropped",
            "Event occurrences dropped (oldest first) by the per-device or server-wide memory limits.",
            value=memory.dropped,
        )
        yield GaugeMetricFamily(
            "cuepoint_device_states", "Devices whose state is held in memory.", value=stats["devices"]
        )
        pending = stats["pending_cues"]
        yield GaugeMetricFamily("cuepoint_pending_cues", "Cues on screen, not yet answered.", value=pending)
        waiting = GaugeMetricFamily(
            "cuepoint_engagements_waiting", "Engagements queued for an associate.", labels=["queue"]
        )
        for load in core.queue_loads():
            waiting.add_metric([load.queue], load.waiting)
        yield waiting
        # The store's writer (both backends): how many stored rows one write transaction carries is what the
        # group commit buys; a small ratio under load means each commit's fixed cost is paid per few signals.
        written = core.store.stats
        for name, text, value in (
            ("cuepoint_storage_transactions", "Write transactions the store's writer committed.", written.batches),
            ("cuepoint_storage_rows", "Rows those transactions committed: signals plus other rows.", written.rows),
            ("cuepoint_storage_failed_writes", "Writes that failed and raised to their caller.", written.failed_ops),
        ):
            yield CounterMetricFamily(name, text, value=value)
        trips = getattr(core.store, "round_trips", None)
        if isinstance(trips, int):
            # Only a networked store counts them: what one decision or one signal batch costs in waits.
            yield CounterMetricFamily(
                "cuepoint_storage_round_trips",
                "Requests the store sent the database and waited for (statements, BEGIN and COMMIT).",
                value=trips,
            )


class _Budgets(Collector):
    """The abuse budgets (api/limits.py): configured rates, and refusals by bucket kind."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        limiter = self._metrics.limiter
        rates = GaugeMetricFamily(
            "cuepoint_rate_limit_per_second",
            "Sustained rate of each budget (signals, or new streams for *_streams), per key; 0: off.",
            labels=["bucket"],
        )
        refused = CounterMetricFamily(
            "cuepoint_rate_limited", "Messages refused with RESOURCE_EXHAUSTED, by budget.", labels=["bucket"]
        )
        tracked = GaugeMetricFamily(
            "cuepoint_rate_limit_keys", "Keys (devices, apps, peers) with a bucket.", labels=["bucket"]
        )
        if limiter is not None:
            limits = limiter.limits
            for bucket in BUCKETS:
                rates.add_metric([bucket], float(getattr(limits, f"{bucket}_rate")))
                refused.add_metric([bucket], float(limiter.refused[bucket]))
            for bucket, count in limiter.tracked().items():
                tracked.add_metric([bucket], float(count))
        yield rates
        yield refused
        yield tracked


class Metrics(CoreObserver):
    """The metrics of one server: attach to a core, then optionally serve() them over HTTP."""

    def __init__(self, core: Core) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.signals = Counter("cuepoint_signals_received", "Signals received and stored (new).", registry=r)
        self.duplicates = Counter(
            "cuepoint_signals_duplicate", "Signals received again (resent), acked but not counted.", registry=r
        )
        self.cues = Counter(
            "cuepoint_cues", "Cues by outcome: offered, then how each ended.", ["scenario", "outcome"], registry=r
        )
        self.blocked = Counter(
            "cuepoint_decisions_blocked",
            "Qualifying scenarios not offered, by reason.",
            ["scenario", "reason"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "cuepoint_engagement_queue_wait_seconds",
            "Time from an engagement being queued to an associate getting it.",
            ["queue"],
            buckets=_WAIT_BUCKETS,
            registry=r,
        )
        self.cue_latency = Histogram(
            "cuepoint_cue_latency_seconds",
            "Time from the signal batch (or timer) that qualified a scenario to its cue being sent.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        r.register(_LiveState(core))
        # Set by the server when rate limits are on.
        self.limiter: RateLimiter | None = None
        r.register(_Budgets(self))
        self._core = core
        self._cue_children: dict[tuple[str, str], Any] = {}
        core.observers.append(self)
        core.decision_listeners.append(self._on_decision)
        core.desk.listeners.append(self._on_engagement)
        self._server: asyncio.Server | None = None
        self.port: int | None = None

    # -- core hooks ------------------------------------------------------------------

    def signals_received(self, fresh: int, duplicates: int) -> None:
        self.signals.inc(fresh)
        if duplicates:
            self.duplicates.inc(duplicates)

    def cue_offered(self, scenario_id: str, latency: float) -> None:
        self._cue_counter(scenario_id, "offered").inc()
        self.cue_latency.observe(max(0.0, latency))

    def cue_settled(self, scenario_id: str, status: str) -> None:
        self._cue_counter(scenario_id, status).inc()

    def _cue_counter(self, scenario_id: str, status: str) -> Any:
        """The cues counter's child for these labels: `labels()` checks and joins them on every call, twice per
        cue round; the registry keeps every child it made anyway, so remembering them here holds no more."""
        key = (scenario_id, status)
        child = self._cue_children.get(key)
        if child is None:
            child = self._cue_children[key] = self.cues.labels(scenario_id, status)
        return child

    def _on_engagement(self, kind: str, payload: dict[str, Any]) -> None:
        if kind != "engagement.assigned":
            return
        engagement = self._core.desk.get(str(payload.get("engagement_id", "")))
        if engagement is not None and engagement.assigned_at is not None:
            self.queue_wait.labels(engagement.queue).observe(max(0.0, engagement.assigned_at - engagement.created_at))

    def _on_decision(self, record: DecisionRecord) -> None:
        if record.outcome == "blocked":
            self.blocked.labels(record.scenario_id, record.reason).inc()

    # -- exposition ------------------------------------------------------------------

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition (Prometheus text, or OpenMetrics when `accept` asks for it) and its content type."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    async def serve(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Serve GET /metrics on host:port (0 picks a free port); returns the bound port."""
        self._server = await asyncio.start_server(self._handle, host, port, limit=_MAX_REQUEST_HEAD)
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("metrics.serving", address=f"{host}:{self.port}")
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                request = (await reader.readline()).decode("latin-1").split()
                accept = ""
                while True:
                    line = await reader.readline()
                    if line in (b"\r\n", b"\n", b""):
                        break
                    name, _, value = line.decode("latin-1").partition(":")
                    if name.strip().lower() == "accept":
                        accept = value.strip()
                method, path = (request[0], request[1].split("?")[0]) if len(request) >= 2 else ("", "")
                if method not in ("GET", "HEAD"):
                    status, body, content_type = "405 Method Not Allowed", b"GET /metrics\n", "text/plain"
                elif path not in ("/metrics", "/"):
                    status, body, content_type = "404 Not Found", b"GET /metrics\n", "text/plain"
                else:
                    body, content_type = self.render(accept)
                    status = "200 OK"
                head = (
                    f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                )
                writer.write(head.encode("latin-1") + (b"" if method == "HEAD" else body))
                await writer.drain()
        except (TimeoutError, ConnectionError, ValueError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
