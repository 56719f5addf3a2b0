"""Errors a caller can cause, each with the HTTP status and gRPC code it maps to.

The service core raises these; REST turns them into ``{"error": {"code", "message", "field"}}``
with the status below, gRPC into the matching status code. Anything else that escapes is a bug
(a 500 / INTERNAL), never the answer to bad input.
"""

from __future__ import annotations


class ServiceError(Exception):
    status = 400
    code = "invalid"
    grpc_code = "INVALID_ARGUMENT"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict:
        return {"error": {"code": self.code, "message": self.message, "field": self.field}}


class BadRequest(ServiceError):
    pass


class Unauthorized(ServiceError):
    status, code, grpc_code = 401, "unauthorized", "UNAUTHENTICATED"


class Forbidden(ServiceError):
    status, code, grpc_code = 403, "forbidden", "PERMISSION_DENIED"


class NotFound(ServiceError):
    status, code, grpc_code = 404, "not_found", "NOT_FOUND"


class PayloadTooLarge(ServiceError):
    status, code, grpc_code = 413, "too_large", "RESOURCE_EXHAUSTED"


class TooManyRequests(ServiceError):
    status, code, grpc_code = 429, "too_many", "RESOURCE_EXHAUSTED"


class Conflict(ServiceError):
    status, code, grpc_code = 409, "conflict", "ABORTED"


class UnsupportedMediaType(ServiceError):
    status, code, grpc_code = 415, "unsupported_media_type", "INVALID_ARGUMENT"


class Unavailable(ServiceError):
    status, code, grpc_code = 503, "unavailable", "UNAVAILABLE"
