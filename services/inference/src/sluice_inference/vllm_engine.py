"""The real engine: vLLM's ``AsyncLLM``, built, warmed up, run and stopped.

Importing vLLM takes seconds, so ``host.py`` imports this module only when
it starts loading the model, after the gRPC server already answers health
checks (NOT_SERVING).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncGenerator
from typing import Any

from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.exceptions import GracefulHTTPError, VLLMValidationError
from vllm.outputs import RequestOutput
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError
from vllm.v1.metrics.loggers import StatLoggerBase

from sluice_core.errors import InvalidArgument, ResourceExhausted, Unavailable
from sluice_core.sampling import Sampling
from sluice_inference.engines import EngineOutput
from sluice_inference.load import Load, ModelSpec
from sluice_inference.prompts import HfPromptTokenizer
from sluice_inference.requests import ValidRequest
from sluice_inference.settings import InferenceSettings

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1.0
# How long the warm-up may spend prefilling prompts of every length.
_LENGTH_SWEEP_S = 20.0
ENGINE_DEAD = "the model engine has stopped; this replica is out of service"


class _KvCacheStats(StatLoggerBase):  # type: ignore[misc]  # vLLM is not type-checked here
    """A vLLM stat logger that only keeps the latest KV-cache usage."""

    def __init__(self, vllm_config: Any, engine_index: int = 0, *, load: Load) -> None:
        self._load = load

    def record(
        self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0
    ) -> None:
        if scheduler_stats is not None:
            self._load.kv_cache_usage = float(scheduler_stats.kv_cache_usage)

    def log_engine_initialized(self) -> None:
        pass


def engine_args(settings: InferenceSettings, model_dir: str) -> AsyncEngineArgs:
    return AsyncEngineArgs(
        model=model_dir,
        served_model_name=settings.served_model_name,
        dtype=settings.dtype,
        max_model_len=settings.max_model_len or None,
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        kv_cache_memory_bytes=settings.kv_cache_bytes or None,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        quantization=settings.quantization,
        enable_prefix_caching=settings.enable_prefix_caching,
        scheduling_policy=settings.scheduling_policy,
        max_num_queued_reqs=settings.max_num_queued_reqs,
        enforce_eager=settings.enforce_eager,
        seed=settings.seed,
        # Keeps per-request stats (queue time) on outputs and feeds vLLM's
        # own Prometheus metrics, served on this process's /metrics.
        disable_log_stats=False,
    )


def build(settings: InferenceSettings, model_dir: str, load: Load) -> VllmEngine:
    """Blocking: loads the weights and starts the engine-core process."""
    llm = AsyncLLM.from_engine_args(
        engine_args(settings, model_dir),
        stat_loggers=[lambda config, index: _KvCacheStats(config, index, load=load)],
    )
    return VllmEngine(llm, settings)


def sampling_params(sampling: Sampling) -> SamplingParams:
    return SamplingParams(
        max_tokens=sampling.max_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        min_p=sampling.min_p,
        presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty,
        repetition_penalty=sampling.repetition_penalty,
        seed=sampling.seed,
        stop=list(sampling.stop),
        ignore_eos=sampling.ignore_eos,
        min_tokens=sampling.min_tokens,
        output_kind=RequestOutputKind.DELTA,
    )


class VllmEngine:
    def __init__(self, llm: AsyncLLM, settings: InferenceSettings) -> None:
        self.llm = llm
        self._settings = settings
        model_config = llm.vllm_config.model_config
        self.spec = ModelSpec(
            name=model_config.served_model_name,
            max_model_len=model_config.max_model_len,
            vocab_size=model_config.get_vocab_size(),
            dtype=str(model_config.dtype).removeprefix("torch."),
            slots=llm.vllm_config.scheduler_config.max_num_seqs,
            quantization=model_config.quantization or "",
            prefix_caching=bool(llm.vllm_config.cache_config.enable_prefix_caching),
        )
        self.tokenizer = HfPromptTokenizer(llm.get_tokenizer())

    @property
    def errored(self) -> bool:
        return bool(self.llm.errored)

    def unfinished_requests(self) -> int:
        return int(self.llm.get_num_unfinished_requests())

    async def generate(self, request: ValidRequest) -> AsyncGenerator[EngineOutput]:
        """The engine's DELTA outputs; closing the iterator aborts the request in the engine."""
        priority = request.priority if self._settings.scheduling_policy == "priority" else 0
        try:
            async for output in self.llm.generate(
                {"prompt_token_ids": request.prompt_token_ids},
                sampling_params(request.sampling),
                request_id=request.request_id,
                priority=priority,
            ):
                yield _delta(output)
        except GracefulHTTPError as exc:
            # The engine's queue is full (max_num_queued_reqs): shed, with a hint.
            raise ResourceExhausted(f"this replica's engine queue is full: {exc}", retry_after_s=RETRY_AFTER_S) from exc
        except VLLMValidationError as exc:
            raise InvalidArgument.field(f"sampling.{exc.parameter}" if exc.parameter else "request", str(exc)) from exc
        except EngineDeadError as exc:
            raise Unavailable(ENGINE_DEAD) from exc

    async def warm_up(self) -> None:
        """Run the paths a first request takes (prefill, decode, greedy and random
        sampling, a small batch) so that it is no slower than later ones, then one
        prefill of every prompt length up to ``warmup_prompt_tokens``."""

        async def run(request: ValidRequest) -> None:
            async for _ in self.generate(request):
                pass

        def one(i: int) -> ValidRequest:
            sampling = Sampling(max_tokens=16, temperature=0.0 if i % 2 == 0 else 0.8, top_p=0.95, top_k=40, seed=i)
            prompt = self.tokenizer.encode(f"Warm-up request {i}: the river runs to the sea.")
            return ValidRequest(f"warmup-{i}", prompt, sampling, priority=0)

        await run(one(0))
        await asyncio.gather(*(run(one(i)) for i in range(1, self._settings.warmup_requests + 1)))
        # The first engine step over a new number of tokens sets up kernels for that shape.
        # Token ids drawn at random per length: a shared prefix would be served from the
        # prefix cache, and the step would not cover the whole length.
        words = self.tokenizer.encode("the keeper walks the channel and writes the level of the river in a book")
        longest = min(self._settings.warmup_prompt_tokens, self.spec.max_model_len - 1)
        # A large model on a CPU would take minutes; there the set-up is a small share of a prefill anyway.
        stop = time.monotonic() + _LENGTH_SWEEP_S
        for n in range(1, longest + 1):
            if time.monotonic() > stop:
                logger.info("warm-up: prompt lengths 1 to %d prefilled, the rest left cold", n - 1)
                break
            ids = random.Random(n).choices(words, k=n)
            await run(ValidRequest(f"warmup-length-{n}", ids, Sampling(max_tokens=1), priority=0))

    async def shutdown(self) -> None:
        """Stop the engine: its output handler first, then its process.

        vLLM's own ``shutdown`` ends the engine process while the output handler
        task still waits on it; the handler then logs the engine's death as an
        error, with a traceback, on every clean stop. Nothing is in flight here
        (the server has drained), so the handler is simply cancelled first.
        """
        handler = self.llm.output_handler
        if handler is not None:
            handler.cancel()
            await asyncio.wait([handler])
        await asyncio.to_thread(self.llm.shutdown)


def _delta(output: RequestOutput) -> EngineOutput:
    completion = output.outputs[0]
    # Engine-core timestamps, set once the request was scheduled and once it made a token.
    stats = output.metrics
    scheduled: float = getattr(stats, "scheduled_ts", 0.0)
    first_token: float = getattr(stats, "first_token_ts", 0.0)
    queue_s = max(0.0, scheduled - stats.queued_ts) if scheduled else None
    engine_ttft_s = max(0.0, first_token - stats.queued_ts) if first_token else None
    return EngineOutput(
        text=completion.text,
        token_ids=list(completion.token_ids),
        prompt_tokens=len(output.prompt_token_ids or ()),
        finished=output.finished,
        finish_reason=completion.finish_reason,
        stop_reason=completion.stop_reason,
        cached_tokens=output.num_cached_tokens or 0,
        queue_s=queue_s,
        engine_ttft_s=engine_ttft_s,
    )
