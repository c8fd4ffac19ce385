"""Mutual TLS on a service's port: only the authority's certificates, and of those only the callers it takes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sluice_core import certificates, healthcheck
from sluice_core.channels import channel
from sluice_core.server import GrpcServer
from sluice_core.settings import ServiceSettings
from sluice_core.tls import TlsFiles


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tls")
    certificates.ensure(folder)
    return folder


@pytest.fixture(scope="module")
async def address(tls_dir: Path) -> AsyncIterator[str]:
    own = certificates.files(tls_dir, "inference")
    settings = ServiceSettings(drain_delay_s=0, tls_ca=own.ca, tls_cert=own.cert, tls_key=own.key)
    async with GrpcServer(settings, ["test"], handle_signals=False) as server:
        yield f"127.0.0.1:{server.port}"


async def check(address: str, tls: TlsFiles | None) -> grpc.StatusCode:
    async with channel(address, tls) as connected:
        try:
            await health_pb2_grpc.HealthStub(connected).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize(
    ("identity", "code"),
    [
        ("envoy", grpc.StatusCode.OK),
        ("admin", grpc.StatusCode.OK),
        ("inference", grpc.StatusCode.OK),  # itself (a container's own health check)
        ("queue", grpc.StatusCode.PERMISSION_DENIED),  # calls go through Envoy, which decides who may call what
    ],
)
async def test_only_the_identities_a_service_takes_may_call_it(
    address: str, tls_dir: Path, identity: str, code: grpc.StatusCode
) -> None:
    assert await check(address, certificates.files(tls_dir, identity)) == code


async def test_a_caller_without_the_authoritys_certificate_cannot_connect(address: str, tmp_path: Path) -> None:
    assert await check(address, None) == grpc.StatusCode.UNAVAILABLE
    certificates.ensure(tmp_path)  # another authority, the same names
    assert await check(address, certificates.files(tmp_path, "envoy")) == grpc.StatusCode.UNAVAILABLE


def test_tls_needs_all_three_files(tls_dir: Path) -> None:
    with pytest.raises(ValueError, match="together"):
        ServiceSettings(tls_ca=tls_dir / "ca.pem")


async def test_a_containers_health_check_calls_its_own_service_as_itself(address: str, tls_dir: Path) -> None:
    assert await healthcheck.check(address, "", 5, certificates.files(tls_dir, "inference"))
    assert not await healthcheck.check(address, "", 5)  # without TLS it cannot connect


@pytest.mark.parametrize(("identity", "code"), [("queue", "PERMISSION_DENIED"), ("admin", "UNIMPLEMENTED")])
async def test_a_method_the_port_lacks_tells_a_stranger_nothing(
    address: str, tls_dir: Path, identity: str, code: str
) -> None:
    # It answered UNIMPLEMENTED to anyone, and PERMISSION_DENIED only for methods it has: which exist showed.
    async with channel(address, certificates.files(tls_dir, identity)) as connected:
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = connected.unary_unary(
            "/sluice.datastore.v1.DataStore/IssueApiKey"
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(b"", timeout=5)
    assert caught.value.code().name == code
