"""What the benchmarks share: prompts, an unlimited edge for their own load, one way to take a percentile."""

from __future__ import annotations

from pathlib import Path

_PROMPT_WORDS = (
    "the keeper walks the length of the channel every evening listening to the water and writing the level "
    "of the river in a small book while the wheel turns at an even pace and the banks hold"
).split()


_UNLIMITED_EDGE = """
domain: sluice-edge
descriptors:
  - key: api_key
    descriptors:
      - key: method
        rate_limit: {unlimited: true}
"""


def unlimited_edge(state_dir: Path) -> tuple[Path, ...]:
    """Rate-limit config for a benchmark's stack: the edge's per-key limits would refuse its own load."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "ratelimit.yaml"
    path.write_text(_UNLIMITED_EDGE)
    return (path,)


def prompt(i: int, words: int) -> str:
    """Distinct prompts of the same length, so that the prefix cache does not favour either side."""
    body = [_PROMPT_WORDS[(i + k) % len(_PROMPT_WORDS)] for k in range(words - 1)]
    return " ".join([f"request{i}", *body])


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank ``q`` quantile (0.99 for p99) of ``values``, which must not be empty."""
    if not values:
        raise ValueError("no values to take a percentile of")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]
