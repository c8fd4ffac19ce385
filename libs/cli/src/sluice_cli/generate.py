"""``sluice generate``: stream one completion to the terminal."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from sluice.common.v1 import common_pb2
from sluice.generation.v1 import generation_pb2
from sluice_cli.arguments import UINT32_MAX, UINT64_MAX, whole_number
from sluice_client import GenerationClient, StreamError

PRIORITIES = {"interactive": generation_pb2.PRIORITY_INTERACTIVE, "batch": generation_pb2.PRIORITY_BATCH}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt")
    parser.add_argument("--target", default="127.0.0.1:8080", help="Envoy's edge listener (default %(default)s)")
    parser.add_argument(
        "--api-key", help="sent as x-api-key (default: the local stack's demo key, from STATE_DIR/demo-api-key)"
    )
    parser.add_argument(
        "--conversation",
        metavar="ID",
        help="continue a stored conversation; 'new' starts one and prints its id",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path(".sluice"),
        help="the local stack's, as given to `sluice up` (default %(default)s)",
    )
    parser.add_argument("--max-tokens", type=whole_number(0, UINT32_MAX), default=64)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=whole_number(0, UINT32_MAX))
    parser.add_argument("--seed", type=whole_number(0, UINT64_MAX))
    parser.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true", help="always generate max-tokens tokens")
    parser.add_argument("--priority", choices=sorted(PRIORITIES), default="interactive")
    parser.add_argument("--client-request-id", default="")
    parser.add_argument("--timeout", type=float, default=120.0, help="deadline in seconds (default %(default)s)")


def build_request(args: argparse.Namespace) -> generation_pb2.GenerateRequest:
    sampling = common_pb2.SamplingParams(max_tokens=args.max_tokens, stop=args.stop, ignore_eos=args.ignore_eos)
    for name in ("temperature", "top_p", "top_k", "seed"):
        value = getattr(args, name)
        if value is not None:
            setattr(sampling, name, value)
    return generation_pb2.GenerateRequest(
        prompt=args.prompt,
        sampling=sampling,
        priority=PRIORITIES[args.priority],
        client_request_id=args.client_request_id,
    )


def api_key(args: argparse.Namespace) -> str | None:
    """The key given (``--api-key ""`` sends none), else the local stack's demo key if there is one."""
    if args.api_key is not None:
        return str(args.api_key) or None
    saved = args.state_dir / "demo-api-key"
    return saved.read_text().strip() if saved.is_file() else None


async def run(args: argparse.Namespace) -> int:
    request = build_request(args)
    out, err = sys.stdout, sys.stderr
    start = time.perf_counter()
    first: float | None = None
    finished: generation_pb2.Finished | None = None
    key = api_key(args)
    async with GenerationClient(args.target, api_key=key) as client:
        try:
            if args.conversation == "new":
                request.conversation_id = await client.create_conversation(timeout=args.timeout)
                print(f"[conversation {request.conversation_id}]", file=err, flush=True)
            elif args.conversation:
                request.conversation_id = args.conversation
            stream = client.generate(request, timeout=args.timeout)
            async for event in stream:
                kind = event.WhichOneof("event")
                if kind == "queued":
                    print(f"[queued: position {event.queued.position}]", file=err, flush=True)
                elif kind == "delta":
                    first = first if first is not None else time.perf_counter()
                    out.write(event.delta.text)
                    out.flush()
                elif kind == "started" and event.started.history_messages_dropped:
                    dropped = event.started.history_messages_dropped
                    print(f"[{dropped} oldest messages left out to fit the model]", file=err, flush=True)
                elif kind == "finished":
                    finished = event.finished
        except StreamError as exc:
            hint = ""
            if exc.code.name == "UNAUTHENTICATED" and key is None and args.api_key is None:
                hint = f" (no --api-key given, and no demo key at {args.state_dir / 'demo-api-key'})"
            after_text = "\n" if first is not None else ""
            print(f"{after_text}error: {exc.code.name}: {exc.error.message}{hint} trace_id={exc.trace_id}", file=err)
            return 1
    elapsed = time.perf_counter() - start
    tokens = finished.usage.completion_tokens if finished is not None else 0
    ttft_ms = (first - start) * 1e3 if first is not None else 0.0
    reason = common_pb2.FinishReason.Name(finished.reason) if finished is not None else "NONE"
    finish = reason.removeprefix("FINISH_REASON_").lower()
    print(file=out, flush=True)
    print(
        f"ttft_ms={ttft_ms:.1f} tokens_per_s={tokens / elapsed:.1f} tokens={tokens} "
        f"finish={finish} trace_id={stream.trace_id}",
        file=err,
    )
    if finished is None or finished.reason == common_pb2.FINISH_REASON_ABORT:
        # The server stopped the generation (or the stream ended without saying how): the text is cut short.
        print(f"error: the generation was cut short (finish={finish}); retry it", file=err)
        return 1
    return 0
