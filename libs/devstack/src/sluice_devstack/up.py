"""``sluice up``: run the local stack until Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import urllib.parse
from pathlib import Path

from sluice_devstack.stack import LocalStack, StackError, StackOptions

HELP = "run the local stack until Ctrl-C"

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", type=Path, default=Path(".sluice"), help="logs, traces, Envoy config")
    parser.add_argument(
        "--engine",
        choices=("vllm", "simulated"),
        help="the replicas' engine: vllm (default, or SLUICE_INFERENCE_ENGINE), or a simulated GPU for capacity "
        "planning and trying the stack without a model (made-up tokens; docs/simulated-engine.md)",
    )


def restarted(name: str, code: int, pause_s: float) -> None:
    print(
        f"{name} exited with code {code}; starting it again in {pause_s:.0f} s (its log: logs/{name}.log)", flush=True
    )


def shown(url: str) -> str:
    """A store's URL as it may be printed: without its password."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


async def run(args: argparse.Namespace) -> int:
    stack = LocalStack(StackOptions(state_dir=args.state_dir, engine=args.engine))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    replicas = (
        "two inference replicas (a minute to load the model)"
        if stack.engine == "vllm"
        else "two inference replicas on the simulated GPU engine (made-up tokens)"
    )
    print(f"starting sluice: Envoy, {replicas}, two queue replicas, an OpenAI front, ratelimit, datastore", flush=True)
    try:
        starting = asyncio.create_task(stack.start())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            return 130
        starting.result()
        demo_key = stack.demo_api_key
        ports = stack.ports
        inference_metrics = ", ".join(f":{p}" for p in ports.inference_metrics)
        queue_metrics = ", ".join(f":{p}" for p in ports.queue_metrics)
        print(
            f"sluice is ready.\n"
            f"  public API (gRPC, sluice.generation.v1.Generation): {stack.edge}\n"
            f"  OpenAI's API (HTTP): http://{stack.edge}/v1\n"
            f"  Envoy admin: http://127.0.0.1:{ports.admin}/clusters   traces: {stack.traces_path}\n"
            f"  metrics: queue {queue_metrics}, inference {inference_metrics}, "
            f"ratelimit :{ports.ratelimit_metrics}, datastore :{ports.datastore_metrics}, "
            f"openai {', '.join(f':{p}' for p in ports.openai_metrics)}\n"
            f"  state: Redis {shown(stack.redis_url)}, PostgreSQL {shown(stack.database_url)}\n"
            f"  logs: {args.state_dir / 'logs'}\n"
            f"  internal network: mutual TLS, certificates in {stack.tls_dir} (sluice admin uses admin.pem)\n"
            f"  demo tenant's API key: {demo_key} (also in {args.state_dir / 'demo-api-key'})\n"
            f'try:  .venv/bin/sluice generate "The river"   (with the demo key)\n'
            f"Ctrl-C stops everything.",
            flush=True,
        )
        supervising = asyncio.create_task(stack.supervise(restarted))
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({supervising, stopping}, return_when=asyncio.FIRST_COMPLETED)
        for task in (supervising, stopping):
            task.cancel()
        if supervising.done() and not supervising.cancelled():
            supervising.result()  # what stopped it (a process that could not be started again)
        return 0
    except StackError as exc:
        print(f"error: {exc}", flush=True)
        return 1
    finally:
        print("stopping ...", flush=True)
        await stack.stop()
        print("stopped.", flush=True)
