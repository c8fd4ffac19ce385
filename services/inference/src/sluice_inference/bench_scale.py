"""``sluice bench scale``: how many concurrent streams the stack carries at GPU speed, and its CPU per token.

The whole stack (Envoy, queue replicas, rate limit, data access, trace sink)
runs with its inference replicas on the simulated GPU engine, which makes
tokens at an H100's pace for next to no CPU. A load generator in its own
process (``sluice_devstack.loadgen``) keeps N streams busy, N rising step by step,
until the stack stops delivering what the engines make. For each step, over
one measuring window:

- tokens/s the engines made (``vllm:generation_tokens``) and clients
  received, and their ratio;
- time to first token at the client minus the engine's own (from each
  request's ``inference.generate`` span), p50 and p99;
- the gap between a stream's consecutive token messages, p50, p99 and max;
- CPU seconds per process kind per million tokens delivered (inference
  servers without the simulated engine's own CPU), and messages per second
  at each hop.

The knee is the highest step where clients get at least 98% of what the
engines make with a message-gap p99 within the cadence bound (the chunk
interval plus one engine step). The anchor, in the same run: ``vllm serve``
on the tiny model (vLLM's CPU build) under the same client load, and its
API server process's CPU per million tokens it streams.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from sluice_cli.spans import Span
from sluice_devstack.benchmarks import percentile, unlimited_edge
from sluice_devstack.chart import Series, line_chart
from sluice_devstack.envoy_config import repo_root
from sluice_devstack.processes import Process
from sluice_devstack.stack import (
    LOOPBACK,
    LocalStack,
    StackOptions,
    StackPorts,
    cpu_engine_env,
    free_ports,
    process_kind,
)
from sluice_inference import tiny_model
from sluice_inference.settings import DEFAULT_TINY_MODEL_DIR, TINY_MODEL_NAME, InferenceSettings
from sluice_inference.simulated.timing import preset

HELP = "concurrent streams the stack carries at GPU speed (simulated engines)"

KNEE_DELIVERED_RATIO = 0.98
_SIMULATED_ENGINE_CPU = "sluice_inference_simulated_engine_cpu_seconds_total"
_SLUICE = "sluice (all but the load generator)"
_PLAINTEXT = "this checkout without TLS"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--streams", default="16,32,64,128,256,512", help="concurrencies, in order (%(default)s)")
    parser.add_argument("--replicas", type=int, default=2, help="simulated inference replicas (%(default)s)")
    parser.add_argument("--queues", type=int, default=2, help="queue replicas (%(default)s)")
    parser.add_argument("--gpu", default="h100-llama3-8b", help="the simulated engine's preset (%(default)s)")
    parser.add_argument(
        "--engine",
        choices=("simulated", "vllm"),
        default="simulated",
        help="the replicas' engine: the simulated GPU (default), or vLLM's CPU build with the tiny model, to set "
        "the stack's tokens/s against vllm serve's on the same machine",
    )
    parser.add_argument("--prompt-words", type=int, default=48, help="prompt length in words (%(default)s)")
    parser.add_argument("--output-tokens", type=int, default=256, help="tokens per response (%(default)s)")
    parser.add_argument("--warmup-s", type=float, default=4.0, help="before each window (%(default)s)")
    parser.add_argument("--measure-s", type=float, default=8.0, help="each window (%(default)s)")
    parser.add_argument("--all-steps", action="store_true", help="go on past the first step beyond the knee")
    parser.add_argument(
        "--anchor-streams", default="16", help="concurrencies for vllm serve, the anchor ('' skips it; %(default)s)"
    )
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="also run the stack of this git revision (its services and Envoy template), taking turns with this "
        "checkout's, for an A/B in one run",
    )
    parser.add_argument(
        "--without-tls",
        action="store_true",
        help="also run this checkout's stack without mutual TLS on its internal network, taking turns, for its cost",
    )
    parser.add_argument("--rounds", type=int, default=1, help="runs of each stack, taking turns (%(default)s)")
    parser.add_argument("--chart", type=Path, default=Path("bench-scale.svg"), help="where the chart goes")
    parser.add_argument("--state-dir", type=Path, help="logs and traces (default: a temporary folder)")


@dataclass(frozen=True)
class Step:
    streams: int
    produced_tokens_per_s: float
    delivered_tokens_per_s: float
    delivered_ratio: float
    ttft_added_p50_ms: float | None
    ttft_added_p99_ms: float | None
    gap_p50_ms: float | None
    gap_p99_ms: float | None
    gap_max_ms: float | None
    engine_step_ms: float
    cadence_bound_ms: float
    cpu_s_per_million_tokens: dict[str, float]
    engine_cpu_s_per_million_tokens: float
    # Cores busy with the stack, its engines and the load generator, of the machine's: near all of
    # them, the machine sets the pace, not sluice.
    busy_cores: float
    machine_cores: int
    wake_lateness_p99_ms: float | None
    messages_per_s: dict[str, float]
    errors: dict[str, int]

    @property
    def keeps_up(self) -> bool:
        return self.delivered_ratio >= KNEE_DELIVERED_RATIO and (self.gap_p99_ms or 0.0) <= self.cadence_bound_ms


@dataclass(frozen=True)
class Anchor:
    streams: int
    tokens_per_s: float
    api_server_cpu_s_per_million_tokens: float
    gap_p99_ms: float | None
    errors: dict[str, int]


class LoadGenerator:
    """One run of ``sluice_devstack.loadgen`` in its own process."""

    def __init__(self, argv: list[str]) -> None:
        self._argv = argv
        self.window: tuple[float, float] = (0.0, 0.0)
        self._process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self._process = await asyncio.create_subprocess_exec(
            # Its result is one line with every request's time to first token: megabytes at high rates.
            sys.executable,
            "-m",
            "sluice_devstack.loadgen",
            *self._argv,
            stdout=asyncio.subprocess.PIPE,
            limit=1 << 28,
        )
        assert self._process.stdout is not None
        start, end = json.loads(await self._process.stdout.readline())["window"]
        self.window = (start, end)

    async def result(self) -> dict[str, Any]:
        assert self._process is not None and self._process.stdout is not None
        line = await self._process.stdout.readline()
        await self._process.wait()
        if not line:
            raise RuntimeError(f"the load generator failed (exit code {self._process.returncode})")
        result: dict[str, Any] = json.loads(line)
        return result


async def until(moment: float) -> None:
    await asyncio.sleep(max(0.0, moment - time.monotonic()))


async def wake_lateness(end: float, period_s: float = 0.01) -> list[float]:
    """How late this (otherwise idle) process wakes from a short sleep until ``end``: the machine's
    scheduling delay at this load, which every hop of a message pays once."""
    late = []
    while (now := time.monotonic()) < end:
        await asyncio.sleep(period_s)
        late.append(time.monotonic() - now - period_s)
    return late


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def metric(text: str, name: str) -> float:
    """The sum of a metric's samples over its labels."""
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


