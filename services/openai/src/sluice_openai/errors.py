"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` with the HTTP status clients expect.

OpenAI's SDKs pick their exception class by the HTTP status (400
BadRequestError, 401 AuthenticationError, 404 NotFoundError, 429
RateLimitError, ...) and retry 429 and 5xx after ``Retry-After``, so the
status and that header matter more than the body's words.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import grpc
from aiohttp import web

from sluice_core import errors
from sluice_core.errors import SluiceError, bounded

# The error JSON's "type", by HTTP status; any other is an invalid_request_error (4xx) or a server_error (5xx).
_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}

# Statuses of sluice's gRPC answers as OpenAI's clients know them. 499 is the
# status proxies log for a client that went away; no client reads it.
_STATUSES = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


@dataclass(frozen=True)
class OpenAIError(Exception):
    """An answer other than success, as OpenAI's API gives it."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    retry_after_s: float | None = None

    def body(self) -> dict[str, object]:
        kind = _TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        message = bounded(self.message, errors.MAX_MESSAGE_BYTES)
        return {"error": {"message": message, "type": kind, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        # Whole seconds, rounded up: what HTTP's Retry-After takes.
        return {} if self.retry_after_s is None else {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}

    def response(self, headers: dict[str, str] | None = None) -> web.Response:
        return web.Response(
            status=self.status,
            text=json.dumps(self.body()),
            content_type="application/json",
            headers={**self.headers(), **(headers or {})},
        )


def invalid(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param)


def from_sluice(error: SluiceError) -> OpenAIError:
    """The OpenAI form of an error the Generation API answered with."""
    status = _STATUSES.get(error.code, 500)
    param = None
    if isinstance(error, errors.InvalidArgument) and error.violations:
        # The queue names the proto's fields: sampling.max_tokens is OpenAI's max_tokens.
        param = error.violations[0].field.removeprefix("sampling.")
    retry_after = error.retry_after_s if isinstance(error, errors.ResourceExhausted | errors.Unavailable) else None
    return OpenAIError(status, error.message, param=param, code=error.code.name.lower(), retry_after_s=retry_after)
