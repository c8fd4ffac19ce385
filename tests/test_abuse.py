"""Hostile and buggy callers against the whole stack through Envoy: each gets a bounded answer with the
documented status, and well-behaved streams on the same replicas are unaffected."""

from __future__ import annotations

import asyncio
import ssl
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from sluice.common.v1 import common_pb2
from sluice.datastore.v1 import datastore_pb2, datastore_pb2_grpc
from sluice.generation.v1 import generation_pb2, generation_pb2_grpc
from sluice.inference.v1 import inference_pb2, inference_pb2_grpc
from sluice.ratelimit.v1 import budgets_pb2, budgets_pb2_grpc
from sluice_client import GenerationClient, StreamError
from sluice_core import certificates
from sluice_core.channels import channel
from sluice_devstack.stack import LOOPBACK, LocalStack

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

# What an error may weigh, message and details together: well under gRPC's 8 KB metadata limit.
MAX_ERROR_CHARS = 2048


def sampling(max_tokens: int = 8) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True)


class Bystanders:
    """Well-behaved streams running while a hostile call is made."""

    def __init__(self, client: GenerationClient, n: int = 6, max_tokens: int = 200) -> None:
        self._client = client
        self._request = generation_pb2.GenerateRequest(prompt="The river", sampling=sampling(max_tokens))
        self.max_tokens = max_tokens
        self.flowing = [asyncio.Event() for _ in range(n)]
        self.tasks = [asyncio.create_task(self._run(flowing)) for flowing in self.flowing]

    async def _run(self, flowing: asyncio.Event) -> int:
        tokens = 0
        async for event in self._client.generate(self._request, timeout=60):
            tokens += len(event.delta.token_ids)
            flowing.set()
        return tokens

    async def unaffected(self) -> None:
        """Every stream got all its tokens (one cut off raises its StreamError here)."""
        assert await asyncio.gather(*self.tasks) == [self.max_tokens] * len(self.tasks)


@pytest.fixture
async def bystanders(stack: LocalStack) -> AsyncIterator[Bystanders]:
    async with GenerationClient(stack.edge, api_key=stack.demo_api_key) as client:
        running = Bystanders(client)
        await asyncio.gather(*(flowing.wait() for flowing in running.flowing))
        yield running


async def refusal(stack: LocalStack, request: generation_pb2.GenerateRequest) -> StreamError:
    async with GenerationClient(stack.edge, api_key=stack.demo_api_key) as client:
        with pytest.raises(StreamError) as caught:
            async for _ in client.generate(request, timeout=30):
                pass
    return caught.value


@pytest.mark.parametrize(
    "request_",
    [
        pytest.param(
            generation_pb2.GenerateRequest(
                messages=common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(content="x")] * 500),
                sampling=sampling(),
            ),
            id="500 field violations",
        ),
        pytest.param(
            generation_pb2.GenerateRequest(prompt="hi", conversation_id="c" * 40_000, sampling=sampling()),
            id="a 40,000-character conversation id",
        ),
        pytest.param(
            generation_pb2.GenerateRequest(prompt="hi", conversation_id="会" * 4_000, sampling=sampling()),
            id="a conversation id that percent-encodes to 36 KB",
        ),
    ],
)
async def test_an_error_about_huge_input_is_bounded_and_other_callers_streams_go_on(
    stack: LocalStack, bystanders: Bystanders, request_: generation_pb2.GenerateRequest
) -> None:
    refused = await refusal(stack, request_)
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT, refused
    violations = getattr(refused.error, "violations", ())
    assert len(str(refused)) + sum(len(v.field) + len(v.description) for v in violations) < MAX_ERROR_CHARS
    await bystanders.unaffected()


async def test_bytes_that_are_no_request_are_invalid_argument_and_other_callers_streams_go_on(
    stack: LocalStack, bystanders: Bystanders
) -> None:
    async with grpc.aio.insecure_channel(stack.edge) as channel:
        generate: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(
            "/sluice.generation.v1.Generation/Generate"
        )
        for garbage in (b"\xff\xff\xff\xff", b"\x0a\xff\xff\xff\xff\x0f" + b"x" * 100):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in generate(garbage, metadata=(("x-api-key", stack.demo_api_key),), timeout=10):
                    pass
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value
            assert "not a valid sluice.generation.v1.GenerateRequest" in (caught.value.details() or "")
    await bystanders.unaffected()


