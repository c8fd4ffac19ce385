"""The DataStore API's requests checked without a server: each bad field is named, good ones come out as stored."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from google.protobuf import timestamp_pb2
from google.protobuf.message import Message

from sluice.common.v1 import common_pb2
from sluice.datastore.v1 import datastore_pb2
from sluice_core.errors import InvalidArgument
from sluice_core.ids import MALFORMED
from sluice_datastore import validation

TENANT = str(uuid.uuid4())
CONVERSATION = str(uuid.uuid4())


def usage(**fields: object) -> datastore_pb2.RecordUsageRequest:
    """A batch of one good record, with ``fields`` changed."""
    record = datastore_pb2.UsageRecord(
        request_id="r1",
        tenant_id=TENANT,
        model="tiny",
        prompt_tokens=10,
        completion_tokens=5,
        queue_ms=1.0,
        time_to_first_token_ms=5.0,
        total_ms=50.0,
        status="length",
    )
    for name, value in fields.items():
        if isinstance(value, timestamp_pb2.Timestamp):
            getattr(record, name).CopyFrom(value)
        else:
            setattr(record, name, value)
    return datastore_pb2.RecordUsageRequest(records=[record])


def append(**fields: object) -> datastore_pb2.AppendMessagesRequest:
    message = datastore_pb2.NewMessage(role=common_pb2.ROLE_USER, content="hi", token_count=1)
    request = {"tenant_id": TENANT, "conversation_id": CONVERSATION, "request_id": "r", "messages": [message]}
    return datastore_pb2.AppendMessagesRequest(**{**request, **fields})  # type: ignore[arg-type]


CHECKS: dict[type[Message], Callable[[Any], object]] = {
    datastore_pb2.GetTenantByApiKeyRequest: validation.api_key,
    datastore_pb2.GetConversationRequest: validation.conversation,
    datastore_pb2.AppendMessagesRequest: validation.new_messages,
    datastore_pb2.RecordUsageRequest: validation.usage_batch,
    datastore_pb2.CreateTenantRequest: validation.new_tenant,
    datastore_pb2.GetTenantRequest: validation.tenant_lookup,
    datastore_pb2.RevokeApiKeyRequest: validation.key_to_revoke,
    datastore_pb2.ListTenantsRequest: validation.tenants_page,
    datastore_pb2.ListApiKeysRequest: validation.keys_page,
}


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (datastore_pb2.GetTenantByApiKeyRequest(), "api_key"),
        (datastore_pb2.GetTenantByApiKeyRequest(api_key="k" * 257), "api_key"),
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
        (datastore_pb2.GetConversationRequest(conversation_id=CONVERSATION), "tenant_id"),
        (datastore_pb2.GetConversationRequest(conversation_id="c", tenant_id=TENANT), "conversation_id"),
        (append(messages=[]), "messages"),
        (append(tenant_id=""), "tenant_id"),
        (append(request_id=""), "request_id"),
        (append(messages=[datastore_pb2.NewMessage(role=9)]), "messages[0].role"),  # type: ignore[arg-type]
        (usage(total_ms=float("nan")), "records[0].timings"),
        (usage(status="x" * 33), "records[0].status"),
        (usage(prompt_tokens=2**31), "records[0].prompt_tokens"),
        (usage(cached_tokens=11), "records[0].cached_tokens"),
        (usage(tenant_id="not-a-uuid"), "records[0].tenant_id"),
        (usage(finished_at=timestamp_pb2.Timestamp(seconds=253402300800)), "records[0].finished_at"),
        (datastore_pb2.GetTenantRequest(), "id"),
        (datastore_pb2.GetTenantRequest(id="acme"), "id"),
        (datastore_pb2.RevokeApiKeyRequest(), "api_key"),
        (datastore_pb2.RevokeApiKeyRequest(key_id="k1"), "key_id"),
        (datastore_pb2.ListTenantsRequest(limit=1001), "limit"),
        (datastore_pb2.ListTenantsRequest(after="x" * 201), "after"),
        (datastore_pb2.ListApiKeysRequest(tenant_id=TENANT, limit=1001), "limit"),
    ],
)
def test_bad_input_names_the_field(request_: Message, field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        CHECKS[type(request_)](request_)
    assert [v.field for v in caught.value.violations] == [field]


@pytest.mark.parametrize("tenant_id", ["not-a-uuid", "{" + TENANT + "}", ""])
def test_an_id_that_is_no_uuid_is_malformed(tenant_id: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validation.tenant_id(tenant_id)
    assert [(v.field, v.description) for v in caught.value.violations] == [("tenant_id", MALFORMED)]


def test_every_problem_is_reported_at_once() -> None:
    message = datastore_pb2.NewMessage(role=9, token_count=2**31)  # type: ignore[arg-type]
    request = datastore_pb2.AppendMessagesRequest(conversation_id="c", tenant_id="t", messages=[message])
    with pytest.raises(InvalidArgument) as caught:
        validation.new_messages(request)
    fields = [v.field for v in caught.value.violations]
    assert fields == ["conversation_id", "tenant_id", "request_id", "messages[0].role", "messages[0].token_count"]


def test_ids_come_back_in_one_spelling() -> None:
    assert validation.tenant_id(uuid.UUID(TENANT).hex.upper()) == TENANT


def test_a_nul_in_a_message_is_kept_as_the_replacement_character() -> None:
    message = datastore_pb2.NewMessage(role=common_pb2.ROLE_ASSISTANT, content="a\x00b", token_count=3)
    new = validation.new_messages(append(messages=[message]))
    assert (new.conversation_id, new.tenant_id, new.request_id) == (CONVERSATION, TENANT, "r")
    assert new.messages == [(common_pb2.ROLE_ASSISTANT, "a\ufffdb", 3)]


def test_a_batch_of_more_than_the_most_records_is_refused() -> None:
    batch = usage()
    batch.records.extend([batch.records[0]] * validation.MAX_BATCH)
    with pytest.raises(InvalidArgument) as caught:
        validation.usage_batch(batch)
    assert [v.field for v in caught.value.violations] == ["records"]


def test_a_usage_record_without_a_time_finished_now() -> None:
    before = datetime.now(UTC)
    (record,) = validation.usage_batch(usage())
    assert record.tenant_id == TENANT and before <= record.finished_at <= datetime.now(UTC)
    stamp = timestamp_pb2.Timestamp(seconds=1_700_000_000)
    (record,) = validation.usage_batch(usage(finished_at=stamp))
    assert record.finished_at == datetime.fromtimestamp(1_700_000_000, UTC)


def test_defaults_fill_what_a_request_leaves_out() -> None:
    tenant = validation.new_tenant(datastore_pb2.CreateTenantRequest(name="acme", tier=datastore_pb2.TIER_FREE))
    assert tenant.scheduling_weight == 1
    assert validation.tenants_page(datastore_pb2.ListTenantsRequest()) == (validation.DEFAULT_PAGE, "")
    assert validation.tenant_lookup(datastore_pb2.GetTenantRequest(name="acme")) == (None, "acme")
    assert validation.key_to_revoke(datastore_pb2.RevokeApiKeyRequest(api_key="sk-x")) == ("sk-x", None)
