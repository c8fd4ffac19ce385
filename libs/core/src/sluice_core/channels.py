"""Client channels between services: keepalive for long streams and a conservative retry policy."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import grpc

# Retry only what cannot have reached a handler or is safe to repeat:
# UNAVAILABLE (connection refused, replica draining). gRPC never retries a
# call once response headers arrived, so a token stream is never replayed.
_SERVICE_CONFIG = {
    "methodConfig": [
        {
            "name": [{}],
            "retryPolicy": {
                "maxAttempts": 3,
                "initialBackoff": "0.05s",
                "maxBackoff": "0.5s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ]
}

CHANNEL_OPTIONS: Sequence[tuple[str, Any]] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.enable_retries", 1),
    ("grpc.service_config", json.dumps(_SERVICE_CONFIG)),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
)


def insecure_channel(target: str) -> grpc.aio.Channel:
    """A channel to another sluice service (normally Envoy's internal listener)."""
    return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
