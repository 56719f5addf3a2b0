"""Request limits shared by every transport (REST, its fast lookup path, gRPC, the local
transport and the core), and the per-tenant request rate limits.

The field limits below are the one definition; the pydantic models, the fast path's checks and the
core's checks all read them, so a value is refused the same way whichever way it came.

Per-tenant request rate limits: one token bucket per tenant, shared by REST and gRPC.

A tenant may make ``tenant_burst`` requests at once and ``tenant_requests_per_s`` per second on
average; a request beyond that is answered 429 (``RESOURCE_EXHAUSTED`` in gRPC) with the seconds
after which one token is back, and changes nothing. Health endpoints and ``/metrics`` are not
counted. Memory is one small entry per tenant, and tenants are the configured API keys' tenants.
"""

from __future__ import annotations

import math
import threading
import time

from .errors import TooManyRequests

# -- request field limits ----------------------------------------------------------------------
MAX_MODEL_CHARS = 64  # a registered spec's handle (``model``), as the service hands it out
MAX_MODEL_ID_CHARS = 256  # a spec's ``model_id`` (the weights' name)
MAX_NAMESPACE_CHARS = 256  # ``salt`` and each of ``extra_keys``
MAX_EXTRA_KEYS = 16
MAX_DTYPE_CHARS = 16
MAX_TOKEN_ID = 0xFFFFFFFF  # token ids are hashed as little-endian uint32


class RateLimited(TooManyRequests):
    """429 with the seconds after which the tenant may try again (``Retry-After``)."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message, field="authorization")
        self.retry_after_s = retry_after_s


class TenantRateLimiter:
    def __init__(self, rate_per_s: float | None, burst: int, clock=time.monotonic) -> None:
        if rate_per_s is not None and not (isinstance(rate_per_s, (int, float)) and rate_per_s > 0):
            raise ValueError(f"rate_per_s must be a positive number or None, got {rate_per_s!r}")
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ValueError(f"burst must be a positive int, got {burst!r}")
        self.rate = rate_per_s
        self.burst = burst
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, time of last refill)

    def admit(self, tenant: str) -> None:
        """Take one token of ``tenant``'s bucket, or raise ``RateLimited``."""
        if self.rate is None:
            return
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.get(tenant, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens < 1.0:
                self._buckets[tenant] = (tokens, now)
                wait = (1.0 - tokens) / self.rate
                raise RateLimited(
                    f"this tenant is over its request rate ({self.rate:g}/s, bursts of {self.burst}; "
                    f"tenant_requests_per_s); retry in {wait:.2f}s",
                    retry_after_s=wait,
                )
            self._buckets[tenant] = (tokens - 1.0, now)

    @staticmethod
    def retry_after_header(e: RateLimited) -> str:
        return str(max(1, math.ceil(e.retry_after_s)))
