"""Errors that map to gRPC status codes, in one place.

Domain code raises these; the server interceptor (``interceptors.py``) turns
them into a status with machine-readable ``google.rpc`` details, and clients
turn the status back into the same classes (``from_rpc_error``). Anything else
becomes INTERNAL with a generic message: the traceback goes to the log, never
to the caller.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

# An error goes back in trailing metadata: its message percent-encoded (up to 9 bytes a character)
# and again, with the details, in grpc-status-details-bin (base64). gRPC refuses metadata past
# 8 KB, and Envoy resets the whole connection, every caller's stream on it, past its header limit:
# so an error carries at most this much, whatever the caller sent.
MAX_MESSAGE_BYTES = 512
MAX_VIOLATIONS = 5
MAX_FIELD_BYTES = 96
MAX_DESCRIPTION_BYTES = 160
_MORE = re.compile(r"; and (\d+) more$")


def bounded(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes, whole characters, ending in "…" if it was cut.

    Lone surrogates (text a caller cut in the middle of a character) become "?": they cannot be sent.
    """
    encoded = text.encode(errors="replace")
    if len(encoded) <= limit:
        return encoded.decode()
    return encoded[: limit - len("…".encode())].decode(errors="ignore") + "…"


class SluiceError(Exception):
    """Base class: an error a caller can act on, with its gRPC code; its message is bounded."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        message = bounded(message, MAX_MESSAGE_BYTES)
        super().__init__(message)
        self.message = message

    def details(self) -> Sequence[any_pb2.Any]:
        """``google.rpc`` detail messages sent along with the status."""
        return ()


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class InvalidArgument(SluiceError):
    """Bad input: names each offending field (``google.rpc.BadRequest``)."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, violations: Sequence[FieldViolation], more: int = 0) -> None:
        """The first ``MAX_VIOLATIONS`` of ``violations``, each cut to size, and how many more there were
        (those left out here, plus ``more`` left out before)."""
        if not violations:
            raise ValueError("InvalidArgument needs at least one violation")
        self.violations = tuple(
            FieldViolation(bounded(v.field, MAX_FIELD_BYTES), bounded(v.description, MAX_DESCRIPTION_BYTES))
            for v in violations[:MAX_VIOLATIONS]
        )
        self.more = more + len(violations) - len(self.violations)
        suffix = f"; and {self.more} more" if self.more else ""
        listed = "; ".join(f"{v.field}: {v.description}" for v in self.violations)
        super().__init__(bounded(listed, MAX_MESSAGE_BYTES - len(suffix)) + suffix)

    @classmethod
    def field(cls, field: str, description: str) -> InvalidArgument:
        return cls([FieldViolation(field, description)])

    def details(self) -> Sequence[any_pb2.Any]:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in self.violations
            ]
        )
        return (_pack(bad_request),)


class Unauthenticated(SluiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class NotFound(SluiceError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(SluiceError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(SluiceError):
    """A caller this service does not take (its identity), whatever it asks."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Unimplemented(SluiceError):
    code = grpc.StatusCode.UNIMPLEMENTED


class _Retryable(SluiceError):
    """An error worth retrying later; ``retry_after_s`` becomes ``google.rpc.RetryInfo``."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def details(self) -> Sequence[any_pb2.Any]:
        if self.retry_after_s is None:
            return ()
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(self.retry_after_s * 1e9))
        return (_pack(error_details_pb2.RetryInfo(retry_delay=delay)),)


class ResourceExhausted(_Retryable):
    """Over a budget or a queue is full: retry after the hint, not at once."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(_Retryable):
    """Not ready, draining, or a dependency is down."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(SluiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(SluiceError):
    code = grpc.StatusCode.CANCELLED


class Internal(SluiceError):
    """A downstream INTERNAL error relayed as is (its message is already generic)."""


class Relayed(SluiceError):
    """A downstream status with no class of its own (UNKNOWN, ...), passed on unchanged."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


_BY_CODE: dict[grpc.StatusCode, type[SluiceError]] = {
    cls.code: cls
    for cls in (
        Unauthenticated,
        PermissionDenied,
        NotFound,
        AlreadyExists,
        Unimplemented,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
        Internal,
    )
}


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def to_status(error: SluiceError) -> grpc.Status:
    """The status (code, message and details in trailing metadata) for an error."""
    status = status_pb2.Status(code=error.code.value[0], message=error.message, details=list(error.details()))
    return rpc_status.to_status(status)


def from_rpc_error(error: grpc.aio.AioRpcError) -> SluiceError:
    """Turn a failed call back into the error class the server raised, details included."""
    code = error.code()
    message = error.details() or code.name
    # An AioRpcError has what from_call reads (code, details, trailing metadata), though it is no grpc.Call.
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    details = list(status.details) if status is not None else []
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        violations = [
            FieldViolation(v.field, v.description) for d in details for v in _unpack_bad_request(d).field_violations
        ]
        if not violations:
            return InvalidArgument.field("request", message)
        more = _MORE.search(message)
        return InvalidArgument(violations, int(more[1]) if more else 0)
    cls = _BY_CODE.get(code)
    if cls is None:
        return Relayed(code, message)
    if issubclass(cls, _Retryable):
        return cls(message, retry_after_s=_retry_after(details))
    return cls(message)


def _unpack_bad_request(packed: any_pb2.Any) -> error_details_pb2.BadRequest:
    bad_request = error_details_pb2.BadRequest()
    if packed.Is(error_details_pb2.BadRequest.DESCRIPTOR):
        packed.Unpack(bad_request)
    return bad_request


def _retry_after(details: Sequence[any_pb2.Any]) -> float | None:
    for packed in details:
        if packed.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            packed.Unpack(info)
            return float(info.retry_delay.ToNanoseconds()) / 1e9
    return None
