"""The public ``sluice.generation.v1.Generation`` servicer.

Each ``Generate`` call is one ``Generation`` (sluice_queue.generation),
which runs the request's life from its API key to its usage record; this
module hands it the call's request, metadata and time left, relays its
events, and puts inference's complaints about a request sent with its
conversation's history in the caller's terms.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc

from sluice.generation.v1 import generation_pb2, generation_pb2_grpc
from sluice_core.errors import InvalidArgument, from_rpc_error
from sluice_queue.dependencies import (
    ConversationLog,
    Dependencies,
    Inference,
    Line,
    Models,
    TenantBudgets,
    TenantLookup,
    UsageSink,
)
from sluice_queue.generation import Generation, call_timeout
from sluice_queue.requests import in_public_terms

Context = grpc.aio.ServicerContext[Any, Any]


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(
        self,
        inference: Inference,
        scheduler: Line,
        engines: Models,
        auth: TenantLookup,
        budgets: TenantBudgets,
        conversations: ConversationLog,
        usage: UsageSink,
        usage_commit_s: float = 1.0,
    ) -> None:
        self._parts = Dependencies(
            auth=auth,
            inference=inference,
            scheduler=scheduler,
            engines=engines,
            budgets=budgets,
            conversations=conversations,
            usage=usage,
            usage_commit_s=usage_commit_s,
        )

    async def CreateConversation(
        self, request: generation_pb2.CreateConversationRequest, context: Context
    ) -> generation_pb2.Conversation:
        tenant = await self._parts.auth.tenant(context.invocation_metadata())
        conversation_id = await self._parts.conversations.create(tenant.id, call_timeout(context.time_remaining()))
        return generation_pb2.Conversation(id=conversation_id)

    async def ListModels(
        self, request: generation_pb2.ListModelsRequest, context: Context
    ) -> generation_pb2.ListModelsResponse:
        await self._parts.auth.tenant(context.invocation_metadata())
        engines = self._parts.engines
        if not engines.model_name:
            return generation_pb2.ListModelsResponse()
        model = generation_pb2.Model(id=engines.model_name, max_model_len=engines.max_model_len)
        return generation_pb2.ListModelsResponse(models=[model])

    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[generation_pb2.GenerateEvent]:
        generation = Generation(self._parts, request, context.invocation_metadata(), context.time_remaining)
        try:
            # Closed with this call, so that a caller gone away ends the generation at once.
            async with contextlib.aclosing(generation.events()) as events:
                async for event in events:
                    yield event
        except grpc.aio.AioRpcError as exc:
            internal = generation.internal
            if internal is not None and request.conversation_id:
                if isinstance(error := from_rpc_error(exc), InvalidArgument):
                    raise in_public_terms(error, request, internal.history_messages) from None
            raise

    async def drain(self) -> None:
        """Wait for slot releases and budget settlements still under way (at shutdown)."""
        await self._parts.background.drain()
