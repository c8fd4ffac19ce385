"""Client channels between services: keepalive for long streams, a conservative retry policy, a span per call."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf.descriptor_pb2 import MethodOptions

from sluice.datastore.v1 import datastore_pb2
from sluice.generation.v1 import generation_pb2
from sluice.inference.v1 import inference_pb2
from sluice.ratelimit.v1 import budgets_pb2
from sluice_core.interceptors import client_interceptors
from sluice_core.tls import TlsFiles

# Calls that never reached a server are retried by gRPC whatever the policy.
# UNAVAILABLE from a handler (a store that is away) is retried only for the
# methods whose proto declares them safe to run twice (idempotency_level:
# reads, and writes made idempotent by a request id). Not the token streams:
# Envoy retries those (before their response headers), and the queue sends a
# generation whose replica was lost to another; a third layer here made one
# call up to nine attempts at the queue in an outage.
_SERVICES = (datastore_pb2, inference_pb2, generation_pb2, budgets_pb2)
_SAFE_TWICE = (MethodOptions.NO_SIDE_EFFECTS, MethodOptions.IDEMPOTENT)


def _idempotent() -> list[dict[str, str]]:
    return [
        {"service": service.full_name, "method": method.name}
        for module in _SERVICES
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
        if method.GetOptions().idempotency_level in _SAFE_TWICE
    ]


_SERVICE_CONFIG = {
    "methodConfig": [
        {
            "name": _idempotent(),
            "retryPolicy": {
                "maxAttempts": 3,
                "initialBackoff": "0.05s",
                "maxBackoff": "0.5s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
    # Retries stop while most calls fail, instead of tripling the load on a struggling service.
    "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
}

# A deadline further off than this is none: gRPC's clock overflows on the longest the protocol
# allows (99999999 hours), and a call with one failed DEADLINE_EXCEEDED at once. Envoy's edge drops
# such a grpc-timeout too (envoy/envoy.yaml.j2).
LONGEST_DEADLINE_S = 7 * 86400.0

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
    """A channel without TLS: to Envoy's public edge, or inside a network that has no TLS set up."""
    return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS, interceptors=client_interceptors())


def channel(target: str, tls: TlsFiles | None) -> grpc.aio.Channel:
    """A channel to another sluice process (normally Envoy's internal listener), as ``tls``'s identity."""
    if tls is None:
        return insecure_channel(target)
    credentials = tls.channel_credentials()
    return grpc.aio.secure_channel(target, credentials, options=CHANNEL_OPTIONS, interceptors=client_interceptors())