@pytest.mark.parametrize(
    "credentials",
    [
        pytest.param(("x-api-key", "x-api-key"), id="two x-api-key headers"),
        pytest.param(("x-api-key", "authorization"), id="x-api-key and authorization Bearer"),
        pytest.param(("authorization", "authorization"), id="two authorization headers"),
    ],
)
async def test_a_call_with_more_than_one_credential_is_refused(stack: LocalStack, credentials: tuple[str, str]) -> None:
    # Even the same valid key twice: the edge limits a call as one key, and it must be billed as that one.
    key = stack.demo_api_key
    values = {"x-api-key": key, "authorization": f"Bearer {key}"}
    metadata = tuple((name, values[name]) for name in credentials)
    async with grpc.aio.insecure_channel(stack.edge) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        request = generation_pb2.GenerateRequest(prompt="The river", sampling=sampling())
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stub.Generate(request, metadata=metadata, timeout=10):
                pass
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "one credential" in (caught.value.details() or "")


def internal_calls(connected: grpc.aio.Channel) -> dict[str, Callable[[], Awaitable[object]]]:
    """One call of each kind a stranger on the internal network would want to make, made when called."""
    datastore = datastore_pb2_grpc.DataStoreStub(connected)
    inference = inference_pb2_grpc.InferenceStub(connected)
    budgets = budgets_pb2_grpc.BudgetsStub(connected)
    conversation = datastore_pb2.GetConversationRequest(conversation_id=str(uuid.uuid4()), tenant_id=str(uuid.uuid4()))
    return {
        "issue an API key": lambda: datastore.IssueApiKey(
            datastore_pb2.IssueApiKeyRequest(tenant_id=str(uuid.uuid4()))
        ),
        "create a tenant": lambda: datastore.CreateTenant(
            datastore_pb2.CreateTenantRequest(name="intruder", tier=datastore_pb2.TIER_PREMIUM)
        ),
        "record usage": lambda: datastore.RecordUsage(iter([datastore_pb2.RecordUsageRequest()])),
        "read a conversation": lambda: _first(datastore.GetConversation(conversation)),
        "generate at the engine": lambda: _first(
            inference.Generate(inference_pb2.GenerateRequest(prompt="hi", sampling=sampling()))
        ),
        "spend a budget": lambda: budgets.Reserve(
            budgets_pb2.ReserveRequest(
                budgets=[budgets_pb2.Budget(name="tenant_tokens", owner=str(uuid.uuid4()), limit=1, period_s=60)]
            )
        ),
    }


async def _first(call: AsyncIterable[object]) -> object:
    async for item in call:
        return item
    return None


async def code_of(call: Awaitable[object]) -> grpc.StatusCode:
    try:
        await asyncio.wait_for(call, 10)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("identity", [None, "inference", "datastore", "ratelimit", "openai"])
async def test_the_internal_network_takes_no_call_from_a_stranger_or_another_service(
    stack: LocalStack, identity: str | None
) -> None:
    tls = stack.identity(identity) if identity else None
    async with channel(stack.internal, tls) as connected:
        for what, call in internal_calls(connected).items():
            code = await code_of(call())
            # Without a certificate there is no connection at all; with another service's, no route.
            expected = grpc.StatusCode.UNAVAILABLE if identity is None else grpc.StatusCode.PERMISSION_DENIED
            assert code == expected, f"{what}: {code}"


async def test_the_queue_may_serve_requests_but_not_administer(stack: LocalStack) -> None:
    async with channel(stack.internal, stack.identity("queue")) as connected:
        calls = internal_calls(connected)
        for what in ("issue an API key", "create a tenant"):
            assert await code_of(calls[what]()) == grpc.StatusCode.PERMISSION_DENIED, what
        for what in ("read a conversation", "generate at the engine", "record usage", "spend a budget"):
            assert await code_of(calls[what]()) != grpc.StatusCode.PERMISSION_DENIED, what


async def test_openais_front_may_call_the_public_api_with_a_callers_key_only(stack: LocalStack) -> None:
    async with channel(stack.internal, stack.identity("openai")) as connected:
        generation = generation_pb2_grpc.GenerationStub(connected)
        models = generation.ListModels(generation_pb2.ListModelsRequest())
        assert await code_of(models) == grpc.StatusCode.UNAUTHENTICATED  # routed, then no key
        keyed = generation.ListModels(generation_pb2.ListModelsRequest(), metadata=(("x-api-key", stack.demo_api_key),))
        assert await code_of(keyed) == grpc.StatusCode.OK


