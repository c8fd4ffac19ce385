"""The public ``sluice.generation.v1.Generation`` servicer.

Each call is authenticated (its tenant from the data-access service), gets
its conversation's history, waits for a slot (told its position as it moves
up), then streams tokens from inference through Envoy's internal listener
while its tenant's budget is reserved. The caller's deadline goes along with
the inner call; a caller that goes away cancels it, which aborts the
generation in the engine. A successful exchange is appended to its
conversation before the finished event goes out; at the end, whatever the
outcome, unused budget is given back and usage is recorded.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import timestamp_pb2
from opentelemetry import trace

from sluice.common.v1 import generation_pb2 as common_pb2
from sluice.datastore.v1 import datastore_pb2
from sluice.generation.v1 import generation_pb2, generation_pb2_grpc
from sluice.inference.v1 import inference_pb2, inference_pb2_grpc
from sluice_core.channels import LONGEST_DEADLINE_S
from sluice_core.errors import InvalidArgument, SluiceError, from_rpc_error
from sluice_core.metrics import RequestMetrics, StreamTimer, ended_early
from sluice_queue.auth import Authenticator
from sluice_queue.budget import Budgets, Reservation, reserve_tokens
from sluice_queue.conversations import Conversations
from sluice_queue.engines import Engines
from sluice_queue.requests import in_public_terms, new_messages, to_inference, with_history
from sluice_queue.scheduler import Scheduler, Ticket
from sluice_queue.usage import UsageRecorder

logger = logging.getLogger(__name__)

METRICS = RequestMetrics("queue")
_tracer = trace.get_tracer(__name__)

_OUTCOMES = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_ABORT: "abort",
}

# Outcomes whose exchange is appended to its conversation.
_STORED = ("stop", "length")

Context = grpc.aio.ServicerContext[Any, Any]


InferenceCall = grpc.aio.UnaryStreamCall[inference_pb2.GenerateRequest, inference_pb2.GenerateResponse]

# How a replica that died (its process killed, its connection reset) shows in its stream.
_REPLICA_LOST = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
# Times a generation that lost its replica before its first token is sent to another, and the
# pause before the first resend (doubling): Envoy's least-request balancing picks a dead replica
# (it has no requests) until its health checks or outlier detection take it out, within ~2 s.
_RESENDS = 4
_RESEND_PAUSE_S = 0.1


class _ReplicaLost(Exception):
    """The replica's stream broke after tokens had reached the caller: it cannot be sent again."""


class _Calls:
    """The call to a replica, and the ones that replace it when a replica is lost before the first token."""

    def __init__(self, start: Callable[[], InferenceCall]) -> None:
        self._start = start
        self._call = start()

    async def responses(self, progress: _Progress, span: trace.Span) -> AsyncIterator[inference_pb2.GenerateResponse]:
        resends = 0
        while True:
            try:
                async for response in self._call:
                    yield response
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in _REPLICA_LOST:
                    raise  # the replica's own answer: bad input, a full engine, the deadline
                if progress.completion_tokens:
                    raise _ReplicaLost(f"{exc.code().name}: {exc.details()}") from exc
                if resends == _RESENDS:
                    raise
                # Nothing reached the caller yet: the generation starts again on another replica.
                resends += 1
                span.add_event("replica_lost", {"rpc.grpc.status_code": exc.code().value[0], "resend": resends})
                self._call.cancel()
                await asyncio.sleep(_RESEND_PAUSE_S * 2 ** (resends - 1))
                self._call = self._start()

    def cancel(self) -> None:
        self._call.cancel()


