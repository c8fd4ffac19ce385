"""Errors are bounded, whatever the caller sent: they travel in trailing metadata, which has hard limits."""

from __future__ import annotations

import base64

import grpc

from sluice_core import errors
from sluice_core.errors import FieldViolation, InvalidArgument

# gRPC's default limit on a call's metadata; past it the caller gets RESOURCE_EXHAUSTED, not the error.
GRPC_METADATA_LIMIT = 8192


def metadata_bytes(error: errors.SluiceError) -> int:
    """What the error costs on the wire: grpc-message (percent-encoded) and grpc-status-details-bin."""
    status = errors.to_status(error)
    encoded_message = sum(1 if c.isascii() and c.isprintable() else 3 * len(c.encode()) for c in status.details)
    details = sum(len(base64.b64encode(v)) for k, v in status.trailing_metadata if isinstance(v, bytes))
    return encoded_message + details


def test_hundreds_of_violations_keep_the_first_few_and_say_how_many_more() -> None:
    error = InvalidArgument([FieldViolation(f"messages.messages[{i}].role", "must be set") for i in range(500)])
    assert len(error.violations) == errors.MAX_VIOLATIONS
    assert error.message.endswith(f"; and {500 - errors.MAX_VIOLATIONS} more")
    assert metadata_bytes(error) < GRPC_METADATA_LIMIT // 2


def test_huge_and_multibyte_input_in_an_error_is_cut_to_size() -> None:
    echoed = "会" * 40_000
    for error in (
        errors.NotFound(f"no conversation {echoed}"),
        InvalidArgument([FieldViolation(echoed, echoed)] * 20),
    ):
        assert len(error.message.encode()) <= errors.MAX_MESSAGE_BYTES
        assert error.message.endswith("…") or "more" in error.message
        assert metadata_bytes(error) < GRPC_METADATA_LIMIT // 2


def test_a_cut_never_splits_a_character() -> None:
    cut = errors.bounded("é" * 100, 11)
    assert cut == "éééé…" and len(cut.encode()) <= 11


def test_the_count_of_violations_left_out_survives_a_relay() -> None:
    error = InvalidArgument([FieldViolation("f", "bad")] * 12)

    class Failed(grpc.aio.AioRpcError):
        def __init__(self) -> None:
            status = errors.to_status(error)
            trailing = grpc.aio.Metadata(*status.trailing_metadata)
            super().__init__(status.code, grpc.aio.Metadata(), trailing, status.details)

    relayed = errors.from_rpc_error(Failed())
    assert isinstance(relayed, InvalidArgument)
    assert relayed.more == error.more == 12 - errors.MAX_VIOLATIONS
    assert relayed.message == error.message