def front_status(stack: LocalStack, identity: str | None) -> int | str:
    """What OpenAI's front answers on its own port to a caller showing ``identity``'s certificate."""
    tls = certificates.files(stack.tls_dir, "admin")
    context = ssl.create_default_context(cafile=str(tls.ca))
    context.check_hostname = False
    if identity is not None:
        shown = certificates.files(stack.tls_dir, identity)
        context.load_cert_chain(str(shown.cert), str(shown.key))
    try:
        with urllib.request.urlopen(f"https://{LOOPBACK}:{stack.ports.openai[0]}/health", context=context) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as refused:
        return refused.code
    except (urllib.error.URLError, OSError):
        return "no connection"


async def test_openais_front_takes_only_envoy_and_the_operator(stack: LocalStack) -> None:
    statuses = {who: await asyncio.to_thread(front_status, stack, who) for who in (None, "queue", "admin", "envoy")}
    assert statuses == {None: "no connection", "queue": 403, "admin": 200, "envoy": 200}


@pytest.mark.parametrize("port", ["inference", "datastore", "ratelimit", "queue"])
async def test_a_service_port_takes_only_envoy_and_the_operator(stack: LocalStack, port: str) -> None:
    address = {
        "inference": stack.inference_address(0),
        "datastore": f"{LOOPBACK}:{stack.ports.datastore}",
        "ratelimit": f"{LOOPBACK}:{stack.ports.ratelimit}",
        "queue": f"{LOOPBACK}:{stack.ports.queue[0]}",
    }[port]
    health = health_pb2.HealthCheckRequest()
    for identity, expected in ((None, grpc.StatusCode.UNAVAILABLE), ("queue" if port != "queue" else "inference",
                                grpc.StatusCode.PERMISSION_DENIED), ("admin", grpc.StatusCode.OK)):  # fmt: skip
        async with channel(address, stack.identity(identity) if identity else None) as connected:
            assert await code_of(health_pb2_grpc.HealthStub(connected).Check(health, timeout=5)) == expected, identity


async def test_the_edge_routes_nothing_but_the_public_api(stack: LocalStack) -> None:
    async with grpc.aio.insecure_channel(stack.edge) as connected:
        for what, call in internal_calls(connected).items():
            assert await code_of(call()) == grpc.StatusCode.UNIMPLEMENTED, what


@pytest.mark.parametrize(
    ("request_", "metadata", "code"),
    [
        pytest.param(
            generation_pb2.GenerateRequest(prompt="hi", client_request_id="r" * 1_000_000, sampling=sampling()),
            (),
            grpc.StatusCode.INVALID_ARGUMENT,
            id="a 1 MB client request id",
        ),
        pytest.param(
            generation_pb2.GenerateRequest(
                prompt="hi", sampling=common_pb2.SamplingParams(max_tokens=8, stop=["s" * 300] * 10_000)
            ),
            (),
            grpc.StatusCode.INVALID_ARGUMENT,
            id="10,000 long stop strings",
        ),
        pytest.param(
            generation_pb2.GenerateRequest(prompt="a " * 6_000_000, sampling=sampling()),
            (),
            grpc.StatusCode.INVALID_ARGUMENT,
            id="a 12 MB prompt",
        ),
        pytest.param(
            generation_pb2.GenerateRequest(prompt="hi", sampling=sampling()),
            (("x-api-key", "k" * 7_000),),
            grpc.StatusCode.UNAUTHENTICATED,
            id="a 7 KB API key",
        ),
    ],
)
async def test_huge_fields_get_a_bounded_answer_and_other_callers_streams_go_on(
    stack: LocalStack,
    bystanders: Bystanders,
    request_: generation_pb2.GenerateRequest,
    metadata: tuple[tuple[str, str], ...],
    code: grpc.StatusCode,
) -> None:
    async with grpc.aio.insecure_channel(stack.edge) as edge:
        stub = generation_pb2_grpc.GenerationStub(edge)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stub.Generate(
                request_, metadata=metadata or (("x-api-key", stack.demo_api_key),), timeout=30
            ):
                pass
    assert caught.value.code() == code, caught.value.details()
    assert len(caught.value.details() or "") < MAX_ERROR_CHARS
    await bystanders.unaffected()


