"""Envoy's ``grpc_json_transcoder`` in front of the gRPC stand-in: the C++ translation, for comparison."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sluice.generation.v1 import generation_pb2
from sluice_devstack.stack import LOOPBACK


def descriptor_set() -> bytes:
    """``sluice.generation.v1`` and what it imports, as the transcoder's ``proto_descriptor`` (no protoc needed)."""
    from google.protobuf import descriptor_pb2

    files = descriptor_pb2.FileDescriptorSet()
    seen: set[str] = set()

    def add(descriptor: Any) -> None:
        if descriptor.name in seen:
            return
        seen.add(descriptor.name)
        for dependency in descriptor.dependencies:
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        descriptor.CopyToProto(proto)
        files.file.append(proto)

    add(generation_pb2.DESCRIPTOR)
    return files.SerializeToString()


_TYPE = "type.googleapis.com/"
_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def envoy_config(port: int, upstream_port: int, descriptor: Path) -> dict[str, Any]:
    transcoder = {
        "@type": f"{_TYPE}envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
        "proto_descriptor": str(descriptor),
        "services": ["sluice.generation.v1.Generation"],
        # POST /sluice.generation.v1.Generation/Generate with the request as JSON: no google.api.http options.
        "auto_mapping": True,
        "convert_grpc_status": True,
        "print_options": {"preserve_proto_field_names": True, "stream_sse_style_delimited": True},
    }
    manager = {
        "@type": f"{_TYPE}envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "bench",
        "codec_type": "AUTO",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "upstream", "timeout": "0s"}}],
                }
            ]
        },
        "http_filters": [
            {"name": "envoy.filters.http.grpc_json_transcoder", "typed_config": transcoder},
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": f"{_TYPE}envoy.extensions.filters.http.router.v3.Router"},
            },
        ],
    }
    http2 = {
        "@type": f"{_TYPE}{_HTTP_OPTIONS}",
        "explicit_http_config": {"http2_protocol_options": {}},
    }
    endpoint = {"endpoint": {"address": {"socket_address": {"address": LOOPBACK, "port_value": upstream_port}}}}
    return {
        "static_resources": {
            "listeners": [
                {
                    "name": "sse",
                    "address": {"socket_address": {"address": LOOPBACK, "port_value": port}},
                    "filter_chains": [
                        {
                            "filters": [
                                {"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "upstream",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": {_HTTP_OPTIONS: http2},
                    "load_assignment": {"cluster_name": "upstream", "endpoints": [{"lb_endpoints": [endpoint]}]},
                }
            ],
        }
    }
