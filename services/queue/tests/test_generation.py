"""One request's life in the queue, driven without gRPC: every dependency is a fake at its protocol."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from sluice.common.v1 import common_pb2
from sluice.datastore.v1 import datastore_pb2
from sluice.generation.v1 import generation_pb2
from sluice.inference.v1 import inference_pb2
from sluice_core.errors import ResourceExhausted, Unauthenticated
from sluice_queue.auth import Metadata
from sluice_queue.budget import Limits, Reservation
from sluice_queue.dependencies import Dependencies
from sluice_queue.generation import Generation
from sluice_queue.ledger import Draft

TENANT = datastore_pb2.Tenant(id="t1", name="one", scheduling_weight=1, tokens_per_minute=6000)
KEY: Metadata = [("x-api-key", "k1")]
CONVERSATION = "3f2a9c1e-0000-4000-8000-00000000abcd"
HISTORY = [
    common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="where does the river go?"),
    common_pb2.ChatMessage(role=common_pb2.ROLE_ASSISTANT, content="to the sea"),
]


class Tenants:
    async def tenant(self, metadata: Metadata | None) -> datastore_pb2.Tenant:
        if not dict(metadata or ()).get("x-api-key"):
            raise Unauthenticated("no API key")
        return TENANT


class Call:
    """One streaming call to a replica: its responses, then ``error`` (a lost replica) if given."""

    def __init__(self, *responses: inference_pb2.GenerateResponse, error: grpc.StatusCode | None = None) -> None:
        self.responses = responses
        self.error = error
        self.cancelled = False

    def __aiter__(self) -> AsyncIterator[inference_pb2.GenerateResponse]:
        return self._stream()

    async def _stream(self) -> AsyncIterator[inference_pb2.GenerateResponse]:
        for response in self.responses:
            yield response
        if self.error is not None:
            raise grpc.aio.AioRpcError(self.error, grpc.aio.Metadata(), grpc.aio.Metadata(), "connection reset")

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class Inference:
    def __init__(self, *calls: Call) -> None:
        self.calls = list(calls)
        self.sent: list[inference_pb2.GenerateRequest] = []

    def Generate(self, request: inference_pb2.GenerateRequest, /, *, timeout: float | None) -> Call:
        self.sent.append(request)
        return self.calls[len(self.sent) - 1]


class Ticket:
    def __init__(self, positions: list[int]) -> None:
        self._positions = positions
        self.admitted = not positions
        self.released = False

    async def positions(self) -> AsyncIterator[int]:
        for position in self._positions:
            yield position
        self.admitted = True

    async def release(self) -> None:
        self.released = True


class Line:
    def __init__(self, positions: list[int] | None = None) -> None:
        self.ticket = Ticket(positions or [])
        self.entered = 0

    async def enter(
        self, request_id: str, tenant_id: str, weight: int, priority: generation_pb2.Priority.ValueType
    ) -> Ticket:
        self.entered += 1
        return self.ticket


class Models:
    model_name = "tiny"
    max_model_len = 2048

    def __init__(self) -> None:
        self.seen_replicas: list[str] = []

    def seen(self, replica_id: str) -> None:
        self.seen_replicas.append(replica_id)


class Budgets:
    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.settled: list[int] = []

    async def reserve(self, tenant: datastore_pb2.Tenant, tokens: int, timeout_s: float | None) -> Reservation | None:
        if self.refuse:
            raise ResourceExhausted("over the tenant's tokens per minute; retry in 7 s", retry_after_s=7.0)
        return Reservation(Limits(tenant.id, 0, tenant.tokens_per_minute), tokens)

    def settle(self, reservation: Reservation, used: int) -> None:
        self.settled.append(used)


class Conversations:
    def __init__(self) -> None:
        self.stored: list[tuple[str, str, int]] = []

    async def create(self, tenant_id: str, timeout_s: float | None) -> str:
        return "c1"

    async def history(
        self, conversation_id: str, tenant_id: str, timeout_s: float | None
    ) -> list[common_pb2.ChatMessage]:
        return list(HISTORY)

    async def store(
        self,
        conversation_id: str,
        tenant_id: str,
        request_id: str,
        new: list[common_pb2.ChatMessage],
        reply: str,
        reply_tokens: int,
        timeout_s: float | None,
    ) -> None:
        self.stored.append((conversation_id, reply, reply_tokens))


class Usage:
    def __init__(self) -> None:
        self.drafts: dict[str, Draft] = {}
        self.committed: list[datastore_pb2.UsageRecord] = []
        self.recorded: list[datastore_pb2.UsageRecord] = []

    def open(self, request_id: str, draft: Draft) -> None:
        self.drafts[request_id] = draft

    async def commit(self, record: datastore_pb2.UsageRecord, timeout_s: float) -> bool:
        self.committed.append(record)
        return True

    def record(self, record: datastore_pb2.UsageRecord) -> None:
        self.recorded.append(record)


class Replica:
    """A queue replica's parts, all fakes, around one inference stub."""

    def __init__(self, inference: Inference, line: Line | None = None, budgets: Budgets | None = None) -> None:
        self.inference = inference
        self.line = line or Line()
        self.models = Models()
        self.budgets = budgets or Budgets()
        self.conversations = Conversations()
        self.usage = Usage()
        self.parts = Dependencies(
            Tenants(), inference, self.line, self.models, self.budgets, self.conversations, self.usage
        )

    def generation(self, request: generation_pb2.GenerateRequest, metadata: Metadata = KEY) -> Generation:
        return Generation(self.parts, request, metadata, lambda: None)