async def raw_call(
    stack: LocalStack, *headers: str, message: bool = True, content_type: str = "application/grpc"
) -> bytes:
    """A Generate call as curl sends it, with headers no gRPC library would send; its response headers.
    Without the ``message``, a reply Envoy gives before reading it does not race the upload."""
    frame = generation_pb2.GenerateRequest(prompt="hi", sampling=sampling(1)).SerializeToString()
    body = b"\x00" + len(frame).to_bytes(4, "big") + frame if message else b""
    options = [option for header in headers for option in ("-H", header)]
    curl = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--http2-prior-knowledge", "-D", "-", "-o", "/dev/null", "--max-time", "10",
        "-H", f"content-type: {content_type}", "-H", "te: trailers", *options, "--data-binary", "@-",
        f"http://{stack.edge}/sluice.generation.v1.Generation/Generate",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    answer, error = await curl.communicate(body)
    assert answer, error.decode()
    return answer


async def test_a_call_that_is_not_grpc_is_refused_at_the_edge(stack: LocalStack) -> None:
    # It reached a queue replica, whatever its content-type.
    key = f"x-api-key: {stack.demo_api_key}"
    for content_type in ("text/plain", "application/json", "application/grpcx"):
        headers = await raw_call(stack, key, content_type=content_type, message=False)
        assert headers.startswith(b"HTTP/2 415"), (content_type, headers)
    assert b"grpc-status: 0" in await raw_call(stack, key, content_type="application/grpc+proto")


async def test_a_malformed_grpc_timeout_is_refused_at_the_edge_and_harms_no_other_call(stack: LocalStack) -> None:
    # Sent on to a queue replica, a few of these made other callers' calls with deadlines fail INTERNAL.
    key = f"x-api-key: {stack.demo_api_key}"
    for timeout in ("abc", "1x", "123456789S", "-5S"):
        headers = await raw_call(stack, f"grpc-timeout: {timeout}", key, message=False)
        assert b"grpc-status: 3" in headers and b"malformed grpc-timeout" in headers, (timeout, headers)
    # The longest the protocol allows is no deadline (it was DEADLINE_EXCEEDED at once).
    assert b"grpc-status: 0" in await raw_call(stack, "grpc-timeout: 99999999H", key)
    request = generation_pb2.GenerateRequest(prompt="hi", sampling=sampling(1))
    async with GenerationClient(stack.edge, api_key=stack.demo_api_key) as client:
        for _ in range(24):
            assert [e async for e in client.generate(request, 10)]


async def test_a_deadline_centuries_away_is_no_deadline(stack: LocalStack) -> None:
    # gRPC's clock overflowed on it: DEADLINE_EXCEEDED within 5 ms.
    async with GenerationClient(stack.edge, api_key=stack.demo_api_key) as client:
        request = generation_pb2.GenerateRequest(prompt="hi", sampling=sampling(4))
        events = [e async for e in client.generate(request, timeout=3.6e10)]
    assert events[-1].HasField("finished")


async def test_reflection_on_the_edge_describes_the_public_api_alone(stack: LocalStack) -> None:
    # It described the data-access service's API (CreateTenant, IssueApiKey, ...) to anyone.
    async with grpc.aio.insecure_channel(stack.edge) as edge:
        info: grpc.aio.StreamStreamMultiCallable[
            reflection_pb2.ServerReflectionRequest, reflection_pb2.ServerReflectionResponse
        ] = edge.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        asked = [
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)
            for symbol in ("sluice.generation.v1.Generation", "sluice.datastore.v1.DataStore",
                           "sluice.inference.v1.Inference")
        ]  # fmt: skip
        answers = [answer async for answer in info(iter(asked))]
    found = [answer.HasField("file_descriptor_response") for answer in answers]
    assert found == [True, False, False]


async def test_junk_calls_do_not_eject_a_healthy_queue_replica(stack: LocalStack) -> None:
    # Calls with hopeless deadlines are DEADLINE_EXCEEDED (a 504 to Envoy): a few ejected a replica.
    async def ejections() -> int:
        stats = await stack.envoy_admin(
            "/stats?filter=^cluster[.]queue[.]outlier_detection[.]ejections_enforced_total$"
        )
        return int(stats.split(":")[-1]) if stats else 0

    before = await ejections()
    for _ in range(20):
        assert b"grpc-status: " in await raw_call(stack, "grpc-timeout: 1n", "x-api-key: junk")
    assert await ejections() == before
