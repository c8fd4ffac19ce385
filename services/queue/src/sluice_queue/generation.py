"""One ``Generate`` request's life in the queue, from its caller's API key to its usage record.

The request is authenticated (its tenant from the data-access service),
checked, and gets its conversation's history; it waits for a slot (told its
position as it moves up), then streams tokens from inference through Envoy's
internal listener while its tenant's budget is reserved. The caller's
deadline goes along with the inner call; a caller that goes away cancels
it, which aborts the generation in the engine. A successful exchange is
appended to its conversation, and its usage committed, before the finished
event goes out; at the end, whatever the outcome, the request is counted,
its slot given back, its unused budget settled and its usage recorded.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable

import grpc
from google.protobuf import timestamp_pb2
from opentelemetry import trace

from sluice.common.v1 import common_pb2
from sluice.datastore.v1 import datastore_pb2
from sluice.generation.v1 import generation_pb2
from sluice.inference.v1 import inference_pb2
from sluice_core.channels import LONGEST_DEADLINE_S
from sluice_core.errors import SluiceError
from sluice_core.metrics import RequestMetrics, ended_early
from sluice_queue.auth import Metadata
from sluice_queue.budget import Reservation, reserve_tokens
from sluice_queue.dependencies import Dependencies, Place
from sluice_queue.replica_stream import ReplicaLost, ReplicaStream
from sluice_queue.requests import new_messages, to_inference, with_history

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


def call_timeout(time_remaining: float | None) -> float | None:
    """The timeout of a call made for a caller with ``time_remaining`` (past ``LONGEST_DEADLINE_S``: none)."""
    return None if time_remaining is None or time_remaining > LONGEST_DEADLINE_S else time_remaining


class Generation:
    """One request's life in the queue, run by ``events()``; its attributes say how far it got and what its
    caller was sent, for charging, recording and storing it."""

    def __init__(
        self,
        parts: Dependencies,
        request: generation_pb2.GenerateRequest,
        metadata: Metadata | None,
        time_remaining: Callable[[], float | None],
    ) -> None:
        """``metadata`` carries the caller's API key; ``time_remaining()`` is its time left (None: no deadline)."""
        self._timer = METRICS.stream()
        self._parts = parts
        self._metadata = metadata
        self._time_remaining = time_remaining
        self._call_span = trace.get_current_span()
        self.request = request
        self.request_id = uuid.uuid4().hex
        self.tenant: datastore_pb2.Tenant | None = None
        self.internal: inference_pb2.GenerateRequest | None = None  # what inference is sent
        self._added: list[common_pb2.ChatMessage] = []  # what the conversation gains
        self._ticket: Place | None = None
        self._waiting_since: float | None = None
        self.queue_s: float | None = None
        self._reserving: asyncio.Future[Reservation | None] | None = None
        self.model = ""
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cached_tokens = 0
        self._reply: list[str] = []
        self.outcome = "error"
        self.started = False  # an engine took it on, and the caller was told
        self._recorded = False  # its usage record handed over before the caller heard it finished

    async def events(self) -> AsyncGenerator[generation_pb2.GenerateEvent, None]:
        """What the caller is sent: its positions in line, then the replica's events."""
        self._call_span.set_attribute("sluice.request_id", self.request_id)
        if self.request.client_request_id:
            self._call_span.set_attribute("sluice.client_request_id", self.request.client_request_id)
        try:
            # Refused requests are counted too, and recorded once their tenant is known (``_close_out``).
            # Who is asking first: a caller without a valid key learns nothing about its request.
            tenant = self.tenant = await self._parts.auth.tenant(self._metadata)
            self._call_span.set_attribute("sluice.tenant", tenant.name)
            internal = self.internal = to_inference(self.request, self.request_id)
            self._added = new_messages(self.request)
            if self.request.conversation_id:
                history = await self._parts.conversations.history(
                    self.request.conversation_id, tenant.id, self._timeout()
                )
                with_history(internal, history, self._added)
            waiting_since = self._waiting_since = time.perf_counter()
            ticket = self._ticket = await self._parts.scheduler.enter(
                self.request_id, tenant.id, tenant.scheduling_weight, self.request.priority
            )
            if not ticket.admitted:
                # Only a request that waits has a wait span: an empty one for every request
                # admitted at once costs CPU on the path of every request (docs/benchmarks.md).
                with _tracer.start_as_current_span("queue.wait") as wait:
                    async for position in ticket.positions():
                        wait.add_event("position", {"position": position})
                        yield generation_pb2.GenerateEvent(queued=generation_pb2.Queued(position=position))
                    wait.set_attribute("sluice.queue_time_s", time.perf_counter() - waiting_since)
            queue_s = self.queue_s = time.perf_counter() - waiting_since
            with _tracer.start_as_current_span("queue.stream") as span:
                # The generation is sent first and the budget reserved while the replica
                # starts: the check costs no time to first token.
                stream = ReplicaStream(
                    lambda: self._parts.inference.Generate(internal, timeout=self._timeout()),
                    lambda: self.completion_tokens > 0,
                )
                tokens = reserve_tokens(
                    _texts(internal), internal.sampling.max_tokens, self._parts.engines.max_model_len
                )
                reserving = self._reserving = asyncio.ensure_future(
                    self._parts.budgets.reserve(tenant, tokens, self._timeout())
                )
                async for event in self._relay(span, stream, reserving, ticket, tenant, queue_s):
                    yield event
        except (asyncio.CancelledError, GeneratorExit):
            self.outcome = ended_early(self._time_remaining())
            raise
        except grpc.aio.AioRpcError as exc:
            self.outcome = exc.code().name.lower()
            raise
        except SluiceError as exc:
            self.outcome = exc.code.name.lower()
            raise
        finally:
            self._close_out()

    async def _relay(
        self,
        span: trace.Span,
        stream: ReplicaStream,
        reserving: asyncio.Future[Reservation | None],
        ticket: Place,
        tenant: datastore_pb2.Tenant,
        queue_s: float,
    ) -> AsyncIterator[generation_pb2.GenerateEvent]:
        """The replica's events in the caller's terms; no token leaves before the budget says yes."""
        try:
            async for response in stream.responses(span):
                kind = response.WhichOneof("event")
                if kind == "accepted":
                    if self.started:
                        continue  # sent again to another replica: the caller was told it started
                    yield self._started(response.accepted, tenant)
                elif kind == "delta":
                    if not reserving.done():
                        await reserving  # no token leaves before the budget says yes
                    reserving.result()  # over budget: raises, and the finally below stops the replica
                    if self._timer.first is None:
                        span.add_event("first_token")
                    self._timer.chunk(len(response.delta.token_ids))
                    self.completion_tokens += len(response.delta.token_ids)
                    if self.request.conversation_id:
                        self._reply.append(response.delta.text)
                    yield generation_pb2.GenerateEvent(delta=response.delta)
                elif kind == "finished":
                    # The engine's slot is free now: the next caller need not wait
                    # for this one's last message to reach its client.
                    self._parts.background.spawn(ticket.release())
                    finished = self._finished(response.finished, span, queue_s)
                    await self._keep(tenant)
                    yield finished
            if not reserving.done():
                await reserving
        except ReplicaLost as lost:
            # As for a replica that could not drain in time: the caller keeps what it got, and is
            # told the text was cut short (and billed for what it received).
            logger.warning("replica lost after %d tokens: %s", self.completion_tokens, lost)
            self.outcome = "abort"
            finished = self._cut_short(queue_s)
            await self._keep(tenant)
            yield finished
        finally:
            # Whether the caller left or this hop failed, stop the generation.
            stream.cancel()

    def _started(self, accepted: inference_pb2.Accepted, tenant: datastore_pb2.Tenant) -> generation_pb2.GenerateEvent:
        self.started = True
        self.prompt_tokens = accepted.prompt_tokens
        self.model = self._parts.engines.model_name
        # Should this replica die, billed for what it was sent by the last update.
        self._parts.usage.open(self.request_id, functools.partial(self._usage_record, tenant, "lost"))
        return generation_pb2.GenerateEvent(
            started=generation_pb2.Started(
                request_id=self.request_id,
                model=self.model,
                history_messages_dropped=accepted.history_messages_dropped,
                prompt_tokens=accepted.prompt_tokens,
            )
        )

    def _finished(self, done: inference_pb2.Finished, span: trace.Span, queue_s: float) -> generation_pb2.GenerateEvent:
        self.outcome = _OUTCOMES.get(done.reason, "stop")
        self.cached_tokens = done.usage.cached_tokens
        span.set_attribute("sluice.replica_id", done.replica_id)
        self._parts.engines.seen(done.replica_id)
        span.set_attribute("gen_ai.usage.prompt_tokens", done.usage.prompt_tokens)
        span.set_attribute("gen_ai.usage.completion_tokens", done.usage.completion_tokens)
        span.set_attribute("gen_ai.latency.time_to_first_token", self._timer.ttft_s)
        return self._finished_event(done.reason, done.usage, queue_s * 1e3 + done.timings.queue_ms)

    def _cut_short(self, queue_s: float) -> generation_pb2.GenerateEvent:
        usage = common_pb2.Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens)
        return self._finished_event(common_pb2.FINISH_REASON_ABORT, usage, queue_s * 1e3)

    def _finished_event(
        self, reason: common_pb2.FinishReason.ValueType, usage: common_pb2.Usage, queue_ms: float
    ) -> generation_pb2.GenerateEvent:
        timer = self._timer
        return generation_pb2.GenerateEvent(
            finished=generation_pb2.Finished(
                reason=reason,
                usage=usage,
                timings=common_pb2.Timings(
                    queue_ms=queue_ms,
                    time_to_first_token_ms=timer.ttft_s * 1e3,
                    total_ms=(time.perf_counter() - timer.start) * 1e3,
                    time_per_output_token_ms=timer.tpot_s * 1e3,
                ),
                request_id=self.request_id,
                client_request_id=self.request.client_request_id,
            )
        )

    async def _keep(self, tenant: datastore_pb2.Tenant) -> None:
        """Store the exchange and commit the usage record: both before the caller hears it finished."""
        if self.request.conversation_id and self.outcome in _STORED:
            # Its next turn will see this one.
            await self._parts.conversations.store(
                self.request.conversation_id,
                tenant.id,
                self.request_id,
                self._added,
                "".join(self._reply),
                self.completion_tokens,
                self._timeout(),
            )
        # A queue replica killed now loses nothing. One the data-access service cannot take in time
        # is kept and written later.
        self._recorded = True
        await self._parts.usage.commit(self._usage_record(tenant), self._parts.usage_commit_s)

    def _close_out(self) -> None:
        """However the request ended: count it, give its slot back, settle its budget and record its usage."""
        if self._ticket is not None:
            self._parts.background.spawn(self._ticket.release())
        if self.queue_s is None and self._waiting_since is not None:
            self.queue_s = time.perf_counter() - self._waiting_since  # left, shed or failed while waiting
        self._timer.finish(self.outcome, self.queue_s)
        # How the request ended (stop, length, cancelled, ...): more than the call's status code says.
        self._call_span.set_attribute("sluice.outcome", self.outcome)
        if self.tenant is not None and self._ticket is not None and self._ticket.admitted:
            self._settle_and_record(self.tenant)

    def _settle_and_record(self, tenant: datastore_pb2.Tenant) -> None:
        """Settle the budget, and record usage not committed yet, off the caller's path (and whether or not
        it is still there)."""
        if self._reserving is not None:
            # What the caller was sent is charged, even if it went away.
            self._parts.background.spawn(self._settle(self._reserving, self.prompt_tokens + self.completion_tokens))
        # Usage is for what an engine took on (the caller was told it started). A request that ended
        # before (refused, or no replica could take it) did no work for its caller, and since nothing
        # was sent, Envoy may retry it: one row per attempt would bill a call several times.
        if self.started and not self._recorded:
            self._parts.usage.record(self._usage_record(tenant))

    async def _settle(self, reserving: asyncio.Future[Reservation | None], used: int) -> None:
        try:
            reservation = await reserving
        except Exception:
            return
        if reservation is not None:
            self._parts.budgets.settle(reservation, used)

    def _usage_record(self, tenant: datastore_pb2.Tenant, status: str | None = None) -> datastore_pb2.UsageRecord:
        finished = timestamp_pb2.Timestamp()
        finished.GetCurrentTime()
        return datastore_pb2.UsageRecord(
            request_id=self.request_id,
            tenant_id=tenant.id,
            model=self.model,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            cached_tokens=min(self.cached_tokens, self.prompt_tokens),
            queue_ms=(self.queue_s or 0.0) * 1e3,
            time_to_first_token_ms=self._timer.ttft_s * 1e3,
            total_ms=self._timer.total_s * 1e3,
            status=status or self.outcome,
            finished_at=finished,
        )

    def _timeout(self) -> float | None:
        return call_timeout(self._time_remaining())


def _texts(internal: inference_pb2.GenerateRequest) -> list[str]:
    """The prompt's texts, as the budget counts them."""
    if internal.HasField("messages"):
        return [m.content for m in internal.messages.messages]
    return [internal.prompt]
