"""Renders Envoy's configuration from the one template, ``envoy/envoy.yaml.j2``.

The local stack renders it with loopback addresses and the ports it chose;
``make gen`` renders the compose copy (``envoy/envoy.compose.yaml``), and
``--check`` fails when that copy is stale.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import jinja2


def repo_root() -> Path:
    """The sluice checkout this package was installed from (the local stack runs from one)."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "envoy" / "envoy.yaml.j2").is_file():
            return parent
    raise FileNotFoundError("envoy/envoy.yaml.j2 not found: run `sluice up` and `sluice bench` from a sluice checkout")


@dataclass(frozen=True)
class HostPort:
    address: str
    port: int


@dataclass(frozen=True)
class EnvoyLayout:
    queue_hosts: tuple[HostPort, ...]
    inference_hosts: tuple[HostPort, ...]
    otlp: HostPort | None = None
    ratelimit_hosts: tuple[HostPort, ...] = ()
    datastore_hosts: tuple[HostPort, ...] = ()
    # OpenAI's HTTP front (services/openai), routed at the edge under /v1/.
    openai_hosts: tuple[HostPort, ...] = ()
    ratelimit_domain: str = "sluice-edge"
    ratelimit_timeout: str = "1s"
    edge_port: int = 8080
    internal_port: int = 8081
    admin_port: int = 9901
    listen_address: str = "127.0.0.1"
    admin_address: str = "127.0.0.1"
    cluster_type: Literal["STATIC", "STRICT_DNS"] = "STATIC"
    health_interval: str = "1s"
    stream_idle_timeout: str = "300s"
    max_stream_duration: str = "3600s"
    trace_flush_ms: int = 1000
    trace_min_flush_spans: int = 512
    # The folder of sluice's certificates (``sluice_core.certificates``): with it, the internal
    # listener and every service connection are mutual TLS; without, plaintext.
    tls_dir: str | None = None


def render(layout: EnvoyLayout, root: Path | None = None) -> str:
    """The template of the checkout at ``root`` (default: this one), rendered for ``layout``."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader((root or repo_root()) / "envoy"),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    return env.get_template("envoy.yaml.j2").render(vars(layout))


def compose_layout() -> EnvoyLayout:
    """Envoy in compose: every service by its compose name, Jaeger for traces."""
    return EnvoyLayout(
        queue_hosts=(HostPort("queue", 50051),),
        inference_hosts=(HostPort("inference-1", 50061), HostPort("inference-2", 50061)),
        otlp=HostPort("jaeger", 4317),
        ratelimit_hosts=(HostPort("ratelimit", 50071),),
        datastore_hosts=(HostPort("datastore", 50081),),
        openai_hosts=(HostPort("openai", 8000),),
        listen_address="0.0.0.0",
        cluster_type="STRICT_DNS",
        health_interval="2s",
        tls_dir="/etc/sluice/tls",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="Render envoy/envoy.compose.yaml from the template.")
    parser.add_argument("--check", action="store_true", help="fail if the committed copy is stale")
    args = parser.parse_args()
    target = repo_root() / "envoy" / "envoy.compose.yaml"
    rendered = render(compose_layout())
    if args.check:
        if not target.is_file() or target.read_text() != rendered:
            sys.exit(f"{target.name} is stale; run `make gen`")
        return
    target.write_text(rendered)


if __name__ == "__main__":
    main()
