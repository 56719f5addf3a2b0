"""What the routes take from the app: the service, settings and authenticator on ``app.state``, and the caller.

``create_app`` sets ``app.state.settings`` and ``app.state.auth``; its lifespan sets ``app.state.svc``
and ``app.state.transfers`` (the semaphore that bounds concurrent block transfers).
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from ..core import KVService
from ..settings import Settings
from ..tenancy import Authenticator, Principal

# they only document the two headers in OpenAPI (auto_error=False): principal() reads the raw headers
bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <api key>")
api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="or X-API-Key: <api key>")


def svc_of(request: Request) -> KVService:
    return request.app.state.svc


def settings_of(request: Request) -> Settings:
    return request.app.state.settings


def auth_of(request: Request) -> Authenticator:
    return request.app.state.auth


def transfers_of(request: Request) -> asyncio.Semaphore:
    return request.app.state.transfers


async def principal(
    request: Request, _bearer: HTTPAuthorizationCredentials | None = Depends(bearer), _key: str | None = Depends(api_key_header)
) -> Principal:
    """The authenticated caller, admitted by the service (its rate limit): 401/403/429 otherwise."""
    # the security dependencies only document the two headers in OpenAPI; the raw headers decide
    return svc_of(request).admit(auth_of(request).authenticate(request.headers.get("authorization"), request.headers.get("x-api-key")))


Caller = Annotated[Principal, Depends(principal)]
