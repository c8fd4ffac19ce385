"""The data-access service on real PostgreSQL and Redis: caching, idempotency, invalidation, failures."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import psutil
import pytest
from google.protobuf import timestamp_pb2

from sluice.common.v1 import common_pb2
from sluice.datastore.v1 import datastore_pb2
from sluice_devstack.postgres_server import PostgresServer
from sluice_devstack.redis_server import RedisServer
from sluice_devstack.waiting import eventually

from .conftest import Service, log_caught_up, log_size, new_tenant, statements

USER, ASSISTANT = common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT


async def code_of(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value.code()


async def issue(service: Service, tenant_id: str) -> str:
    response = await service.stub.IssueApiKey(datastore_pb2.IssueApiKeyRequest(tenant_id=tenant_id))
    assert response.api_key.startswith("sk-")
    return response.api_key


async def test_an_api_key_finds_its_tenant(service: Service) -> None:
    tenant = await new_tenant(service.stub)
    key = await issue(service, tenant.id)
    found = await service.stub.GetTenantByApiKey(datastore_pb2.GetTenantByApiKeyRequest(api_key=key))
    assert (found.id, found.name, found.scheduling_weight) == (tenant.id, "acme", 3)
    unknown = service.stub.GetTenantByApiKey(datastore_pb2.GetTenantByApiKeyRequest(api_key="sk-nope"))
    assert await code_of(unknown) == grpc.StatusCode.NOT_FOUND


async def test_only_a_hash_of_the_key_is_stored(service: Service, postgres: PostgresServer) -> None:
    import asyncpg

    key = await issue(service, (await new_tenant(service.stub)).id)
    connection = await asyncpg.connect(postgres.url)
    dump = await connection.fetchval("SELECT string_agg(k::text, '') FROM api_keys k")
    await connection.close()
    assert key not in dump and key.removeprefix("sk-") not in dump


async def test_two_hundred_cold_reads_of_one_key_reach_postgres_once(
    service: Service, other_service: Service, postgres: PostgresServer
) -> None:
    key = await issue(service, (await new_tenant(service.stub)).id)
    since = log_size(postgres)
    request = datastore_pb2.GetTenantByApiKeyRequest(api_key=key)
    # Two processes, a hundred concurrent callers each.
    found = await asyncio.gather(
        *(s.stub.GetTenantByApiKey(request) for s in (service, other_service) for _ in range(100))
    )
    assert {t.name for t in found} == {"acme"}
    await log_caught_up(postgres)
    assert statements(postgres, "tenant_by_key", since) == 1


async def test_unknown_keys_are_remembered_as_unknown(service: Service, postgres: PostgresServer) -> None:
    since = log_size(postgres)
    request = datastore_pb2.GetTenantByApiKeyRequest(api_key="sk-random-guess")
    for _ in range(20):
        assert await code_of(service.stub.GetTenantByApiKey(request)) == grpc.StatusCode.NOT_FOUND
    await log_caught_up(postgres)
    assert statements(postgres, "tenant_by_key", since) == 1


async def test_a_revoked_key_stops_working_everywhere_within_a_second(service: Service, other_service: Service) -> None:
    key = await issue(service, (await new_tenant(service.stub)).id)
    request = datastore_pb2.GetTenantByApiKeyRequest(api_key=key)
    await other_service.stub.GetTenantByApiKey(request)  # now in the other process's memory and in Redis
    await service.stub.RevokeApiKey(datastore_pb2.RevokeApiKeyRequest(api_key=key))

    async def refused() -> bool:
        try:
            await other_service.stub.GetTenantByApiKey(request)
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND
            return True
        return False

    await eventually(refused, 1.0, "the revoked key refused by the other process")


async def test_conversations_round_trip_newest_messages_in_order(service: Service) -> None:
    tenant = await new_tenant(service.stub)
    conversation = await service.stub.CreateConversation(datastore_pb2.CreateConversationRequest(tenant_id=tenant.id))
    for i in range(5):
        messages = [
            datastore_pb2.NewMessage(role=USER, content=f"question {i}", token_count=3),
            datastore_pb2.NewMessage(role=ASSISTANT, content=f"answer {i}", token_count=4),
        ]
        await service.stub.AppendMessages(
            datastore_pb2.AppendMessagesRequest(
                tenant_id=tenant.id, conversation_id=conversation.id, request_id=f"r{i}", messages=messages
            )
        )
    newest = [
        m
        async for m in service.stub.GetConversation(
            datastore_pb2.GetConversationRequest(tenant_id=tenant.id, conversation_id=conversation.id, limit=3)
        )
    ]
    assert [(m.sequence, m.content) for m in newest] == [(8, "answer 3"), (9, "question 4"), (10, "answer 4")]
    everything = [
        m
        async for m in service.stub.GetConversation(
            datastore_pb2.GetConversationRequest(tenant_id=tenant.id, conversation_id=conversation.id)
        )
    ]
    assert [m.sequence for m in everything] == list(range(1, 11))
    stranger = service.stub.GetConversation(
        datastore_pb2.GetConversationRequest(conversation_id=conversation.id, tenant_id=str(uuid.uuid4()))
    )
    assert await code_of(_drain(stranger)) == grpc.StatusCode.NOT_FOUND


async def _drain(call: object) -> None:
    async for _ in call:  # type: ignore[attr-defined]
        pass


async def test_a_write_then_a_read_returns_the_new_data(service: Service, other_service: Service) -> None:
    tenant = await new_tenant(service.stub)
    conversation = await service.stub.CreateConversation(datastore_pb2.CreateConversationRequest(tenant_id=tenant.id))
    read = datastore_pb2.GetConversationRequest(tenant_id=tenant.id, conversation_id=conversation.id, limit=20)
    assert [m async for m in other_service.stub.GetConversation(read)] == []  # cached, empty
    message = datastore_pb2.NewMessage(role=USER, content="hello", token_count=1)
    await service.stub.AppendMessages(
        datastore_pb2.AppendMessagesRequest(
            tenant_id=tenant.id, conversation_id=conversation.id, request_id="w1", messages=[message]
        )
    )
    for reader in (service, other_service):
        assert [m.content async for m in reader.stub.GetConversation(read)] == ["hello"]
    # Another spelling of the same id is the same conversation, cache included.
    shouted = datastore_pb2.GetConversationRequest(
        tenant_id=tenant.id, conversation_id=conversation.id.upper().replace("-", ""), limit=20
    )
    assert [m.content async for m in service.stub.GetConversation(shouted)] == ["hello"]
    await service.stub.AppendMessages(
        datastore_pb2.AppendMessagesRequest(
            tenant_id=tenant.id, conversation_id=conversation.id, request_id="w2", messages=[message]
        )
    )
    assert [m.content async for m in service.stub.GetConversation(shouted)] == ["hello", "hello"]


async def test_a_message_with_a_nul_is_stored_with_a_replacement_character(service: Service) -> None:
    # A byte-level tokenizer's reply can hold a NUL, which PostgreSQL's text cannot.
    tenant = await new_tenant(service.stub)
    conversation = await service.stub.CreateConversation(datastore_pb2.CreateConversationRequest(tenant_id=tenant.id))
    message = datastore_pb2.NewMessage(role=ASSISTANT, content="a\x00b", token_count=3)
    await service.stub.AppendMessages(
        datastore_pb2.AppendMessagesRequest(
            tenant_id=tenant.id, conversation_id=conversation.id, request_id="nul", messages=[message]
        )
    )
    read = datastore_pb2.GetConversationRequest(tenant_id=tenant.id, conversation_id=conversation.id)
    assert [m.content async for m in service.stub.GetConversation(read)] == ["a\ufffdb"]


async def test_appending_twice_with_one_request_id_appends_once(service: Service) -> None:
    tenant = await new_tenant(service.stub)
    conversation = await service.stub.CreateConversation(datastore_pb2.CreateConversationRequest(tenant_id=tenant.id))
    append = datastore_pb2.AppendMessagesRequest(
        tenant_id=tenant.id,
        conversation_id=conversation.id,
        request_id="same",
        messages=[datastore_pb2.NewMessage(role=USER, content="once", token_count=1)],
    )
    first, again = await asyncio.gather(service.stub.AppendMessages(append), service.stub.AppendMessages(append))
    assert list(first.sequences) == list(again.sequences) == [1]
    everything = [
        m
        async for m in service.stub.GetConversation(
            datastore_pb2.GetConversationRequest(tenant_id=tenant.id, conversation_id=conversation.id)
        )
    ]
    assert len(everything) == 1


def usage(request_id: str, tenant_id: str, tokens: int = 10) -> datastore_pb2.UsageRecord:
    return datastore_pb2.UsageRecord(
        request_id=request_id,
        tenant_id=tenant_id,
        model="tiny",
        prompt_tokens=tokens,
        completion_tokens=tokens,
        cached_tokens=0,
        queue_ms=1.0,
        time_to_first_token_ms=5.0,
        total_ms=50.0,
        status="length",
    )


def records(**fields: object) -> datastore_pb2.RecordUsageRequest:
    """A batch of one record, with ``fields`` changed."""
    record = usage("bad", str(uuid.uuid4()))
    for name, value in fields.items():
        if isinstance(value, timestamp_pb2.Timestamp):
            getattr(record, name).CopyFrom(value)
        else:
            setattr(record, name, value)
    return datastore_pb2.RecordUsageRequest(records=[record])


async def test_usage_is_counted_once_per_request(service: Service, postgres: PostgresServer) -> None:
    import asyncpg

    tenant = await new_tenant(service.stub)
    batch = datastore_pb2.RecordUsageRequest(records=[usage("u1", tenant.id), usage("u2", tenant.id)])

    async def batches() -> AsyncIterator[datastore_pb2.RecordUsageRequest]:
        yield batch
        yield datastore_pb2.RecordUsageRequest(records=[usage("u2", tenant.id), usage("u3", tenant.id)])

    first = await service.stub.RecordUsage(batches())
    assert (first.recorded, first.duplicates) == (3, 1)
    retry = await service.stub.RecordUsage(iter([batch]))
    assert (retry.recorded, retry.duplicates) == (0, 2)
    connection = await asyncpg.connect(postgres.url)
    total = await connection.fetchval("SELECT sum(prompt_tokens + completion_tokens) FROM usage")
    await connection.close()
    assert total == 60


async def test_a_batch_with_a_bad_record_writes_nothing(service: Service, postgres: PostgresServer) -> None:
    import asyncpg

    tenant = await new_tenant(service.stub)
    orphan = usage("orphan", str(uuid.uuid4()))  # no such tenant
    call = service.stub.RecordUsage(
        iter([datastore_pb2.RecordUsageRequest(records=[usage("good", tenant.id), orphan])])
    )
    assert await code_of(call) == grpc.StatusCode.NOT_FOUND
    connection = await asyncpg.connect(postgres.url)
    assert await connection.fetchval("SELECT count(*) FROM usage") == 0
    await connection.close()


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (datastore_pb2.CreateTenantRequest(name="", tier=datastore_pb2.TIER_FREE), "name"),
        (datastore_pb2.CreateTenantRequest(name="x"), "tier"),
        (
            datastore_pb2.CreateTenantRequest(name="x", tier=datastore_pb2.TIER_FREE, tokens_per_minute=2**32),
            "tokens_per_minute",
        ),
        (
            datastore_pb2.CreateTenantRequest(name="x", tier=datastore_pb2.TIER_FREE, requests_per_minute=2**31),
            "requests_per_minute",
        ),
        (
            datastore_pb2.CreateTenantRequest(name="x", tier=datastore_pb2.TIER_FREE, scheduling_weight=2**31 - 1),
            "scheduling_weight",
        ),
        (datastore_pb2.IssueApiKeyRequest(tenant_id="not-a-uuid"), "tenant_id"),
        (datastore_pb2.IssueApiKeyRequest(tenant_id="{" + str(uuid.uuid4()) + "}"), "tenant_id"),
        (
            datastore_pb2.AppendMessagesRequest(
                tenant_id=str(uuid.uuid4()), conversation_id=str(uuid.uuid4()), request_id="r"
            ),
            "messages",
        ),
        (
            datastore_pb2.AppendMessagesRequest(
                tenant_id=str(uuid.uuid4()),
                conversation_id=str(uuid.uuid4()),
                request_id="r",
                messages=[datastore_pb2.NewMessage(role=9)],  # type: ignore[arg-type]
            ),
            "messages[0].role",
        ),
        (records(total_ms=float("nan")), "records[0].timings"),
        (records(status="x" * 33), "records[0].status"),
        (records(prompt_tokens=2**31), "records[0].prompt_tokens"),
        (records(finished_at=timestamp_pb2.Timestamp(seconds=253402300800)), "records[0].finished_at"),
    ],
)
async def test_bad_input_names_the_field(service: Service, request_: object, field: str) -> None:
    method = {
        datastore_pb2.CreateTenantRequest: service.stub.CreateTenant,
        datastore_pb2.IssueApiKeyRequest: service.stub.IssueApiKey,
        datastore_pb2.AppendMessagesRequest: service.stub.AppendMessages,
        datastore_pb2.RecordUsageRequest: lambda batch: service.stub.RecordUsage(iter([batch])),
    }[type(request_)]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await method(request_)  # type: ignore[operator]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (caught.value.details() or "")


async def test_redis_down_is_served_from_postgres(service: Service, redis_server: RedisServer) -> None:
    key = await issue(service, (await new_tenant(service.stub)).id)
    request = datastore_pb2.GetTenantByApiKeyRequest(api_key=key)
    await redis_server.stop()
    try:
        for _ in range(3):
            assert (await service.stub.GetTenantByApiKey(request)).name == "acme"
    finally:
        await redis_server.start()
    await asyncio.wait_for(service.local.subscribed.wait(), 5)  # back by itself
    assert (await service.stub.GetTenantByApiKey(request)).name == "acme"


async def test_postgres_down_reads_from_cache_and_refuses_writes(service: Service, postgres: PostgresServer) -> None:
    tenant = await new_tenant(service.stub)
    key = await issue(service, tenant.id)
    request = datastore_pb2.GetTenantByApiKeyRequest(api_key=key)
    await service.stub.GetTenantByApiKey(request)  # cached
    await postgres.stop()
    try:
        assert (await service.stub.GetTenantByApiKey(request)).name == "acme"
        write = service.stub.CreateConversation(datastore_pb2.CreateConversationRequest(tenant_id=tenant.id))
        assert await code_of(write) == grpc.StatusCode.UNAVAILABLE
        uncached = service.stub.GetTenantByApiKey(datastore_pb2.GetTenantByApiKeyRequest(api_key="sk-other"))
        assert await code_of(uncached) == grpc.StatusCode.UNAVAILABLE
    finally:
        await postgres.start()

    async def written() -> bool:
        try:
            await service.stub.CreateConversation(datastore_pb2.CreateConversationRequest(tenant_id=tenant.id))
        except grpc.aio.AioRpcError:
            return False
        return True

    await eventually(written, 10, "a write once the pool reconnected by itself", interval_s=0.2)


async def test_a_stalled_postgres_is_unavailable_within_seconds_not_the_callers_deadline(
    service: Service, postgres: PostgresServer
) -> None:
    # A stalled server never enforces its own statement timeout: reads hung for the caller's whole deadline.
    assert postgres.process is not None
    await new_tenant(service.stub)  # the pool's connections are open
    server = psutil.Process(postgres.process.pid)
    processes = [server, *server.children(recursive=True)]  # each backend is in a session of its own
    for process in processes:
        process.suspend()
    try:
        start = time.monotonic()
        key = f"sk-{uuid.uuid4().hex}"
        uncached = service.stub.GetTenantByApiKey(datastore_pb2.GetTenantByApiKeyRequest(api_key=key), timeout=30)
        assert await code_of(uncached) == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - start < 10
    finally:
        for process in processes:
            process.resume()


async def test_reads_go_to_replicas_but_a_writer_reads_its_writes(
    clean: None, postgres: PostgresServer, redis_server: RedisServer
) -> None:
    import asyncpg

    from .conftest import start_service

    # A "replica" that lags behind: a database without the conversations written below.
    admin = await asyncpg.connect(postgres.url)
    await admin.execute("DROP DATABASE IF EXISTS lagging_replica")
    await admin.execute("CREATE DATABASE lagging_replica")
    await admin.close()
    replica_url = postgres.url.rsplit("/", 1)[0] + "/lagging_replica"
    replica = await asyncpg.connect(replica_url)
    from sluice_datastore.migrate import migrate

    await migrate(replica)
    await replica.close()
    async for service in start_service(postgres, redis_server, replica_urls=[replica_url]):
        tenant = await new_tenant(service.stub)
        written = await service.stub.CreateConversation(datastore_pb2.CreateConversationRequest(tenant_id=tenant.id))
        untouched = await service.stub.CreateConversation(datastore_pb2.CreateConversationRequest(tenant_id=tenant.id))
        message = datastore_pb2.NewMessage(role=USER, content="mine", token_count=1)
        await service.stub.AppendMessages(
            datastore_pb2.AppendMessagesRequest(
                tenant_id=tenant.id, conversation_id=written.id, request_id="rw", messages=[message]
            )
        )
        # Just written by this process: read from the primary.
        mine = datastore_pb2.GetConversationRequest(tenant_id=tenant.id, conversation_id=written.id, limit=20)
        assert [m.content async for m in service.stub.GetConversation(mine)] == ["mine"]
        # Not written here: read from the replica, which does not have it yet.
        theirs = service.stub.GetConversation(
            datastore_pb2.GetConversationRequest(tenant_id=tenant.id, conversation_id=untouched.id)
        )
        assert await code_of(_drain(theirs)) == grpc.StatusCode.NOT_FOUND


async def test_a_taken_tenant_name_is_already_exists_in_the_apis_words(service: Service) -> None:
    await new_tenant(service.stub, "taken")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await new_tenant(service.stub, "taken")
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert caught.value.details() == "a tenant with this name already exists; choose another name"


async def test_a_conversation_is_read_and_appended_only_by_its_own_tenant(service: Service) -> None:
    # Leaving tenant_id empty once read any tenant's conversation.
    owner, other = await new_tenant(service.stub, "owner"), await new_tenant(service.stub, "other")
    conversation = await service.stub.CreateConversation(datastore_pb2.CreateConversationRequest(tenant_id=owner.id))
    message = datastore_pb2.NewMessage(role=USER, content="private", token_count=1)
    for tenant_id, code in (("", grpc.StatusCode.INVALID_ARGUMENT), (other.id, grpc.StatusCode.NOT_FOUND)):
        read = datastore_pb2.GetConversationRequest(conversation_id=conversation.id, tenant_id=tenant_id)
        assert await code_of(_drain(service.stub.GetConversation(read))) == code
        append = datastore_pb2.AppendMessagesRequest(
            conversation_id=conversation.id, tenant_id=tenant_id, request_id=f"x{code}", messages=[message]
        )
        assert await code_of(service.stub.AppendMessages(append)) == code
    read = datastore_pb2.GetConversationRequest(conversation_id=conversation.id, tenant_id=owner.id)
    assert [m async for m in service.stub.GetConversation(read)] == []


async def test_tenants_are_listed_by_name_a_page_at_a_time_and_keys_newest_first(service: Service) -> None:
    for name in ("list-c", "list-a", "list-b"):
        await new_tenant(service.stub, name)
    first = await service.stub.ListTenants(datastore_pb2.ListTenantsRequest(limit=2, after="list-"))
    assert [t.name for t in first.tenants] == ["list-a", "list-b"]
    rest = await service.stub.ListTenants(datastore_pb2.ListTenantsRequest(limit=2, after="list-b"))
    assert [t.name for t in rest.tenants][:1] == ["list-c"]
    tenant = await new_tenant(service.stub, "list-keys")
    older, newer = [await issue(service, tenant.id) for _ in range(2)]
    await service.stub.RevokeApiKey(datastore_pb2.RevokeApiKeyRequest(api_key=older))
    keys = (await service.stub.ListApiKeys(datastore_pb2.ListApiKeysRequest(tenant_id=tenant.id))).keys
    assert [k.HasField("revoked_at") for k in keys] == [False, True]  # newest first; no key is ever shown
    too_many = service.stub.ListTenants(datastore_pb2.ListTenantsRequest(limit=1001))
    assert await code_of(too_many) == grpc.StatusCode.INVALID_ARGUMENT
