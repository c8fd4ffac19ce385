"""A closed-loop load generator in a process of its own, for ``sluice bench scale``.

``concurrency`` workers each send a request, read its stream to the end and
send the next, through sluice's public gRPC API (the client library) or an
OpenAI-compatible HTTP server (``vllm serve``), until the measuring window
ends; then whatever is in flight is cancelled. Only what arrives inside the
window counts, so that the driver can compare it with what the servers did
in the same window: the window's bounds are ``CLOCK_MONOTONIC`` times, the
same clock in every process of the machine.

It prints its window's start when ready, then one JSON object: tokens and
messages received, the gaps between a stream's consecutive token messages,
each request's time to first token and trace id, and its own CPU time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp

from sluice.common.v1 import common_pb2
from sluice.generation.v1 import generation_pb2
from sluice_client import GenerationClient, GenerationStream, StreamError
from sluice_devstack.benchmarks import percentile

_WORDS = (
    "the keeper walks the length of the channel every evening listening to the water and writing the level "
    "of the river in a small book while the wheel turns at an even pace and the banks hold"
).split()


def prompt(i: int, words: int) -> str:
    """Distinct prompts of the same length, so that no prefix cache favours either side."""
    return " ".join([f"request{i}", *(_WORDS[(i + k) % len(_WORDS)] for k in range(words - 1))])


@dataclass
class Window:
    start: float
    end: float
    tokens: int = 0
    messages: int = 0
    gaps: list[float] = field(default_factory=list)
    # (trace id, seconds to first token) of requests whose first token came in the window.
    first_tokens: list[tuple[str, float]] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)

    def message(self, now: float, tokens: int, previous: float | None) -> None:
        if self.start <= now <= self.end:
            self.tokens += tokens
            self.messages += 1
            if previous is not None and previous >= self.start:
                self.gaps.append(now - previous)

    async def timed(self, chunks: AsyncIterator[int], trace_id: str) -> None:
        """Read one stream of token counts (0 for messages without tokens)."""
        sent = time.monotonic()
        previous: float | None = None
        async for tokens in chunks:
            if not tokens:
                continue
            now = time.monotonic()
            if previous is None and self.start <= now <= self.end:
                self.first_tokens.append((trace_id, now - sent))
            self.message(now, tokens, previous)
            previous = now


async def sluice_worker(client: GenerationClient, args: argparse.Namespace, window: Window, worker: int) -> None:
    sampling = common_pb2.SamplingParams(max_tokens=args.output_tokens, ignore_eos=True)
    for i in range(worker, sys.maxsize, args.concurrency):
        stream = client.generate(generation_pb2.GenerateRequest(prompt=prompt(i, args.prompt_words), sampling=sampling))
        try:
            await window.timed(_sluice_chunks(stream), stream.trace_id)
        except StreamError as exc:
            window.errors[exc.code.name] += 1


async def _sluice_chunks(stream: GenerationStream) -> AsyncIterator[int]:
    async for event in stream:
        yield len(event.delta.token_ids) if event.HasField("delta") else 0


async def openai_worker(session: aiohttp.ClientSession, args: argparse.Namespace, window: Window, worker: int) -> None:
    for i in range(worker, sys.maxsize, args.concurrency):
        body = {
            "model": args.model,
            "prompt": prompt(i, args.prompt_words),
            "max_tokens": args.output_tokens,
            "ignore_eos": True,
            "stream": True,
            # Token counts with each chunk: a chunk of text may hold several tokens.
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        }
        await window.timed(_openai_chunks(session, f"http://{args.target}/v1/completions", body, window), "")


async def _openai_chunks(
    session: aiohttp.ClientSession, url: str, body: dict[str, object], window: Window
) -> AsyncIterator[int]:
    async with session.post(url, json=body) as response:
        if response.status != 200:
            window.errors[f"HTTP {response.status}"] += 1
            return
        counted = 0
        async for line in response.content:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if not chunk.get("choices"):
                continue  # the usage-only last chunk
            total = chunk["usage"]["completion_tokens"]
            yield total - counted
            counted = total


async def run(args: argparse.Namespace) -> None:
    start = time.monotonic() + args.warmup_s
    window = Window(start, start + args.measure_s)
    print(json.dumps({"window": [window.start, window.end]}), flush=True)
    cpu: list[float] = []
    loop = asyncio.get_running_loop()
    loop.call_at(window.start, lambda: cpu.append(time.process_time()))
    loop.call_at(window.end, lambda: cpu.append(time.process_time()))
    async with contextlib.AsyncExitStack() as stack:
        if args.api == "sluice":
            client = await stack.enter_async_context(GenerationClient(args.target, api_key=args.api_key))
            workers = [sluice_worker(client, args, window, w) for w in range(args.concurrency)]
        else:
            connector = aiohttp.TCPConnector(limit=0)
            session = await stack.enter_async_context(aiohttp.ClientSession(connector=connector))
            workers = [openai_worker(session, args, window, w) for w in range(args.concurrency)]
        tasks = [asyncio.create_task(w) for w in workers]
        await asyncio.sleep(window.end - time.monotonic())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    gaps = window.gaps
    print(
        json.dumps(
            {
                "tokens": window.tokens,
                "messages": window.messages,
                "gaps_s": {**{k: percentile(gaps, q) if gaps else None for k, q in _GAPS}, "count": len(gaps)},
                "first_tokens": window.first_tokens,
                "cpu_s": cpu[1] - cpu[0] if len(cpu) == 2 else None,
                "errors": dict(window.errors),
            }
        ),
        flush=True,
    )


_GAPS = (("p50", 0.5), ("p99", 0.99), ("max", 1.0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--api", choices=("sluice", "openai"), required=True)
    parser.add_argument("--target", required=True, help="host:port")
    parser.add_argument("--api-key", help="sluice's API key")
    parser.add_argument("--model", default="", help="the OpenAI API's model name")
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--prompt-words", type=int, default=48)
    parser.add_argument("--output-tokens", type=int, default=256)
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--measure-s", type=float, default=8.0)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
