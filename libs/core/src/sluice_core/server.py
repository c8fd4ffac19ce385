"""Server lifecycle shared by every service.

``GrpcServer`` binds a ``grpc.aio`` server with the shared interceptor, the
standard health service (every name NOT_SERVING until the service says it is
ready), reflection and a Prometheus endpoint, and shuts down in order on
SIGTERM or SIGINT: health NOT_SERVING, so Envoy stops sending new calls; stop
accepting; let in-flight calls finish within the grace period; then the
service closes its own clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc
from google.protobuf import descriptor, descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from prometheus_client import start_http_server

from sluice_core.interceptors import ServerInterceptor
from sluice_core.settings import ServiceSettings

logger = logging.getLogger(__name__)

T = TypeVar("T")

REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"

# Long token streams: keep idle connections alive through Envoy and NATs, and
# let clients ping without being told off for it.
SERVER_OPTIONS: Sequence[tuple[str, Any]] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
)


class GrpcServer:
    """One service process's gRPC server, used as ``async with GrpcServer(...) as server``."""

    def __init__(self, settings: ServiceSettings, health_names: Sequence[str], *, handle_signals: bool = True) -> None:
        self._settings = settings
        self._handle_signals = handle_signals
        self._health_names = tuple(health_names)
        self._tls = settings.tls()
        callers = None if self._tls is None else frozenset((*settings.tls_callers, self._tls.identity))
        self._server = grpc.aio.server(interceptors=[ServerInterceptor(callers)], options=SERVER_OPTIONS)
        self._health = health.aio.HealthServicer()
        self._stop = asyncio.Event()
        self._stopped = False
        self._service_names: list[str] = [health.SERVICE_NAME, reflection.SERVICE_NAME]
        self.port = 0

    def add(self, add_to_server: Callable[[T, grpc.aio.Server], None], servicer: T, service_name: str) -> None:
        """Register a servicer (the generated ``add_XServicer_to_server``), before ``start``."""
        add_to_server(servicer, self._server)
        self._service_names.append(service_name)

    async def start(self) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflecting = reflection.aio.ReflectionServicer(self._service_names, pool=_pool_of(self._service_names))
        info = grpc.stream_stream_rpc_method_handler(
            reflecting.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        )
        # Served as grpc.reflection.v1 too, which current clients (grpcurl) ask for first: grpcio-reflection
        # implements only v1alpha, whose messages are the same on the wire.
        self._server.add_generic_rpc_handlers(
            tuple(
                grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": info})
                for name in (reflection.SERVICE_NAME, REFLECTION_V1)
            )
        )
        for name in self._health_names:
            await self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        # The empty name is the server as a whole: it is up as soon as it answers.
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        address = f"{self._settings.host}:{self._settings.port}"
        if self._tls is None:
            logger.warning("serving %s without TLS: whatever reaches this port can call it", address)
            self.port = self._server.add_insecure_port(address)
        else:
            self.port = self._server.add_secure_port(address, self._tls.server_credentials())
        if self.port == 0:
            raise OSError(f"cannot bind {self._settings.host}:{self._settings.port}")
        await self._server.start()
        if self._settings.metrics_port is not None:
            start_http_server(self._settings.metrics_port, addr=self._settings.host)
        if self._handle_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
        logger.info("listening on %s:%d", self._settings.host, self.port)

    async def set_serving(self, serving: bool) -> None:
        """Report this service ready (SERVING) or not (NOT_SERVING) to health checkers."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self._health_names:
            await self._health.set(name, status)

    def request_stop(self) -> None:
        """Begin shutdown; what SIGTERM and SIGINT do."""
        self._stop.set()

    async def until_stop(self, work: Awaitable[object]) -> bool:
        """Run ``work`` unless a stop is requested first (then cancel it); True if it completed."""
        task = asyncio.ensure_future(work)
        stop = asyncio.create_task(self._stop.wait())
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if task.done():
            task.result()
            return True
        task.cancel()
        return False

    async def wait_for_stop(self) -> None:
        await self._stop.wait()

    async def stop(self) -> None:
        """NOT_SERVING, stop accepting, drain within the grace period. Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        await self._health.enter_graceful_shutdown()
        # Keep accepting until health checkers have seen NOT_SERVING, so that
        # no call is routed here after the listener closes.
        await asyncio.sleep(self._settings.drain_delay_s)
        logger.info("draining for up to %.1fs", self._settings.shutdown_grace_s)
        await self._server.stop(self._settings.shutdown_grace_s)
        logger.info("stopped")

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


def _pool_of(service_names: Sequence[str]) -> descriptor_pool.DescriptorPool:
    """The files of these services and what they import, alone: reflection on the default pool
    described every API the process had imported (the edge answered for the data-access service's)."""
    default, pool, added = descriptor_pool.Default(), descriptor_pool.DescriptorPool(), set[str]()

    def add(file: descriptor.FileDescriptor) -> None:
        if file.name not in added:
            added.add(file.name)
            for imported in file.dependencies:
                add(imported)
            proto = descriptor_pb2.FileDescriptorProto()
            file.CopyToProto(proto)
            pool.Add(proto)

    for name in service_names:
        with contextlib.suppress(KeyError):  # a name that is no service's (a health name alone)
            add(default.FindServiceByName(name).file)
    return pool
