"""The public ``sluice.generation.v1.Generation`` servicer.

Each call waits for a slot (told its position as it moves up), then relays
the token stream from inference through Envoy's internal listener. The
caller's deadline goes along with the inner call; a caller that goes away
cancels it, which aborts the generation in the engine.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
from opentelemetry import trace

from sluice.common.v1 import generation_pb2 as common_pb2
from sluice.generation.v1 import generation_pb2, generation_pb2_grpc
from sluice.inference.v1 import inference_pb2, inference_pb2_grpc
from sluice_core.metrics import RequestMetrics, StreamTimer
from sluice_queue.admission import Admission
from sluice_queue.models import ModelDirectory
from sluice_queue.requests import to_inference

METRICS = RequestMetrics("queue")
_tracer = trace.get_tracer(__name__)

_OUTCOMES = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_ABORT: "abort",
}

Context = grpc.aio.ServicerContext[Any, Any]


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(
        self, inference: inference_pb2_grpc.InferenceAsyncStub, admission: Admission, models: ModelDirectory
    ) -> None:
        self._inference = inference
        self._admission = admission
        self._models = models

    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[generation_pb2.GenerateEvent]:
        timer = METRICS.stream()
        request_id = uuid.uuid4().hex
        span = trace.get_current_span()
        span.set_attribute("sluice.request_id", request_id)
        if request.client_request_id:
            span.set_attribute("sluice.client_request_id", request.client_request_id)
        internal = to_inference(request, request_id)
        ticket = self._admission.enter()
        outcome = "error"
        queue_s: float | None = None
        try:
            with _tracer.start_as_current_span("queue.wait") as wait:
                async for position in ticket.positions():
                    wait.add_event("position", {"position": position})
                    yield generation_pb2.GenerateEvent(queued=generation_pb2.Queued(position=position))
                queue_s = time.perf_counter() - timer.start
                wait.set_attribute("sluice.queue_time_s", queue_s)
            async for event in self._relay(internal, request, context, timer, queue_s):
                if event.HasField("finished"):
                    outcome = _OUTCOMES.get(event.finished.reason, "stop")
                yield event
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled"
            raise
        finally:
            ticket.release()
            timer.finish(outcome, queue_s)

    async def _relay(
        self,
        internal: inference_pb2.GenerateRequest,
        request: generation_pb2.GenerateRequest,
        context: Context,
        timer: StreamTimer,
        queue_s: float,
    ) -> AsyncIterator[generation_pb2.GenerateEvent]:
        with _tracer.start_as_current_span("queue.stream") as span:
            call = self._inference.Generate(internal, timeout=context.time_remaining())
            try:
                # The inner call is already on its way while the caller hears that it started.
                yield generation_pb2.GenerateEvent(
                    started=generation_pb2.Started(request_id=internal.request_id, model=self._models.model_name)
                )
                async for response in call:
                    if response.HasField("delta"):
                        if timer.first is None:
                            span.add_event("first_token")
                        timer.chunk(len(response.delta.token_ids))
                        yield generation_pb2.GenerateEvent(delta=response.delta)
                    elif response.HasField("finished"):
                        done = response.finished
                        span.set_attribute("sluice.replica_id", done.replica_id)
                        span.set_attribute("gen_ai.usage.prompt_tokens", done.usage.prompt_tokens)
                        span.set_attribute("gen_ai.usage.completion_tokens", done.usage.completion_tokens)
                        span.set_attribute("gen_ai.latency.time_to_first_token", timer.ttft_s)
                        yield generation_pb2.GenerateEvent(
                            finished=generation_pb2.Finished(
                                reason=done.reason,
                                usage=done.usage,
                                timings=common_pb2.Timings(
                                    queue_ms=queue_s * 1e3 + done.timings.queue_ms,
                                    time_to_first_token_ms=timer.ttft_s * 1e3,
                                    total_ms=(time.perf_counter() - timer.start) * 1e3,
                                    time_per_output_token_ms=timer.tpot_s * 1e3,
                                ),
                                request_id=internal.request_id,
                                client_request_id=request.client_request_id,
                            )
                        )
            finally:
                # Whether the caller left or this hop failed, stop the generation.
                call.cancel()
