"""``python -m sluice_core.healthcheck HOST:PORT [SERVICE]``: exit 0 if the service reports SERVING.

For container health checks (compose, Kubernetes exec probes): it asks the
standard ``grpc.health.v1`` service, as Envoy does.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


async def check(target: str, service: str, timeout_s: float) -> bool:
    async with grpc.aio.insecure_channel(target) as channel:
        try:
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.aio.AioRpcError:
            return False
    return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("target")
    parser.add_argument("service", nargs="?", default="")
    parser.add_argument("--timeout", type=float, default=2.0)
    args = parser.parse_args()
    sys.exit(0 if asyncio.run(check(args.target, args.service, args.timeout)) else 1)


if __name__ == "__main__":
    main()
