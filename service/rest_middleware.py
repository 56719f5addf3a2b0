"""The REST API's ASGI middleware: body limits, observation (metrics), the catch-all error guard,
the rate-limited error log, and the fast lookup path (``FastLookup``: ``POST /v1/lookup`` answered
without FastAPI when the body is well formed; anything else falls through to the pydantic route)."""

from __future__ import annotations

import json
import logging
import re
import time

from starlette.concurrency import run_in_threadpool

from .core import WouldBlock
from .errors import ServiceError
from .limits import MAX_EXTRA_KEYS, MAX_MODEL_CHARS, MAX_NAMESPACE_CHARS, MAX_TOKEN_ID, RateLimited, TenantRateLimiter
from .rest_models import HEX64
from .settings import Settings
from .tenancy import Authenticator

log = logging.getLogger("kvtier.rest")


# -- body limit ------------------------------------------------------------------------------
class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a request body beyond its limit gets 413 before (or while) it is read.

    Block uploads (``PUT /v1/blocks``) may carry ``max_request_bytes``; every other body
    ``max_json_bytes``. A declared Content-Length over the limit is refused before any byte is read.
    """

    def __init__(self, app, settings: Settings) -> None:
        self.app = app
        self.blocks_limit = settings.max_request_bytes
        self.json_limit = settings.max_json_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.blocks_limit if scope["path"] == "/v1/blocks" and scope["method"] == "PUT" else self.json_limit
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    return await _send_error(send, 400, "invalid", "Content-Length is not an integer", "content-length")
                if declared > limit:
                    return await _send_error(send, 413, "too_large", f"the body has {declared} bytes, at most {limit} are allowed", "body")
        seen = 0
        started = exceeded = False
        message_413 = f"the body has more than {limit} bytes"

        async def limited_receive():
            nonlocal seen, exceeded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    exceeded = True
                    raise _TooLarge()
            return message

        async def tracking_send(message):
            nonlocal started
            if exceeded:  # the app turned _TooLarge into an answer of its own (FastAPI: 400 "error parsing the body")
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await _send_error(send, 413, "too_large", message_413, "body")
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _send_error(send, 413, "too_large", message_413, "body")


async def _send_error(send, status: int, code: str, message: str, field: str | None) -> None:
    import json

    body = json.dumps({"error": {"code": code, "message": message, "field": field}}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class Observe:
    """ASGI middleware: latency and status of every request, labelled by its route template."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            svc = getattr(scope["app"].state, "svc", None) if "app" in scope else None
            if svc is not None and svc.metrics is not None:
                route = scope.get("route")
                op = getattr(route, "path", None) or scope.get("kvtier_op", "unmatched")
                svc.metrics.observe("rest", f"{scope['method']} {op}", status, time.perf_counter() - t0)


class RateLimitedLog:
    """Tracebacks of unexpected errors, at most one per ``every_s`` per exception type (the rest counted).

    A request that triggers a bug must not be able to flood the log: each traceback is tens of lines.
    """

    def __init__(self, logger: logging.Logger, every_s: float = 10.0) -> None:
        self.logger, self.every_s = logger, every_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def report(self, e: BaseException, msg: str, *args) -> None:
        name, now = type(e).__name__, time.monotonic()
        if now - self._last.get(name, -1e9) < self.every_s:
            self._suppressed[name] = self._suppressed.get(name, 0) + 1
            return
        self._last[name] = now
        n = self._suppressed.pop(name, 0)
        self.logger.error(
            msg + (f" ({n} more {name} not logged in the last {self.every_s:g}s)" if n else ""),
            *args,
            exc_info=(type(e), e, e.__traceback__),
        )


bug_log = RateLimitedLog(log)


