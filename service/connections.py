"""Connection hygiene of the REST server: what an idle or greedy client may hold.

uvicorn alone closes a keep-alive connection that idles after an answer, but a connection that
never sends a request stays open forever, and its ``limit_concurrency`` counts connections: a
thousand idle sockets, no key needed, and every request gets 503. Here instead:

- ``GuardedHTTPProtocol`` (the uvicorn protocol class ``kvtier serve`` runs): a connection must
  send a request's complete headers within ``header_timeout_s`` of opening or of its previous
  answer, else it is closed; one client address holds at most ``max_connections_per_client``
  connections (more are answered 503 and closed); and at ``max_connections`` a new connection
  closes the longest-idle one (no request in progress), or is refused when none is idle.
- ``RequestGuard`` (ASGI): at most ``limit_concurrency`` requests in progress (beyond: 503 with
  ``Retry-After``), except ``/healthz`` and ``/readyz``, which always answer; and a request body
  whose next chunk takes longer than ``body_timeout_s`` gets 408 and the connection is closed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

from .settings import Settings

log = logging.getLogger("kvtier.connections")

HEALTH_PATHS = frozenset({"/healthz", "/readyz"})
_REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"retry-after: 1\r\ncontent-length: %d\r\n\r\n%s"
)


@dataclass
class TransportStats:
    """What the guards refused or cut, for ``/metrics``."""

    connections_refused: int = 0  # answered 503 and closed (per-address cap, or max_connections with none idle)
    header_timeouts: int = 0  # closed for not sending a request's headers in time
    idle_evicted: int = 0  # idle connections closed to make room at max_connections
    overloaded: int = 0  # requests answered 503 at limit_concurrency
    body_timeouts: int = 0  # requests answered 408 (stalled body)


class ConnectionGuard:
    """Shared state of one server's connections (counts per address, refusals, timeouts)."""

    def __init__(self, settings: Settings, stats: TransportStats | None = None) -> None:
        self.header_timeout_s = settings.header_timeout_s
        self.max_connections = settings.max_connections
        self.max_per_client = settings.max_connections_per_client
        self.per_client: dict[str, int] = {}
        self.stats = stats or TransportStats()


def _refusal(message: str) -> bytes:
    body = json.dumps({"error": {"code": "too_many_connections", "message": message, "field": None}}).encode()
    return _REFUSED % (len(body), body)


class _GuardMixin:
    guard: ConnectionGuard
    # provided by the uvicorn protocol class this is mixed into
    connections: set
    transport: Any
    cycle: Any
    client: tuple[str, int] | None
    loop: asyncio.AbstractEventLoop
    _guard_timer: asyncio.TimerHandle | None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        g = self.guard
        self._guard_ip = None
        self._guard_timer = None
        ip = self.client[0] if self.client else ""
        if g.per_client.get(ip, 0) >= g.max_per_client:
            return self._refuse(f"this address holds {g.max_per_client} connections already (max_connections_per_client)")
        if len(self.connections) > g.max_connections and not self._close_idlest():
            return self._refuse(f"{g.max_connections} connections are open and busy (max_connections)")
        self._guard_ip = ip
        g.per_client[ip] = g.per_client.get(ip, 0) + 1
        self._arm_header_timer()

    def _refuse(self, message: str) -> None:
        self.guard.stats.connections_refused += 1
        self.transport.write(_refusal(message))
        self.transport.close()

    def _waiting_for_headers(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _close_idlest(self) -> bool:
        idle = [
            c
            for c in self.connections
            if c is not self and getattr(c, "_guard_ip", None) is not None and c._waiting_for_headers() and not c.transport.is_closing()
        ]
        if not idle:
            return False
        victim = min(idle, key=lambda c: c._guard_since)
        self.guard.stats.idle_evicted += 1
        victim.transport.close()
        return True

    def _arm_header_timer(self) -> None:
        if self._guard_timer is not None:
            self._guard_timer.cancel()
        self._guard_cycle = self.cycle
        self._guard_since = time.monotonic()
        self._guard_timer = self.loop.call_later(self.guard.header_timeout_s, self._header_timeout)

    def _header_timeout(self) -> None:
        self._guard_timer = None
        # no request's headers arrived since the timer was armed (a request in progress is never cut)
        if self.cycle is self._guard_cycle and self._waiting_for_headers() and not self.transport.is_closing():
            self.guard.stats.header_timeouts += 1
            self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        if not self.transport.is_closing() and self._waiting_for_headers():
            self._arm_header_timer()  # the next request's headers must come in time too

    def connection_lost(self, exc) -> None:
        if self._guard_timer is not None:
            self._guard_timer.cancel()
            self._guard_timer = None
        ip, self._guard_ip = self._guard_ip, None
        if ip is not None:
            g = self.guard
            n = g.per_client.get(ip, 1) - 1
            if n > 0:
                g.per_client[ip] = n
            else:
                g.per_client.pop(ip, None)
        super().connection_lost(exc)  # type: ignore[misc]


def guarded_http_protocol(settings: Settings, stats: TransportStats | None = None) -> tuple[type, ConnectionGuard]:
    """uvicorn's HTTP protocol class (httptools when installed, else h11) with the guard, and its state."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    guard = ConnectionGuard(settings, stats)
    cls = type("GuardedHTTPProtocol", (_GuardMixin, AutoHTTPProtocol), {"guard": guard})
    return cls, guard


class _BodyTimeout(Exception):
    pass


class RequestGuard:
    """ASGI middleware: the request cap (health paths exempt) and the body read timeout."""

    def __init__(self, app, settings: Settings, stats: TransportStats | None = None) -> None:
        self.app = app
        self.limit = settings.limit_concurrency
        self.body_timeout_s = settings.body_timeout_s
        self.in_progress = 0
        self.stats = stats or TransportStats()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.limit is not None and self.in_progress >= self.limit and scope["path"] not in HEALTH_PATHS:
            self.stats.overloaded += 1
            return await _send_json(
                send,
                503,
                {
                    "error": {
                        "code": "overloaded",
                        "message": f"{self.limit} requests are in progress (limit_concurrency); retry shortly",
                        "field": None,
                    }
                },
                [(b"retry-after", b"1")],
            )
        self.in_progress += 1
        body_done = scope["method"] in ("GET", "HEAD", "DELETE", "OPTIONS")
        timed_out = started = False

        async def timed_receive():
            nonlocal body_done, timed_out
            if body_done:  # after the body, receive() waits for a disconnect: no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout_s)
            except asyncio.TimeoutError:
                timed_out = True
                raise _BodyTimeout() from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def tracking_send(message):
            nonlocal started
            if timed_out:  # the app turned _BodyTimeout into an answer of its own (e.g. FastAPI's 400)
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await self._send_timeout(send)
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, timed_receive, tracking_send)
        except _BodyTimeout:
            if not started:
                await self._send_timeout(send)
        finally:
            self.in_progress -= 1

    async def _send_timeout(self, send) -> None:
        self.stats.body_timeouts += 1
        await _send_json(
            send,
            408,
            {
                "error": {
                    "code": "timeout",
                    "message": f"the request body stalled for more than {self.body_timeout_s:g}s (body_timeout_s)",
                    "field": "body",
                }
            },
            [(b"connection", b"close")],
        )


async def _send_json(send, status: int, doc: dict, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps(doc).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})
