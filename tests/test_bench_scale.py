"""``sluice bench scale`` runs from a checkout and reports the figures its docs promise."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def test_a_short_capacity_run_reports_delivery_gaps_and_cpu_per_token(tmp_path: Path) -> None:
    chart = tmp_path / "scale.svg"
    command = [
        sys.executable, "-m", "sluice_cli", "bench", "scale", "--streams", "4,8", "--all-steps",
        "--warmup-s", "1", "--measure-s", "2", "--anchor-streams", "", "--chart", str(chart),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    steps = result["steps"]
    assert [s["streams"] for s in steps] == [4, 8]
    for step in steps:
        assert step["errors"] == {}
        assert step["produced_tokens_per_s"] > 0
        # Clients get what the engines make, give or take the tokens in flight at the window's edges.
        assert 0.9 < step["delivered_ratio"] < 1.1
        assert step["gap_p50_ms"] is not None and step["gap_p50_ms"] <= step["cadence_bound_ms"]
        assert step["ttft_added_p50_ms"] is not None, "each request's engine time was found in its trace"
        cpu = step["cpu_s_per_million_tokens"]
        assert {"envoy", "queue", "inference", "ratelimit", "datastore", "trace-sink", "load generator"} <= set(cpu)
        assert step["messages_per_s"]["inference->queue"] > 0
    assert chart.read_text().startswith("<svg")
