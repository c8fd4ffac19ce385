"""``python -m sluice_core.healthcheck HOST:PORT [SERVICE]``: exit 0 if the service reports SERVING.

For container health checks (compose, Kubernetes exec probes): it asks the
standard ``grpc.health.v1`` service, as Envoy does. With ``--tls-dir`` and
``--identity`` it calls as that identity (the container's own, which its
service takes), over mutual TLS.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sluice_core import certificates
from sluice_core.channels import channel
from sluice_core.tls import TlsFiles


async def status(target: str, service: str, timeout_s: float, tls: TlsFiles | None = None) -> int | None:
    """``service``'s health at ``target`` (``HealthCheckResponse.ServingStatus``), None if it does not answer."""
    async with channel(target, tls) as connected:
        try:
            response = await health_pb2_grpc.HealthStub(connected).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.aio.AioRpcError:
            return None
    return int(response.status)


async def check(target: str, service: str, timeout_s: float, tls: TlsFiles | None = None) -> bool:
    return await status(target, service, timeout_s, tls) == health_pb2.HealthCheckResponse.SERVING


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("target")
    parser.add_argument("service", nargs="?", default="")
    parser.add_argument("--timeout", type=float, default=2.0)
    parser.add_argument("--tls-dir", type=Path, help="the certificates' folder (sluice_core.certificates)")
    parser.add_argument("--identity", help="whose certificate to call with (the container's own)")
    args = parser.parse_args()
    tls = certificates.files(args.tls_dir, args.identity) if args.tls_dir and args.identity else None
    sys.exit(0 if asyncio.run(check(args.target, args.service, args.timeout, tls)) else 1)


if __name__ == "__main__":
    main()
