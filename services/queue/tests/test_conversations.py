"""A finished exchange reaches its conversation even when the data-access service is briefly away."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest

from sluice.common.v1 import common_pb2
from sluice.datastore.v1 import datastore_pb2
from sluice_core.errors import NotFound
from sluice_queue.conversations import Conversations

QUESTION = [common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="where does the river go?")]


class FlakyDataStore:
    """Stands in for the data-access stub: fails while ``away``; ``gone`` conversations are NOT_FOUND."""

    def __init__(self) -> None:
        self.away = False
        self.stuck = False
        self.gone: set[str] = set()
        self.appended: list[tuple[str, str]] = []
        self.messages: dict[str, list[datastore_pb2.Message]] = {}
        self.changed = asyncio.Event()
        self.stalled = asyncio.Event()  # an append is stuck

    async def CreateConversation(
        self,
        request: datastore_pb2.CreateConversationRequest,
        timeout: float | None,  # noqa: ASYNC109 - the stub's
    ) -> datastore_pb2.Conversation:
        conversation_id = f"c{len(self.messages) + 1}"
        self.messages[conversation_id] = []
        return datastore_pb2.Conversation(id=conversation_id, tenant_id=request.tenant_id)

    async def GetConversation(
        self,
        request: datastore_pb2.GetConversationRequest,
        timeout: float | None,  # noqa: ASYNC109 - the stub's
    ) -> AsyncIterator[datastore_pb2.Message]:
        if request.conversation_id in self.gone or request.conversation_id not in self.messages:
            raise _error(grpc.StatusCode.NOT_FOUND, "no such conversation")
        for message in self.messages[request.conversation_id][-request.limit :]:
            yield message

    async def AppendMessages(
        self,
        request: datastore_pb2.AppendMessagesRequest,
        timeout: float,  # noqa: ASYNC109 - the stub's
    ) -> datastore_pb2.AppendMessagesResponse:
        if self.away:
            raise _error(grpc.StatusCode.UNAVAILABLE, "no healthy upstream")
        if self.stuck:
            self.stalled.set()
            await asyncio.Event().wait()
        if request.conversation_id in self.gone:
            raise _error(grpc.StatusCode.NOT_FOUND, "no such conversation")
        self.appended.append((request.conversation_id, request.messages[-1].content))
        self.messages.setdefault(request.conversation_id, []).extend(
            datastore_pb2.Message(role=m.role, content=m.content) for m in request.messages
        )
        self.changed.set()
        return datastore_pb2.AppendMessagesResponse()


def _error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


@pytest.fixture
def datastore() -> FlakyDataStore:
    return FlakyDataStore()


async def store(conversations: Conversations, conversation_id: str, reply: str) -> None:
    await conversations.store(conversation_id, "tenant", f"request-{reply}", QUESTION, reply, 3, timeout_s=5.0)


async def test_an_exchange_is_stored_before_store_returns(datastore: FlakyDataStore) -> None:
    conversations = Conversations(datastore)
    await store(conversations, "c1", "to the sea")
    assert datastore.appended == [("c1", "to the sea")]
    assert conversations.pending == 0


async def test_exchanges_wait_while_the_datastore_is_away_then_go_in_order(datastore: FlakyDataStore) -> None:
    conversations = Conversations(datastore, retry_interval_s=0.01)
    datastore.away = True
    await store(conversations, "c1", "first")
    datastore.away = False
    # A later turn of the same conversation waits behind the kept one; another conversation does not.
    await store(conversations, "c1", "second")
    await store(conversations, "c2", "elsewhere")
    assert datastore.appended == [("c2", "elsewhere")]
    assert conversations.pending == 2
    retrying = asyncio.create_task(conversations.run())
    try:
        async with asyncio.timeout(5):
            while len(datastore.appended) < 3:
                datastore.changed.clear()
                await datastore.changed.wait()
    finally:
        retrying.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await retrying
    assert datastore.appended == [("c2", "elsewhere"), ("c1", "first"), ("c1", "second")]


async def test_an_exchange_of_a_deleted_conversation_is_not_retried(datastore: FlakyDataStore) -> None:
    conversations = Conversations(datastore)
    datastore.gone = {"c1"}
    await store(conversations, "c1", "lost")
    assert conversations.pending == 0
    assert await conversations.flush()


async def test_past_the_cap_the_oldest_kept_exchange_goes(datastore: FlakyDataStore) -> None:
    conversations = Conversations(datastore, max_kept=2)
    datastore.away = True
    for name in ("c1", "c2", "c3"):
        await store(conversations, name, f"reply-{name}")
    datastore.away = False
    assert await conversations.flush()
    assert datastore.appended == [("c2", "reply-c2"), ("c3", "reply-c3")]


async def test_an_exchange_whose_caller_leaves_mid_append_is_kept(datastore: FlakyDataStore) -> None:
    conversations = Conversations(datastore)
    datastore.stuck = True
    storing = asyncio.create_task(store(conversations, "c1", "to the sea"))
    await asyncio.wait_for(datastore.stalled.wait(), 5)
    storing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await storing
    assert conversations.pending == 1
    datastore.stuck = False
    assert await conversations.flush()
    assert datastore.appended == [("c1", "to the sea")]


async def test_a_later_turn_waits_behind_a_kept_one_whatever_the_ids_spelling(datastore: FlakyDataStore) -> None:
    conversations = Conversations(datastore, retry_interval_s=0.01)
    conversation = "3f2a9c1e-0000-4000-8000-00000000abcd"
    datastore.away = True
    await store(conversations, conversation, "first")
    datastore.away = False
    await store(conversations, conversation.upper(), "second")
    assert datastore.appended == []  # held behind the first
    assert await conversations.flush()
    assert [reply for _, reply in datastore.appended] == ["first", "second"]


async def test_history_is_the_conversations_turns_and_a_gone_one_is_not_found(datastore: FlakyDataStore) -> None:
    conversations = Conversations(datastore)
    conversation = await conversations.create("tenant", timeout_s=5.0)
    await store(conversations, conversation, "to the sea")
    history = await conversations.history(conversation, "tenant", timeout_s=5.0)
    assert [(m.role, m.content) for m in history] == [
        (common_pb2.ROLE_USER, "where does the river go?"),
        (common_pb2.ROLE_ASSISTANT, "to the sea"),
    ]
    datastore.gone = {conversation}
    with pytest.raises(NotFound):
        await conversations.history(conversation, "tenant", timeout_s=5.0)