@dataclass
class _Progress:
    """What a call has received so far, for charging, recording and storing it."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reply: list[str] = field(default_factory=list)
    outcome: str = "error"
    model: str = ""
    started: bool = False  # an engine took it on, and the caller was told
    recorded: bool = False  # its usage record handed over before the caller heard it finished


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(
        self,
        inference: inference_pb2_grpc.InferenceAsyncStub,
        scheduler: Scheduler,
        engines: Engines,
        auth: Authenticator,
        budgets: Budgets,
        conversations: Conversations,
        usage: UsageRecorder,
        usage_commit_s: float = 1.0,
    ) -> None:
        self._inference = inference
        self._usage_commit_s = usage_commit_s
        self._scheduler = scheduler
        self._engines = engines
        self._auth = auth
        self._budgets = budgets
        self._conversations = conversations
        self._usage = usage
        self._background: set[asyncio.Task[None]] = set()

    async def CreateConversation(
        self, request: generation_pb2.CreateConversationRequest, context: Context
    ) -> generation_pb2.Conversation:
        tenant = await self._auth.tenant(context.invocation_metadata())
        return generation_pb2.Conversation(id=await self._conversations.create(tenant.id, _remaining(context)))

    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[generation_pb2.GenerateEvent]:
        timer = METRICS.stream()
        request_id = uuid.uuid4().hex
        call_span = trace.get_current_span()
        call_span.set_attribute("sluice.request_id", request_id)
        if request.client_request_id:
            call_span.set_attribute("sluice.client_request_id", request.client_request_id)
        progress = _Progress()
        internal: inference_pb2.GenerateRequest | None = None
        tenant: datastore_pb2.Tenant | None = None
        ticket: Ticket | None = None
        reserving: asyncio.Future[Reservation | None] | None = None
        waiting_since: float | None = None
        queue_s: float | None = None
        try:
            # Refused requests are counted too, and recorded once their tenant is known (the finally below).
            # Who is asking first: a caller without a valid key learns nothing about its request.
            tenant = await self._auth.tenant(context.invocation_metadata())
            call_span.set_attribute("sluice.tenant", tenant.name)
            internal = to_inference(request, request_id)
            added = new_messages(request)
            if request.conversation_id:
                history = await self._conversations.history(request.conversation_id, tenant.id, _remaining(context))
                with_history(internal, history, added)
            waiting_since = time.perf_counter()
            ticket = await self._scheduler.enter(request_id, tenant.id, tenant.scheduling_weight, request.priority)
            if not ticket.admitted:
                # Only a request that waits has a wait span: an empty one for every request
                # admitted at once took 2.5% of a queue replica's CPU at low load.
                with _tracer.start_as_current_span("queue.wait") as wait:
                    async for position in ticket.positions():
                        wait.add_event("position", {"position": position})
                        yield generation_pb2.GenerateEvent(queued=generation_pb2.Queued(position=position))
                    wait.set_attribute("sluice.queue_time_s", time.perf_counter() - waiting_since)
            queue_s = time.perf_counter() - waiting_since
            texts = (
                [m.content for m in internal.messages.messages] if internal.HasField("messages") else [internal.prompt]
            )
            with _tracer.start_as_current_span("queue.stream") as span:
                # The generation is sent first and the budget reserved while the replica
                # starts: the check costs no time to first token.
                calls = _Calls(lambda: self._inference.Generate(internal, timeout=_remaining(context)))
                reserving = asyncio.ensure_future(
                    self._budgets.reserve(
                        tenant,
                        reserve_tokens(texts, internal.sampling.max_tokens, self._engines.max_model_len),
                        _remaining(context),
                    )
                )
                relay = self._relay(span, calls, internal, request, timer, queue_s, reserving, progress, ticket)
                async for event in relay:
                    if event.HasField("started"):
                        # Should this replica die, billed for what it was sent by the last update.
                        draft = functools.partial(_usage_record, request_id, tenant, progress, timer, queue_s, "lost")
                        self._usage.open(request_id, draft)
                    elif event.HasField("finished"):
                        if request.conversation_id and progress.outcome in _STORED:
                            # Stored before the caller hears it finished: its next turn will see this one.
                            await self._conversations.store(
                                request.conversation_id,
                                tenant.id,
                                request_id,
                                added,
                                "".join(progress.reply),
                                progress.completion_tokens,
                                _remaining(context),
                            )
                        # Billed before the caller hears it finished: a queue replica killed now loses
                        # nothing. One the data-access service cannot take in time is kept and written later.
                        progress.recorded = True
                        record = _usage_record(request_id, tenant, progress, timer, queue_s)
                        await self._usage.commit(record, self._usage_commit_s)
                    yield event
        except (asyncio.CancelledError, GeneratorExit):
            progress.outcome = ended_early(context.time_remaining())
            raise
        except grpc.aio.AioRpcError as exc:
            progress.outcome = exc.code().name.lower()
            if internal is not None and request.conversation_id:
                if isinstance(error := from_rpc_error(exc), InvalidArgument):
                    raise in_public_terms(error, request, internal.history_messages) from None
            raise
        except SluiceError as exc:
            progress.outcome = exc.code.name.lower()
            raise
        finally:
            if ticket is not None:
                self._spawn(ticket.release())
            if queue_s is None and waiting_since is not None:
                queue_s = time.perf_counter() - waiting_since  # left, shed or failed while waiting
            timer.finish(progress.outcome, queue_s)
            # How the request ended (stop, length, cancelled, ...): more than the call's status code says.
            call_span.set_attribute("sluice.outcome", progress.outcome)
            if tenant is not None and ticket is not None and ticket.admitted:
                self._after(request_id, tenant, progress, reserving, timer, queue_s)

    async def _relay(
        self,
        span: trace.Span,
        calls: _Calls,
        internal: inference_pb2.GenerateRequest,
        request: generation_pb2.GenerateRequest,
        timer: StreamTimer,
        queue_s: float,
        reserving: asyncio.Future[Reservation | None],
        progress: _Progress,
        ticket: Ticket,
    ) -> AsyncIterator[generation_pb2.GenerateEvent]:
        try:
            async for response in calls.responses(progress, span):
                kind = response.WhichOneof("event")
                if kind == "accepted":
                    if progress.started:
                        continue  # sent again to another replica: the caller was told it started
                    progress.started = True
                    progress.prompt_tokens = response.accepted.prompt_tokens
                    progress.model = self._engines.model_name
                    yield generation_pb2.GenerateEvent(
                        started=generation_pb2.Started(
                            request_id=internal.request_id,
                            model=progress.model,
                            history_messages_dropped=response.accepted.history_messages_dropped,
                            prompt_tokens=response.accepted.prompt_tokens,
                        )
                    )
                elif kind == "delta":
                    if not reserving.done():
                        await reserving  # no token leaves before the budget says yes
                    reserving.result()  # over budget: raises, and the finally below stops the replica
                    if timer.first is None:
                        span.add_event("first_token")
                    timer.chunk(len(response.delta.token_ids))
                    progress.completion_tokens += len(response.delta.token_ids)
                    if request.conversation_id:
                        progress.reply.append(response.delta.text)
                    yield generation_pb2.GenerateEvent(delta=response.delta)
                elif kind == "finished":
                    # The engine's slot is free now: the next caller need not wait
                    # for this one's last message to reach its client.
                    self._spawn(ticket.release())
                    done = response.finished
                    progress.outcome = _OUTCOMES.get(done.reason, "stop")
                    progress.cached_tokens = done.usage.cached_tokens
                    span.set_attribute("sluice.replica_id", done.replica_id)
                    self._engines.seen(done.replica_id)
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
            if not reserving.done():
                await reserving
        except _ReplicaLost as lost:
            # As for a replica that could not drain in time: the caller keeps what it got, and is
            # told the text was cut short (and billed for what it received).
            logger.warning("replica lost after %d tokens: %s", progress.completion_tokens, lost)
            progress.outcome = "abort"
            yield generation_pb2.GenerateEvent(
                finished=generation_pb2.Finished(
                    reason=common_pb2.FINISH_REASON_ABORT,
                    usage=common_pb2.Usage(
                        prompt_tokens=progress.prompt_tokens, completion_tokens=progress.completion_tokens
                    ),
                    timings=common_pb2.Timings(
                        queue_ms=queue_s * 1e3,
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
            calls.cancel()

    def _after(
        self,
        request_id: str,
        tenant: datastore_pb2.Tenant,
        progress: _Progress,
        reserving: asyncio.Future[Reservation | None] | None,
        timer: StreamTimer,
        queue_s: float | None,
    ) -> None:
        """Settle the budget and record usage if not committed yet, off the caller's path (and whether or
        not it is still there)."""
        if reserving is not None:
            # What the caller was sent is charged, even if it went away.
            self._spawn(self._settle(reserving, progress.prompt_tokens + progress.completion_tokens))
        # Usage is for what an engine took on (the caller was told it started). A request that ended
        # before (refused, or no replica could take it) did no work for its caller, and since nothing
        # was sent, Envoy may retry it: one row per attempt would bill a call several times.
        if progress.started and not progress.recorded:
            self._usage.record(_usage_record(request_id, tenant, progress, timer, queue_s))

    async def _settle(self, reserving: asyncio.Future[Reservation | None], used: int) -> None:
        try:
            reservation = await reserving
        except Exception:
            return
        if reservation is not None:
            self._budgets.settle(reservation, used)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(self._logged(work))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @staticmethod
    async def _logged(work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except Exception:
            logger.exception("after a request")

    async def drain(self) -> None:
        """Wait for slot releases and budget settlements still under way (at shutdown)."""
        if self._background:
            await asyncio.wait(self._background, timeout=10)


def _usage_record(
    request_id: str,
    tenant: datastore_pb2.Tenant,
    progress: _Progress,
    timer: StreamTimer,
    queue_s: float | None,
    status: str | None = None,
) -> datastore_pb2.UsageRecord:
    finished = timestamp_pb2.Timestamp()
    finished.GetCurrentTime()
    return datastore_pb2.UsageRecord(
        request_id=request_id,
        tenant_id=tenant.id,
        model=progress.model,
        prompt_tokens=progress.prompt_tokens,
        completion_tokens=progress.completion_tokens,
        cached_tokens=min(progress.cached_tokens, progress.prompt_tokens),
        queue_ms=(queue_s or 0.0) * 1e3,
        time_to_first_token_ms=timer.ttft_s * 1e3,
        total_ms=timer.total_s * 1e3,
        status=status or progress.outcome,
        finished_at=finished,
    )


def _remaining(context: Context) -> float | None:
    """The caller's time left, for the calls made for it (past ``LONGEST_DEADLINE_S``: none)."""
    left: float | None = context.time_remaining()  # None without a deadline, whatever the stubs say
    return None if left is None or left > LONGEST_DEADLINE_S else left