@dataclass
class Snapshot:
    cpu: dict[str, float]  # per process kind, the simulated engines' own CPU left out
    engine_cpu: float
    produced: float
    engine_steps: float
    messages: dict[str, float]

    @classmethod
    def take(cls, stack: LocalStack) -> Snapshot:
        cpu: dict[str, float] = {}
        for name in stack.process_names():
            cpu[process_kind(name)] = cpu.get(process_kind(name), 0.0) + cpu_seconds(stack.process(name).pid)
        replicas = [scrape(port) for port in stack.ports.inference_metrics]
        queues = [scrape(port) for port in stack.ports.queue_metrics]
        engine_cpu = sum(metric(text, _SIMULATED_ENGINE_CPU) for text in replicas)
        cpu["inference"] -= engine_cpu
        # vLLM's engine core runs in a child process of its replica: the model's CPU, not the path's.
        engine_cpu += sum(
            cpu_seconds(child.pid)
            for name in stack.process_names()
            if process_kind(name) == "inference"
            for child in psutil.Process(stack.process(name).pid).children(recursive=True)
        )
        return cls(
            cpu=cpu,
            engine_cpu=engine_cpu,
            produced=sum(metric(text, "vllm:generation_tokens_total") for text in replicas),
            engine_steps=sum(metric(text, "sluice_inference_simulated_engine_steps_total") for text in replicas),
            messages={
                "inference->queue": sum(metric(t, "sluice_inference_stream_messages_total") for t in replicas),
                "queue->client": sum(metric(t, "sluice_queue_stream_messages_total") for t in queues),
            },
        )