class CatchAll:
    """ASGI middleware: an exception no handler answered becomes a 500 (``internal``), its traceback
    logged through ``bug_log`` (rate-limited). Starlette's own last resort re-raises to the server,
    which logs every traceback again: one bad request, one flood."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as e:  # never the answer to bad input: a bug
            bug_log.report(e, "internal error on %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await _send_error(send, 500, "internal", f"internal error: {type(e).__name__}", None)


_HEX64 = re.compile(HEX64[1:-1])
_LOOKUP_FIELDS = {"model", "token_ids", "hashes", "salt", "extra_keys", "return_keys"}
_JSON_HEADERS = [(b"content-type", b"application/json")]


class FastLookup:
    """ASGI middleware: ``POST /v1/lookup`` without the framework's per-request machinery.

    Lookups are the most frequent call (one per engine request) and take tens of microseconds in
    the store; FastAPI's dependency solving, body model and response model cost several times that.
    A well-formed request (a JSON object of the documented fields with the documented types) is
    answered here by the same ``KVService.lookup``; anything else goes on, body replayed, to the
    FastAPI route, so every error is the route's own (the route also documents the call in OpenAPI).
    """

    def __init__(self, app, settings: Settings, auth: Authenticator) -> None:
        self.app = app
        self.limit = settings.max_json_bytes
        self.auth = auth

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/v1/lookup" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        svc = getattr(scope["app"].state, "svc", None) if "app" in scope else None
        declared = next((v for k, v in scope.get("headers", ()) if k == b"content-length"), None)
        if svc is None or not svc.store_is_local or declared is None or not declared.isdigit() or int(declared) > min(self.limit, 1 << 20):
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        req = _well_formed_lookup(body)
        if req is None:
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            return await self.app(scope, replay, send)
        scope["kvtier_op"] = "/v1/lookup"
        headers = {k: v for k, v in scope.get("headers", ()) if k in (b"authorization", b"x-api-key")}
        extra = []
        try:
            p = svc.admit(
                self.auth.authenticate(
                    headers.get(b"authorization", b"").decode("latin-1") or None, headers.get(b"x-api-key", b"").decode("latin-1") or None
                )
            )
            kwargs = dict(
                token_ids=req.get("token_ids"),
                hashes=req.get("hashes"),
                salt=req.get("salt", ""),
                extra_keys=req.get("extra_keys", []),
                return_keys=req.get("return_keys", False),
            )
            try:  # in memory, microseconds: no thread hop, unless the store's lock is taken right now
                out = svc.lookup(p, req["model"], wait=False, **kwargs)
            except WouldBlock:
                out = await run_in_threadpool(lambda: svc.lookup(p, req["model"], **kwargs))
            status, payload = 200, out
        except ServiceError as e:
            status, payload = e.status, e.to_dict()
            if isinstance(e, RateLimited):
                extra = [(b"retry-after", TenantRateLimiter.retry_after_header(e).encode())]
        data = json.dumps(payload, separators=(",", ":")).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": _JSON_HEADERS + extra + [(b"content-length", str(len(data)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": data})


def _well_formed_lookup(body: bytes) -> dict | None:
    """The request when it is exactly what the route's model accepts (types only; values are KVService's job)."""
    try:
        req = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nesting deeper than the parser's stack
        return None
    if (
        not isinstance(req, dict)
        or not req.keys() <= _LOOKUP_FIELDS
        or not isinstance(req.get("model"), str)
        or len(req["model"]) > MAX_MODEL_CHARS
    ):
        return None
    tokens, hashes = req.get("token_ids"), req.get("hashes")
    if (tokens is None) == (hashes is None):
        return None
    if tokens is not None and not (isinstance(tokens, list) and all(type(t) is int and 0 <= t <= MAX_TOKEN_ID for t in tokens)):
        return None
    if hashes is not None and not (isinstance(hashes, list) and all(isinstance(h, str) and _HEX64.fullmatch(h) for h in hashes)):
        return None
    if not isinstance(req.get("salt", ""), str) or len(req.get("salt", "")) > MAX_NAMESPACE_CHARS or not _utf8(req.get("salt", "")):
        return None
    extra = req.get("extra_keys", [])
    if not (
        isinstance(extra, list)
        and len(extra) <= MAX_EXTRA_KEYS
        and all(isinstance(k, str) and len(k) <= MAX_NAMESPACE_CHARS and _utf8(k) for k in extra)
    ):
        return None
    if not isinstance(req.get("return_keys", False), bool):
        return None
    return req


def _utf8(text: str) -> bool:
    """False for a string holding a lone surrogate ("\\ud800" in JSON): it has no UTF-8 form."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False
