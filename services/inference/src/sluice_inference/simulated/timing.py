"""How long a simulated engine step takes, and the GPUs the presets describe.

A step lasts ``base + per_sequence × sequences in the batch + per_prefill_token
× prompt tokens prefilled in it``. The presets' figures and where they come
from are in docs/simulated-engine.md.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from sluice_inference.settings import InferenceSettings


@dataclass(frozen=True)
class GpuPreset:
    base_s: float
    per_sequence_s: float
    per_prefill_token_s: float
    kv_cache_tokens: int
    # vLLM's default step token budget on that GPU (its OpenAI server's).
    max_batched_tokens: int

    def step_s(self, sequences: int, prefill_tokens: int) -> float:
        return self.base_s + self.per_sequence_s * sequences + self.per_prefill_token_s * prefill_tokens


PRESETS = {
    # Llama-3-8B, bf16, one H100 80GB SXM.
    "h100-llama3-8b": GpuPreset(
        base_s=6.5e-3, per_sequence_s=0.04e-3, per_prefill_token_s=0.03e-3, kv_cache_tokens=445_000,
        max_batched_tokens=8192,
    ),
    # Llama-3-70B, bf16, four H100s with tensor parallelism 4.
    "h100x4-llama3-70b": GpuPreset(
        base_s=22e-3, per_sequence_s=0.07e-3, per_prefill_token_s=0.07e-3, kv_cache_tokens=470_000,
        max_batched_tokens=8192,
    ),
    # Llama-3-8B, bf16, one L4 24GB.
    "l4-llama3-8b": GpuPreset(
        base_s=57e-3, per_sequence_s=0.3e-3, per_prefill_token_s=0.24e-3, kv_cache_tokens=32_000,
        max_batched_tokens=2048,
    ),
}  # fmt: skip


def preset(settings: InferenceSettings) -> GpuPreset:
    """The chosen preset with the settings' overrides."""
    chosen = PRESETS[settings.simulated_gpu]
    ms = 1e-3
    return replace(
        chosen,
        base_s=_given(settings.simulated_step_base_ms, ms, chosen.base_s),
        per_sequence_s=_given(settings.simulated_step_per_sequence_ms, ms, chosen.per_sequence_s),
        per_prefill_token_s=_given(settings.simulated_prefill_per_token_ms, ms, chosen.per_prefill_token_s),
        kv_cache_tokens=settings.simulated_kv_cache_tokens or chosen.kv_cache_tokens,
        max_batched_tokens=settings.max_num_batched_tokens or chosen.max_batched_tokens,
    )


def _given(value: float | None, unit: float, default: float) -> float:
    return default if value is None else value * unit
