"""Inference settings, from ``SLUICE_INFERENCE_*`` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from sluice_core.settings import ServiceSettings

DEFAULT_TINY_MODEL_DIR = Path.home() / ".cache" / "sluice" / "tiny-model"
# Not its folder's path, which names a home directory and differs between machines.
TINY_MODEL_NAME = "sluice-tiny"


class InferenceSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SLUICE_INFERENCE_")

    engine: Literal["vllm", "simulated"] = Field(
        "vllm",
        description="vllm serves the model. simulated runs a timing model of a GPU engine instead, for capacity "
        "planning and tests (docs/simulated-engine.md): the model's real tokenizer, made-up tokens, no weights.",
    )
    model: str | None = Field(
        None,
        description="A Hugging Face model directory. Unset serves sluice's tiny model, built on first use.",
    )
    tiny_model_dir: Path = Field(
        DEFAULT_TINY_MODEL_DIR,
        description="Where the tiny model is built when `model` is unset.",
    )
    served_model_name: str | None = Field(
        None,
        description="Name reported to callers, and the model OpenAI's clients ask for; defaults to the model "
        f"path, or {TINY_MODEL_NAME} for the tiny model.",
    )
    # bfloat16 crashes vLLM's CPU backend on some CPUs; float32 always runs.
    # On GPUs use "auto" (the model's own dtype) or "bfloat16".
    dtype: str = "float32"
    max_model_len: int = Field(
        2048,
        ge=0,
        description="Context length in tokens; 0 takes the model's. The default keeps a real model's long "
        "context from outgrowing a CPU's KV cache; on GPUs (compose) it is 0.",
    )
    max_num_seqs: int = Field(32, gt=0, description="Sequences the engine runs at once: this replica's slots.")
    max_num_batched_tokens: int | None = Field(None, gt=0)
    kv_cache_bytes: int = Field(
        256 * 1024 * 1024,
        ge=0,
        description="KV-cache size in bytes; 0 lets vLLM size it from gpu_memory_utilization (on GPUs). "
        "vLLM's CPU build needs an explicit size.",
    )
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    quantization: str | None = Field(None, description="vLLM quantization method, e.g. awq, gptq, fp8.")
    enable_prefix_caching: bool = True
    scheduling_policy: Literal["fcfs", "priority"] = "fcfs"
    max_num_queued_reqs: int | None = Field(
        256, gt=0, description="Requests waiting in the engine beyond which new ones get RESOURCE_EXHAUSTED."
    )
    chunk_messages_per_s: float = Field(
        80.0,
        ge=0,
        description="Token messages per second this replica aims at, shared by its running streams: after "
        "the first token (sent at once), a stream sends one chunk per (running streams / this) seconds, with "
        "every token made meanwhile, but never waits longer than max_chunk_interval_ms. Fewer, larger "
        "messages cost every hop less CPU when many streams run. 0 sends each engine step.",
    )
    max_chunk_interval_ms: float = Field(
        50.0,
        ge=0,
        description="The longest a client waits between two messages of a stream (plus one engine step) while "
        "tokens are pending, however many streams run: below what a reader notices. The replica sends on a "
        "beat of 80% of it, the rest left to the hops to the client. 0 sends each engine step.",
    )
    enforce_eager: bool = Field(False, description="Skip torch.compile: starts faster, generates a little slower.")
    seed: int = 0
    warmup_requests: int = Field(4, ge=0, description="Concurrent warm-up generations before reporting SERVING.")
    warmup_prompt_tokens: int = Field(
        256,
        ge=0,
        description="Before reporting SERVING, prefill one prompt of every length up to this many tokens: "
        "the engine's first step over a number of tokens it has not seen is slower (about 3 ms more on "
        "this CPU, for a 4 ms prefill), so without it most requests with short prompts would pay that once. "
        "The sweep stops after 20 s (a large model on a CPU).",
    )
    simulated_gpu: Literal["h100-llama3-8b", "h100x4-llama3-70b", "l4-llama3-8b"] = Field(
        "h100-llama3-8b",
        description="The simulated engine's preset: step times and KV-cache size of that GPU and model.",
    )
    simulated_step_base_ms: float | None = Field(None, gt=0, description="Overrides the preset's step time.")
    simulated_step_per_sequence_ms: float | None = Field(
        None, ge=0, description="Overrides the preset's step time added by each sequence in the batch."
    )
    simulated_prefill_per_token_ms: float | None = Field(
        None, ge=0, description="Overrides the preset's step time added by each prompt token prefilled."
    )
    simulated_kv_cache_tokens: int | None = Field(None, gt=0, description="Overrides the preset's KV-cache size.")
    simulated_eos_probability: float = Field(
        0.004,
        ge=0,
        le=1,
        description="Chance that a simulated token is end-of-sequence (ignore_eos and min_tokens respected): "
        "0.004 gives answers of about 250 tokens on average.",
    )

    @model_validator(mode="after")
    def _tiny_model_name(self) -> InferenceSettings:
        if self.model is None and self.served_model_name is None:
            object.__setattr__(self, "served_model_name", TINY_MODEL_NAME)
        return self