def request(conversation_id: str = "") -> generation_pb2.GenerateRequest:
    sampling = common_pb2.SamplingParams(max_tokens=4)
    return generation_pb2.GenerateRequest(prompt="hello", sampling=sampling, conversation_id=conversation_id)


def accepted() -> inference_pb2.GenerateResponse:
    return inference_pb2.GenerateResponse(accepted=inference_pb2.Accepted(prompt_tokens=5))


def delta(text: str) -> inference_pb2.GenerateResponse:
    return inference_pb2.GenerateResponse(delta=common_pb2.TokenDelta(text=text, token_ids=[1]))


def finished(tokens: int) -> inference_pb2.GenerateResponse:
    usage = common_pb2.Usage(prompt_tokens=5, completion_tokens=tokens)
    done = inference_pb2.Finished(reason=common_pb2.FINISH_REASON_STOP, usage=usage, replica_id="r1")
    return inference_pb2.GenerateResponse(finished=done)


async def kinds(generation: Generation) -> list[str | None]:
    return [event.WhichOneof("event") async for event in generation.events()]


async def test_a_request_is_stored_and_billed_before_its_caller_hears_it_finished() -> None:
    replica = Replica(Inference(Call(accepted(), delta("to "), delta("the sea"), finished(2))))
    generation = replica.generation(request(CONVERSATION))
    async for event in generation.events():
        if event.HasField("finished"):
            assert replica.conversations.stored == [(CONVERSATION, "to the sea", 2)]
            assert [(r.request_id, r.completion_tokens, r.status) for r in replica.usage.committed] == [
                (generation.request_id, 2, "stop")
            ]
    await replica.parts.background.drain()
    sent = replica.inference.sent[0]
    assert sent.history_messages == 2 and [m.content for m in sent.messages.messages][-1] == "hello"
    assert generation.outcome == "stop" and replica.models.seen_replicas == ["r1"]
    assert replica.line.ticket.released
    assert replica.budgets.settled == [5 + 2]
    assert replica.usage.recorded == []  # committed already


async def test_a_waiting_caller_is_told_its_positions_first() -> None:
    replica = Replica(Inference(Call(accepted(), delta("hi"), finished(1))), line=Line([3, 1]))
    events = [event async for event in replica.generation(request()).events()]
    assert [event.queued.position for event in events[:2]] == [3, 1]
    assert [event.WhichOneof("event") for event in events[2:]] == ["started", "delta", "finished"]


async def test_a_replica_lost_before_the_first_token_is_replaced_unseen() -> None:
    lost = Call(accepted(), error=grpc.StatusCode.UNAVAILABLE)
    replica = Replica(Inference(lost, Call(accepted(), delta("hi"), finished(1))))
    assert await kinds(replica.generation(request())) == ["started", "delta", "finished"]
    assert lost.cancelled and len(replica.inference.sent) == 2


async def test_a_replica_lost_after_tokens_cuts_the_text_short_and_bills_what_was_sent() -> None:
    replica = Replica(Inference(Call(accepted(), delta("hi"), error=grpc.StatusCode.UNAVAILABLE)))
    generation = replica.generation(request())
    events = [event async for event in generation.events()]
    assert events[-1].finished.reason == common_pb2.FINISH_REASON_ABORT
    assert events[-1].finished.usage.completion_tokens == 1
    assert [(r.completion_tokens, r.status) for r in replica.usage.committed] == [(1, "abort")]


async def test_over_budget_no_token_leaves_and_the_started_request_is_recorded() -> None:
    call = Call(accepted(), delta("hi"), finished(1))
    replica = Replica(Inference(call), budgets=Budgets(refuse=True))
    generation = replica.generation(request())
    sent: list[str | None] = []
    with pytest.raises(ResourceExhausted):
        async for event in generation.events():
            sent.append(event.WhichOneof("event"))
    await replica.parts.background.drain()
    assert sent == ["started"]
    assert call.cancelled and generation.outcome == "resource_exhausted"
    assert [(r.completion_tokens, r.status) for r in replica.usage.recorded] == [(0, "resource_exhausted")]


async def test_a_caller_without_a_key_learns_nothing_about_its_request() -> None:
    replica = Replica(Inference())
    empty = generation_pb2.GenerateRequest(prompt=" ")  # invalid, but the key is checked first
    generation = replica.generation(empty, metadata=[])
    with pytest.raises(Unauthenticated):
        await kinds(generation)
    assert generation.outcome == "unauthenticated"
    assert replica.line.entered == 0 and replica.inference.sent == []


async def test_a_caller_that_goes_away_is_billed_for_what_it_was_sent() -> None:
    replica = Replica(Inference(Call(accepted(), delta("hi"), delta("there"), finished(2))))
    generation = replica.generation(request())
    events = generation.events()
    assert (await anext(events)).HasField("started")
    assert (await anext(events)).HasField("delta")
    await events.aclose()
    await replica.parts.background.drain()
    assert generation.outcome == "cancelled"
    assert [(r.completion_tokens, r.status) for r in replica.usage.recorded] == [(1, "cancelled")]
    assert replica.budgets.settled == [5 + 1]
