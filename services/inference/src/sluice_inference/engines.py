"""The engine a replica serves with, as the host and the servicer see it: vLLM, or the simulated GPU.

Both stream ``EngineOutput`` deltas; a delta the servicer has not read yet
absorbs the next one (vLLM's ``RequestOutputCollector`` does the same), so
a stream that sends less often than the engine steps gets larger chunks,
never a backlog.
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Protocol

from sluice_inference.load import Load, ModelSpec
from sluice_inference.requests import PromptTokenizer, ValidRequest
from sluice_inference.settings import InferenceSettings

_MODULES = {"vllm": "sluice_inference.vllm_engine", "simulated": "sluice_inference.simulated.engine"}


@dataclass(slots=True)
class EngineOutput:
    """What one request gained since its previous output."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length" or "abort" once finished
    stop_reason: str | int | None = None  # the stop string or token that ended it
    cached_tokens: int = 0
    # Seconds the request waited in the engine's scheduler, and from its arrival
    # in the engine to its first token (the engine's own time to first token).
    queue_s: float | None = None
    engine_ttft_s: float | None = None


class Engine(Protocol):
    spec: ModelSpec
    tokenizer: PromptTokenizer

    @property
    def errored(self) -> bool:
        """The engine has died: this replica cannot serve again."""
        ...

    async def warm_up(self) -> None:
        """Run what a first request would run, so that it is no slower than later ones."""
        ...

    def generate(self, request: ValidRequest) -> AsyncGenerator[EngineOutput]:
        """The request's deltas, the last one finished; closing the generator early aborts it."""
        ...

    def unfinished_requests(self) -> int:
        """Requests the engine still holds (0 once aborted ones are freed)."""
        ...

    async def shutdown(self) -> None: ...


class EngineModule(Protocol):
    def build(self, settings: InferenceSettings, model_dir: str, load: Load) -> Engine:
        """Blocking: loads the model (seconds to minutes); called on a thread."""
        ...


def engine_module(settings: InferenceSettings) -> EngineModule:
    """The chosen engine's module; imports vLLM (seconds) for the real one, so call it on a thread."""
    module: EngineModule = importlib.import_module(_MODULES[settings.engine])
    return module
