"""``sluice-openai``: OpenAI's HTTP API, served behind Envoy's edge listener."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl

from aiohttp import web
from prometheus_client import start_http_server

from sluice.generation.v1 import generation_pb2_grpc
from sluice_core.channels import channel
from sluice_core.service import freeze_heap, run
from sluice_core.tls import TlsFiles
from sluice_openai.app import Front
from sluice_openai.settings import OpenAISettings

logger = logging.getLogger(__name__)


def _server_tls(tls: TlsFiles) -> ssl.SSLContext:
    """Mutual TLS: only callers with a certificate from sluice's authority connect (the app checks which)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tls.ca))
    context.load_cert_chain(str(tls.cert), str(tls.key))
    context.verify_mode = ssl.CERT_REQUIRED
    return context


async def serve(settings: OpenAISettings) -> None:
    tls = settings.tls()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with contextlib.AsyncExitStack() as stack:
        queue = channel(settings.queue_target, tls)
        stack.push_async_callback(queue.close)
        stub: generation_pb2_grpc.GenerationAsyncStub = generation_pb2_grpc.GenerationStub(queue)
        front = Front(stub, settings)
        callers = None if tls is None else frozenset((*settings.tls_callers, tls.identity))
        # handler_cancellation: a client that goes away cancels its handler, and the generation with it.
        # Headers as long as Envoy's edge lets through (60 KiB), so that Envoy's limit is the one callers meet.
        runner = web.AppRunner(
            front.app(callers),
            handler_cancellation=True,
            shutdown_timeout=settings.shutdown_grace_s,
            access_log=None,
            max_line_size=64 * 1024,
            max_field_size=64 * 1024,
        )
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        if tls is None:
            logger.warning("serving %s:%d without TLS: whatever reaches this port can call it", settings.host,
                           settings.port)  # fmt: skip
        site = web.TCPSite(runner, settings.host, settings.port, ssl_context=None if tls is None else _server_tls(tls))
        await site.start()
        if settings.metrics_port is not None:
            start_http_server(settings.metrics_port, addr=settings.host)
        logger.info("listening on %s", site.name)
        freeze_heap()
        front.serving = True
        await stop.wait()
        # Envoy's health checks see 503 and send nothing new; then no new connections, and the
        # streams under way finish within the grace period (runner.cleanup).
        front.serving = False
        await asyncio.sleep(settings.drain_delay_s)
        logger.info("draining for up to %.1fs", settings.shutdown_grace_s)


def main() -> None:
    settings = OpenAISettings()
    run("openai", settings, lambda: serve(settings))


if __name__ == "__main__":
    main()
