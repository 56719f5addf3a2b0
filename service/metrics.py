"""Prometheus metrics of one service instance (its own registry, so several apps can share a process).

Counters the transports increment (requests, latency, lookups, gets, rejected frames) plus a
collector that reads the store's counters at scrape time (per tier: hits, misses, bytes,
capacity, blocks, evictions, demotions, promotions, corrupt frames, backend errors — for the
Redis tier these are the Redis errors).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

disable_created_metrics()  # the *_created series double every counter for no use here
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# seconds: from 100 us (a lookup in memory) to 10 s (a large transfer over a slow link)
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class Metrics:
    def __init__(self, service) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "kvtier_requests", "Requests answered, by transport, operation and status.", ["transport", "op", "status"], registry=r
        )
        self.latency = Histogram(
            "kvtier_request_duration_seconds",
            "Request latency, by transport and operation.",
            ["transport", "op"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.lookup_blocks = Counter(
            "kvtier_lookup_blocks", "Blocks asked for by lookups: hit (in the cached prefix) or miss.", ["result"], registry=r
        )
        self.get_blocks = Counter("kvtier_get_blocks", "Blocks asked for by gets: hit or miss.", ["result"], registry=r)
        self.frames_rejected = Counter(
            "kvtier_frames_rejected", "Uploaded frames rejected (invalid, shape, dtype, payload).", ["reason"], registry=r
        )
        r.register(_StoreCollector(service))
        self.lookup_hit, self.lookup_miss = self.lookup_blocks.labels("hit"), self.lookup_blocks.labels("miss")
        # (transport, op, status) -> (request counter, latency histogram): a labels() call costs as much
        # as the rest of a lookup's bookkeeping; bounded, beyond it the children are looked up each time
        self._children: dict[tuple[str, str, str], tuple] = {}

    def observe(self, transport: str, op: str, status: int | str, seconds: float) -> None:
        key = (transport, op, str(status))
        pair = self._children.get(key)
        if pair is None:
            pair = (self.requests.labels(*key), self.latency.labels(transport, op))
            if len(self._children) < 1024:
                self._children[key] = pair
        pair[0].inc()
        pair[1].observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StoreCollector:
    def __init__(self, service) -> None:
        self.service = service

    def describe(self):
        return []

    def collect(self):
        s = self.service.store.stats()
        fams = {
            "hits": CounterMetricFamily("kvtier_tier_hits", "Blocks served by each tier.", labels=["tier"]),
            "misses": CounterMetricFamily("kvtier_tier_misses", "Blocks asked of each tier and not found there.", labels=["tier"]),
            "evictions": CounterMetricFamily("kvtier_tier_evictions", "Blocks evicted from each tier.", labels=["tier"]),
            "demotions": CounterMetricFamily("kvtier_tier_demotions", "Evicted blocks written to the next tier.", labels=["tier"]),
            "promotions": CounterMetricFamily(
                "kvtier_tier_promotions", "Blocks copied from this tier into the fastest tier on a hit.", labels=["tier"]
            ),
            "corrupt": CounterMetricFamily("kvtier_corrupt_frames", "Frames found corrupt on read (a miss, deleted).", labels=["tier"]),
            "errors": CounterMetricFamily(
                "kvtier_backend_errors", "Backend errors per tier (I/O; connection errors for Redis).", labels=["tier"]
            ),
            "refused": CounterMetricFamily("kvtier_tier_refused", "Blocks a tier refused for lack of room.", labels=["tier"]),
            "write_through_retried": CounterMetricFamily(
                "kvtier_write_through_retried", "Blocks a write-through tier refused and took on a later try.", labels=["tier"]
            ),
            "demotion_failures": CounterMetricFamily(
                "kvtier_demotion_failures",
                "Evicted blocks no lower tier took (disk full, Redis down): kept in the tier instead of dropped.",
                labels=["tier"],
            ),
            "write_through_dropped": CounterMetricFamily(
                "kvtier_write_through_dropped", "Refused write-throughs forgotten because the pending list was full.", labels=["tier"]
            ),
        }
        gauges = {
            "bytes": GaugeMetricFamily("kvtier_tier_bytes", "Bytes held by each tier.", labels=["tier"]),
            "blocks": GaugeMetricFamily("kvtier_tier_blocks", "Blocks held by each tier.", labels=["tier"]),
            "capacity_bytes": GaugeMetricFamily(
                "kvtier_tier_capacity_bytes", "Capacity of each tier (absent: unbounded here).", labels=["tier"]
            ),
            "write_through_pending": GaugeMetricFamily(
                "kvtier_write_through_pending", "Blocks a write-through tier refused, to be written again.", labels=["tier"]
            ),
        }
        redis_errors = 0
        for t in s["tiers"]:
            for name, fam in fams.items():
                fam.add_metric([t["name"]], t.get(name, 0))
            for name, fam in gauges.items():
                if t.get(name) is not None:
                    fam.add_metric([t["name"]], t[name])
            if t.get("device") == "redis":
                redis_errors += t.get("errors", 0)
        yield from fams.values()
        yield from gauges.values()
        yield CounterMetricFamily("kvtier_redis_errors", "Redis errors (all Redis tiers); calls degraded to misses.", value=redis_errors)
        tb = GaugeMetricFamily("kvtier_tenant_bytes", "Logical bytes cached per tenant (each block once).", labels=["tenant"])
        for tenant, b in s["tenant_bytes"].items():
            tb.add_metric([tenant], b)
        yield tb
        yield GaugeMetricFamily("kvtier_blocks", "Blocks in the prefix index.", value=s["blocks"])
        yield GaugeMetricFamily("kvtier_leases", "Live pins (leases).", value=s["leases"])
        yield CounterMetricFamily("kvtier_quota_evictions", "Blocks evicted to keep a tenant under its quota.", value=s["quota_evictions"])
        ts = getattr(self.service, "transport_stats", None)
        if ts is not None:
            for name, doc in (
                ("connections_refused", "REST connections refused (per-address cap, or max_connections with none idle)."),
                ("header_timeouts", "REST connections closed for not sending a request's headers within header_timeout_s."),
                ("idle_evicted", "Idle REST connections closed to make room at max_connections."),
                ("overloaded", "REST requests answered 503 at limit_concurrency."),
                ("body_timeouts", "REST requests answered 408: the body stalled longer than body_timeout_s."),
            ):
                yield CounterMetricFamily(f"kvtier_{name}", doc, value=getattr(ts, name))
        yield CounterMetricFamily(
            "kvtier_quota_refusals", "Blocks refused because a tenant's quota could not make room.", value=s["quota_refusals"]
        )
