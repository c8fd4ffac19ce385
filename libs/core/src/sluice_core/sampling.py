"""Sampling parameters, checked the same way by every API that takes them."""

from __future__ import annotations

import math
from dataclasses import dataclass

from sluice.common.v1 import common_pb2
from sluice_core.errors import FieldViolation

MAX_STOP_STRINGS = 16
# vLLM holds back as many characters as the longest stop string (less one)
# until it knows they do not begin a stop: a very long one holds back the whole text.
MAX_STOP_CHARS = 256
# vLLM refuses more (and by then the request has waited for its slot).
MAX_TEMPERATURE = 2.0
# A signed 64-bit integer, as vLLM's and OpenAI's APIs take it.
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0


def validate_sampling(params: common_pb2.SamplingParams, out: list[FieldViolation]) -> Sampling:
    """Read sampling parameters, appending a violation to ``out`` for each bad field."""

    def check(field: str, ok: bool, description: str) -> None:
        if not ok:
            out.append(FieldViolation(f"sampling.{field}", description))

    check("max_tokens", params.max_tokens > 0, "must be at least 1")
    sampling = Sampling(
        max_tokens=params.max_tokens,
        temperature=params.temperature if params.HasField("temperature") else 1.0,
        top_p=params.top_p if params.HasField("top_p") else 1.0,
        top_k=params.top_k,
        min_p=params.min_p if params.HasField("min_p") else 0.0,
        presence_penalty=params.presence_penalty if params.HasField("presence_penalty") else 0.0,
        frequency_penalty=params.frequency_penalty if params.HasField("frequency_penalty") else 0.0,
        repetition_penalty=params.repetition_penalty if params.HasField("repetition_penalty") else 1.0,
        seed=params.seed if params.HasField("seed") else None,
        stop=tuple(params.stop),
        ignore_eos=params.ignore_eos,
        min_tokens=params.min_tokens,
    )
    check(
        "temperature",
        0 <= sampling.temperature <= MAX_TEMPERATURE,
        f"must be in [0, {MAX_TEMPERATURE:g}] (0 is greedy)",
    )
    check("top_p", 0 < sampling.top_p <= 1, "must be in (0, 1]")
    check("min_p", 0 <= sampling.min_p <= 1, "must be in [0, 1]")
    check("presence_penalty", -2 <= sampling.presence_penalty <= 2, "must be in [-2, 2]")
    check("frequency_penalty", -2 <= sampling.frequency_penalty <= 2, "must be in [-2, 2]")
    check(
        "repetition_penalty",
        math.isfinite(sampling.repetition_penalty) and sampling.repetition_penalty > 0,
        "must be above 0 (1 is off)",
    )
    check("seed", sampling.seed is None or sampling.seed <= MAX_SEED, f"must be at most {MAX_SEED} (2^63 - 1)")
    check("stop", len(sampling.stop) <= MAX_STOP_STRINGS, f"at most {MAX_STOP_STRINGS} stop strings")
    check("stop", all(sampling.stop), "stop strings must not be empty")
    check(
        "stop", all(len(stop) <= MAX_STOP_CHARS for stop in sampling.stop), f"at most {MAX_STOP_CHARS} characters each"
    )
    check(
        "min_tokens",
        params.max_tokens == 0 or sampling.min_tokens <= sampling.max_tokens,
        "must not exceed max_tokens",
    )
    return sampling
