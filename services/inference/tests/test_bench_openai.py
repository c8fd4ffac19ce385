"""``sluice bench openai``'s own parts: its options, vLLM's result file read, the table and the targets."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from sluice_inference import bench_openai
from sluice_inference.bench_openai import Figures, bench_serve_argv, errors, median, side_by_side, targets
from sluice_inference.settings import TINY_MODEL_NAME


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_openai.add_arguments(parser)
    return parser.parse_args(argv)


def vllm_result(**overrides: Any) -> dict[str, Any]:
    """What ``vllm bench serve --save-result`` (vLLM 0.32) wrote at 16 streams against vllm serve, in part."""
    return {
        "backend": "openai",
        "model_id": "sluice-tiny",
        "num_prompts": 64,
        "max_concurrency": 16,
        "duration": 3.54,
        "completed": 64,
        "failed": 0,
        "total_output_tokens": 8192,
        "request_throughput": 18.0989,
        "output_throughput": 2316.6585,
        "mean_ttft_ms": 73.6123,
        "median_ttft_ms": 76.3412,
        "p50_ttft_ms": 76.3412,
        "p99_ttft_ms": 95.3419,
        "p50_tpot_ms": 6.0812,
        "p99_tpot_ms": 8.0234,
        "p50_itl_ms": 5.7123,
        "p99_itl_ms": 14.6834,
        "p50_e2el_ms": 836.4412,
        "p99_e2el_ms": 1101.9534,
        **overrides,
    }


def figures(**overrides: float) -> Figures:
    return Figures.from_result(vllm_result(**overrides))


def test_defaults_measure_three_concurrencies_once() -> None:
    args = parse()
    assert bench_openai.concurrencies(args.concurrency) == [1, 16, 64]
    assert (args.input_len, args.output_len, args.rounds, args.num_prompts) == (80, 128, 1, None)
    assert args.state_dir == Path(".sluice/bench-openai")


@pytest.mark.parametrize("text", ["", "0,16", "1,-4"])
def test_concurrencies_must_be_positive(text: str) -> None:
    with pytest.raises(ValueError, match="positive"):
        bench_openai.concurrencies(text)


def test_prompts_per_concurrency_are_bounded_unless_given() -> None:
    assert [bench_openai.num_prompts(c, None) for c in (1, 8, 16, 64, 128)] == [64, 64, 128, 512, 512]
    assert bench_openai.num_prompts(64, 10) == 10


def test_the_command_line_asks_vllm_for_what_is_read() -> None:
    args = parse("--num-prompts", "20", "--seed", "7")
    argv = bench_serve_argv(args, "http://127.0.0.1:8080", Path("/models/tiny"), 16, Path("/state/c16.json"))

    def value(flag: str) -> str:
        return argv[argv.index(flag) + 1]

    assert {"--ignore-eos", "--save-result", "--save-detailed"} <= set(argv)
    assert (value("--backend"), value("--base-url"), value("--endpoint")) == (
        "openai",
        "http://127.0.0.1:8080",
        "/v1/completions",
    )
    assert (value("--model"), value("--tokenizer")) == (TINY_MODEL_NAME, "/models/tiny")
    assert (value("--random-input-len"), value("--random-output-len"), value("--seed")) == ("80", "128", "7")
    assert (value("--max-concurrency"), value("--num-prompts"), value("--num-warmups")) == ("16", "20", "16")
    assert (value("--percentile-metrics"), value("--metric-percentiles")) == ("ttft,tpot,itl,e2el", "50,99")
    assert (value("--result-dir"), value("--result-filename")) == ("/state", "c16.json")


def test_figures_are_read_from_vllms_result_file() -> None:
    f = figures()
    assert f.output_tokens_per_s == 2316.659
    assert (f.ttft_mean_ms, f.ttft_p50_ms, f.ttft_p99_ms) == (73.612, 76.341, 95.342)
    assert (f.tpot_p50_ms, f.itl_p99_ms, f.e2el_p50_ms) == (6.081, 14.683, 836.441)
    assert (f.completed, f.failed) == (64, 0)


def test_a_result_without_the_percentiles_asked_for_is_refused() -> None:
    result = vllm_result()
    del result["p99_itl_ms"]
    with pytest.raises(KeyError):
        Figures.from_result(result)


def test_failed_requests_are_grouped_by_the_last_line_of_their_error() -> None:
    refused = "Traceback (most recent call last):\n  ...\nValueError: Never received a valid chunk"
    result = vllm_result(errors=["", refused, refused, "Service Unavailable"])
    assert errors(result) == {"ValueError: Never received a valid chunk": 2, "Service Unavailable": 1}


def test_rounds_give_medians_and_total_counts() -> None:
    rounds = [figures(output_throughput=t, failed=n) for t, n in ((100.0, 0), (300.0, 2), (200.0, 1))]
    combined = median(rounds)
    assert combined.output_tokens_per_s == 200.0
    assert (combined.completed, combined.failed) == (192, 3)


def test_the_table_sets_sluice_against_vllm_serve() -> None:
    table = side_by_side(16, figures(), figures(output_throughput=1158.3293, p99_ttft_ms=190.6838))
    lines = table.splitlines()
    assert lines[0].split() == ["16", "streams", "vllm", "serve", "sluice", "ratio"]
    assert lines[1].split() == ["output", "tokens/s", "2,316.66", "1,158.33", "0.50"]
    assert lines[5].split() == ["TTFT", "p99", "(ms)", "95.34", "190.68", "2.00"]
    assert lines[-1].split() == ["failed", "requests", "0", "0", "-"]
    assert len(lines) == 1 + len(bench_openai.ROWS)


def test_targets_at_16_and_64_streams_and_at_one() -> None:
    vllm_serve = {1: figures(p50_ttft_ms=13.0), 16: figures(), 64: figures(), 4: figures()}
    sluice = {
        1: figures(p50_ttft_ms=22.9),
        16: figures(output_throughput=2400.0, p99_ttft_ms=95.3419),
        64: figures(output_throughput=2000.0, p99_ttft_ms=120.0),
        4: figures(output_throughput=1.0),
    }
    checked = {(t.concurrency, t.metric): t.met for t in targets(vllm_serve, sluice)}
    assert checked == {
        (1, "ttft_p50_ms"): True,
        (16, "output_tokens_per_s"): True,
        (16, "ttft_p99_ms"): True,
        (64, "output_tokens_per_s"): False,
        (64, "ttft_p99_ms"): False,
    }
    assert not targets({1: figures(p50_ttft_ms=13.0)}, {1: figures(p50_ttft_ms=23.1)})[0].met