class SpanIndex:
    """The engine's own time to first token of each traced request, read from the sink's file as it grows."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._offset = 0
        self.engine_ttft_s: dict[str, float] = {}

    def read(self) -> None:
        if not self._path.is_file():
            return
        with self._path.open("rb") as spans:
            spans.seek(self._offset)
            for line in spans:
                if not line.endswith(b"\n"):
                    break  # written to as we read: the rest next time
                self._offset += len(line)
                if b'"inference.generate"' not in line:
                    continue
                span = Span.from_json(line.decode())
                ttft = span.attributes.get("sluice.engine.time_to_first_token")
                if isinstance(ttft, int | float):
                    self.engine_ttft_s[span.trace_id] = float(ttft)


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 2)


async def measure(stack: LocalStack, spans: SpanIndex, streams: int, args: argparse.Namespace) -> Step:
    load = LoadGenerator(
        ["--api", "sluice", "--target", stack.edge, "--api-key", stack.demo_api_key, *common_load(args, streams)]
    )
    await load.start()
    start, end = load.window
    await until(start)
    before = Snapshot.take(stack)
    lateness = await wake_lateness(end)
    after = Snapshot.take(stack)
    received = await load.result()
    seconds = end - start
    delivered = received["tokens"]
    produced = after.produced - before.produced
    cpu = {name: after.cpu[name] - before.cpu[name] for name in after.cpu}
    cpu[_SLUICE] = sum(cpu.values())
    cpu["load generator"] = received["cpu_s"] or 0.0
    # Spans reach the sink within a second or two of their request's end.
    await asyncio.sleep(2.5)
    spans.read()
    added = [
        ttft - spans.engine_ttft_s[trace] for trace, ttft in received["first_tokens"] if trace in spans.engine_ttft_s
    ]
    steps_per_replica = (after.engine_steps - before.engine_steps) / len(stack.ports.inference)
    step_ms = seconds / steps_per_replica * 1e3 if steps_per_replica else 0.0
    gaps = received["gaps_s"]
    return Step(
        streams=streams,
        produced_tokens_per_s=round(produced / seconds, 1),
        delivered_tokens_per_s=round(delivered / seconds, 1),
        delivered_ratio=round(delivered / produced, 4) if produced else 0.0,
        ttft_added_p50_ms=ms(percentile(added, 0.5) if added else None),
        ttft_added_p99_ms=ms(percentile(added, 0.99) if added else None),
        gap_p50_ms=ms(gaps["p50"]),
        gap_p99_ms=ms(gaps["p99"]),
        gap_max_ms=ms(gaps["max"]),
        engine_step_ms=round(step_ms, 2),
        cadence_bound_ms=round(InferenceSettings().max_chunk_interval_ms + step_ms, 2),
        cpu_s_per_million_tokens={name: round(s / delivered * 1e6, 1) if delivered else 0.0 for name, s in cpu.items()},
        engine_cpu_s_per_million_tokens=round((after.engine_cpu - before.engine_cpu) / produced * 1e6, 1)
        if produced
        else 0.0,
        busy_cores=round((sum(cpu.values()) - cpu[_SLUICE] + after.engine_cpu - before.engine_cpu) / seconds, 2),
        machine_cores=len(os.sched_getaffinity(0)),
        wake_lateness_p99_ms=ms(percentile(lateness, 0.99) if lateness else None),
        messages_per_s={
            **{hop: round((after.messages[hop] - before.messages[hop]) / seconds) for hop in after.messages},
            "client received": round(received["messages"] / seconds),
        },
        errors=received["errors"],
    )


def common_load(args: argparse.Namespace, streams: int) -> list[str]:
    return [
        "--concurrency", str(streams),
        "--prompt-words", str(args.prompt_words),
        "--output-tokens", str(args.output_tokens),
        "--warmup-s", str(args.warmup_s),
        "--measure-s", str(args.measure_s),
    ]  # fmt: skip


async def scale(args: argparse.Namespace, state_dir: Path, code_root: Path | None, tls: bool = True) -> list[Step]:
    concurrencies = [int(n) for n in args.streams.split(",")]
    slots = max(concurrencies)  # per replica: the engine, not the queue, decides how many run at once
    inference_env = {"SLUICE_INFERENCE_MAX_NUM_SEQS": str(slots)}
    if args.engine == "simulated":
        inference_env["SLUICE_INFERENCE_SIMULATED_GPU"] = args.gpu
    options = StackOptions(
        state_dir=state_dir,
        ports=StackPorts.free(replicas=args.replicas, queues=args.queues),
        log_level="WARNING",
        ratelimit_config=unlimited_edge(state_dir),
        engine=args.engine,
        inference_env=inference_env,
        queue_env={"SLUICE_QUEUE_MAX_WAITING_PER_TENANT": str(2 * slots)},
        code_root=code_root,
        tls=tls,
        traces_max_mb=0,  # read as it grows (SpanIndex)
    )
    stack = LocalStack(options)
    steps: list[Step] = []
    try:
        await stack.start()
        spans = SpanIndex(stack.traces_path)
        for streams in concurrencies:
            print(f"  {streams} streams ...", file=sys.stderr, flush=True)
            step = await measure(stack, spans, streams, args)
            steps.append(step)
            print(f"    {summary(step)}", file=sys.stderr, flush=True)
            if not step.keeps_up and not args.all_steps:
                break
    finally:
        await stack.stop()
    return steps


def summary(step: Step) -> str:
    total = step.cpu_s_per_million_tokens[_SLUICE]
    return (
        f"produced {step.produced_tokens_per_s:,.0f} tokens/s, delivered {step.delivered_ratio:.1%}; "
        f"TTFT added p50 {step.ttft_added_p50_ms} ms p99 {step.ttft_added_p99_ms} ms; "
        f"message gap p50 {step.gap_p50_ms} p99 {step.gap_p99_ms} max {step.gap_max_ms} ms "
        f"(bound {step.cadence_bound_ms} ms); sluice CPU {total:.1f} s per million tokens; "
        f"{step.busy_cores} of {step.machine_cores} cores busy; an idle process woke {step.wake_lateness_p99_ms} ms "
        "late (p99)"
    )


def vllm_serve(model_dir: Path, port: int, max_num_seqs: int, log: Path) -> Process:
    """``vllm serve`` (vLLM's own OpenAI server) with the engine settings and layout of sluice's replicas,
    its model on every core of the machine, as the tiny model's name.

    vLLM's own CPU layout pins its model worker to one core, where it busy-waits;
    started in a session of its own (a scheduling group of its own under Linux's
    autogroup), as a ``Process`` is, that server held whole streams back for
    0.3 to 5 s.
    """
    settings = InferenceSettings()
    argv = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--served-model-name", TINY_MODEL_NAME,
        "--host", LOOPBACK, "--port", str(port),
        "--dtype", settings.dtype, "--max-model-len", str(settings.max_model_len),
        "--max-num-seqs", str(max_num_seqs), "--seed", str(settings.seed),
        "--uvicorn-log-level", "warning", "--disable-uvicorn-access-log",
    ]  # fmt: skip
    # vLLM's CPU build reserves most of the RAM for its KV cache unless told (GiB).
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", **cpu_engine_env(len(os.sched_getaffinity(0)))}
    return Process("vllm-serve", argv, env, log)


async def anchor(args: argparse.Namespace, state_dir: Path, concurrencies: list[int]) -> list[Anchor]:
    """``vllm serve`` on the tiny model with the same client load."""
    model_dir = await asyncio.to_thread(tiny_model.ensure, DEFAULT_TINY_MODEL_DIR)
    port = free_ports(1)[0]
    server = vllm_serve(model_dir, port, max(concurrencies), state_dir / "vllm-serve.log")
    results = []
    try:
        await wait_healthy(server, port)
        for streams in concurrencies:
            print(f"  vllm serve, {streams} streams ...", file=sys.stderr, flush=True)
            load = LoadGenerator(
                ["--api", "openai", "--target", f"{LOOPBACK}:{port}", "--model", TINY_MODEL_NAME,
                 *common_load(args, streams)]
            )  # fmt: skip
            await load.start()
            start, end = load.window
            await until(start)
            before = cpu_seconds(server.pid)  # the API server process alone, not its engine-core child
            await until(end)
            used = cpu_seconds(server.pid) - before
            received = await load.result()
            tokens = received["tokens"]
            results.append(
                Anchor(
                    streams=streams,
                    tokens_per_s=round(tokens / (end - start), 1),
                    api_server_cpu_s_per_million_tokens=round(used / tokens * 1e6, 1) if tokens else 0.0,
                    gap_p99_ms=ms(received["gaps_s"]["p99"]),
                    errors=received["errors"],
                )
            )
            print(f"    {results[-1]}", file=sys.stderr, flush=True)
    finally:
        await server.stop(10.0)
    return results


async def wait_healthy(server: Process, port: int, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if server.returncode is not None:
            raise RuntimeError(f"vllm serve exited; the end of {server.log_path}:\n{server.log_tail()}")
        try:
            await asyncio.to_thread(urllib.request.urlopen, f"http://{LOOPBACK}:{port}/health", timeout=2)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"vllm serve was not healthy within {timeout_s:.0f}s") from None
            await asyncio.sleep(1.0)


def knee(steps: list[Step]) -> int | None:
    kept = [s.streams for s in steps if s.keeps_up]
    return max(kept) if kept else None


def baseline_tree(revision: str, into: Path) -> Path:
    """The source tree of a git revision of this checkout, unpacked."""
    archive = subprocess.run(
        ["git", "-C", str(repo_root()), "archive", "--format=tar", revision], check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


async def run(args: argparse.Namespace) -> int:
    anchor_streams = [int(n) for n in args.anchor_streams.split(",") if n]
    with tempfile.TemporaryDirectory(prefix="sluice-bench-scale-") as tmp:
        state_dir = args.state_dir or Path(tmp)
        print(f"whole stack: {describe(args)}; load generator in its own process ...", file=sys.stderr, flush=True)
        # Each stack's code (None: this checkout's) and whether its internal network is mutual TLS.
        stacks: dict[str, tuple[Path | None, bool]] = {"this checkout": (None, True)}
        if args.without_tls:
            stacks = {_PLAINTEXT: (None, False), **stacks}
        if args.baseline:
            tree = baseline_tree(args.baseline, Path(tmp) / "baseline")
            # A revision from before mutual TLS runs without it.
            stacks = {args.baseline: (tree, (tree / "libs/core/src/sluice_core/tls.py").is_file()), **stacks}
        runs: dict[str, list[list[Step]]] = {name: [] for name in stacks}
        anchors: list[list[Anchor]] = []
        for round_ in range(args.rounds):
            # Taking turns, the first one first in odd rounds: the machine's speed drifts.
            order = [*stacks, *(["vllm serve"] if anchor_streams else [])]
            for name in order if round_ % 2 == 0 else reversed(order):
                print(f"{name}, round {round_ + 1}:", file=sys.stderr, flush=True)
                folder = state_dir / f"{round_ + 1}-{name.replace(' ', '-')}"
                if name == "vllm serve":
                    anchors.append(await anchor(args, folder, anchor_streams))
                else:
                    runs[name].append(await scale(args, folder, *stacks[name]))
    steps = runs["this checkout"][-1]
    write_chart(args.chart, steps, runs[args.baseline][-1] if args.baseline else None)
    result: dict[str, object] = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("chart", "state_dir")},
        "steps": [asdict(s) for s in steps],
        "knee_streams": knee(steps),
        "anchor_vllm_serve": [asdict(a) for a in anchors[-1]] if anchors else [],
        "chart": str(args.chart),
    }
    if args.without_tls:
        result["tls_cost"] = tls_cost(runs["this checkout"], runs[_PLAINTEXT])
    if args.baseline or args.without_tls or args.rounds > 1:
        result["runs"] = {
            name: [{"knee_streams": knee(r), "steps": [asdict(s) for s in r]} for r in variant]
            for name, variant in runs.items()
        }
        result["anchor_runs"] = [[asdict(a) for a in run_] for run_ in anchors]
    if anchors:
        result["against_vllm_serve"] = against_anchor(runs["this checkout"], anchors)
    print(json.dumps(result))
    return 0


def describe(args: argparse.Namespace) -> str:
    if args.engine == "vllm":
        return f"{args.replicas} replicas of vLLM's CPU engine (the tiny model), {args.queues} queue replicas"
    gpu = preset(InferenceSettings(simulated_gpu=args.gpu))
    return (
        f"{args.replicas} replicas of the simulated {args.gpu} engine ({gpu.base_s * 1e3:g} ms + "
        f"{gpu.per_sequence_s * 1e3:g} ms per sequence per step), {args.queues} queue replicas"
    )


def tls_cost(with_tls: list[list[Step]], without: list[list[Step]]) -> dict[str, dict[str, float]]:
    """At each concurrency, the medians over the rounds with and without mutual TLS, and their ratios."""
    compared: dict[str, dict[str, float]] = {}
    for streams in sorted({s.streams for run_ in with_tls for s in run_}):
        figures = {}
        for name, runs in (("tls", with_tls), ("plaintext", without)):
            found = [s for run_ in runs for s in run_ if s.streams == streams]
            if not found:
                break
            figures[f"{name}_cpu_s_per_million_tokens"] = statistics.median(
                s.cpu_s_per_million_tokens[_SLUICE] for s in found
            )
            figures[f"{name}_ttft_added_p50_ms"] = statistics.median(s.ttft_added_p50_ms or 0.0 for s in found)
            figures[f"{name}_gap_p99_ms"] = statistics.median(s.gap_p99_ms or 0.0 for s in found)
        else:
            plain_cpu = figures["plaintext_cpu_s_per_million_tokens"]
            figures["cpu_ratio"] = round(figures["tls_cpu_s_per_million_tokens"] / plain_cpu, 3) if plain_cpu else 0.0
            compared[str(streams)] = figures
    return compared


def against_anchor(runs: list[list[Step]], anchors: list[list[Anchor]]) -> dict[str, dict[str, float]]:
    """At each concurrency both measured, the medians over the rounds: CPU per token and tokens/s, and their ratios."""
    compared: dict[str, dict[str, float]] = {}
    for streams in sorted({a.streams for run_ in anchors for a in run_}):
        ours = [s for run_ in runs for s in run_ if s.streams == streams]
        theirs = [a for run_ in anchors for a in run_ if a.streams == streams]
        if not ours or not theirs:
            continue
        cpu = statistics.median(s.cpu_s_per_million_tokens[_SLUICE] for s in ours)
        reference = statistics.median(a.api_server_cpu_s_per_million_tokens for a in theirs)
        tokens = statistics.median(s.delivered_tokens_per_s for s in ours)
        served = statistics.median(a.tokens_per_s for a in theirs)
        compared[str(streams)] = {
            "sluice_path_cpu_s_per_million_tokens": cpu,
            "vllm_api_server_cpu_s_per_million_tokens": reference,
            "cpu_ratio": round(cpu / reference, 3) if reference else 0.0,
            "sluice_tokens_per_s": tokens,
            "vllm_serve_tokens_per_s": served,
            "tokens_per_s_ratio": round(tokens / served, 3) if served else 0.0,
        }
    return compared


def write_chart(path: Path, steps: list[Step], baseline: list[Step] | None) -> None:
    streams = [float(s.streams) for s in steps]
    path.write_text(
        line_chart(
            "sluice bench scale",
            x_label="concurrent streams",
            x=streams,
            left_label="tokens/s",
            left=[
                Series("produced by the engines", [s.produced_tokens_per_s for s in steps]),
                Series("received by clients", [s.delivered_tokens_per_s for s in steps]),
            ],
            right_label="message gap p99 (ms)",
            right=[
                Series("message gap p99", [s.gap_p99_ms or 0.0 for s in steps]),
                Series("cadence bound", [s.cadence_bound_ms for s in steps]),
                *([Series("baseline's gap p99", [s.gap_p99_ms or 0.0 for s in baseline])] if baseline else []),
            ],
        )
    )
