"""``sluice admin``: tenants and API keys, through the DataStore API (Envoy's internal listener)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc

from sluice.datastore.v1 import datastore_pb2, datastore_pb2_grpc
from sluice_cli.arguments import UINT32_MAX, whole_number
from sluice_core import certificates
from sluice_core.channels import channel
from sluice_core.errors import from_rpc_error

TIERS = {
    "free": datastore_pb2.TIER_FREE,
    "standard": datastore_pb2.TIER_STANDARD,
    "premium": datastore_pb2.TIER_PREMIUM,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="127.0.0.1:8081", help="Envoy's internal listener (default %(default)s)")
    parser.add_argument(
        "--tls-dir",
        type=Path,
        default=Path(".sluice/tls"),
        help="the folder with ca.pem, admin.pem and admin-key.pem, the operator's identity (default %(default)s, "
        "as `sluice up` makes it); if it does not exist, the call is made without TLS",
    )
    actions = parser.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create-tenant", help="create a tenant")
    create.add_argument("name")
    create.add_argument("--tier", choices=sorted(TIERS), default="standard")
    # Only what the wire can carry is checked here; the data-access service names any value out of its bounds.
    create.add_argument(
        "--weight", type=whole_number(1, UINT32_MAX), default=1, help="share of model slots under contention"
    )
    create.add_argument("--requests-per-minute", type=whole_number(0, UINT32_MAX), default=0, help="0: no limit")
    create.add_argument("--tokens-per-minute", type=whole_number(0, UINT32_MAX), default=0, help="0: no limit")
    issue = actions.add_parser("issue-key", help="issue an API key (printed once)")
    issue.add_argument("tenant", help="the tenant's name or id")
    revoke = actions.add_parser("revoke-key", help="revoke an API key (by the key or its id)")
    revoke.add_argument("key")
    tenants = actions.add_parser("list-tenants", help="tenants in name order, with their limits")
    tenants.add_argument("--after", default="", help="start after this tenant's name (the next page)")
    tenants.add_argument("--limit", type=whole_number(1, 1000), default=100, help="at most this many (%(default)s)")
    keys = actions.add_parser("list-keys", help="a tenant's API keys (ids and dates; keys are never shown again)")
    keys.add_argument("tenant", help="the tenant's name or id")


async def tenant_id(stub: datastore_pb2_grpc.DataStoreAsyncStub, name_or_id: str) -> str:
    request = datastore_pb2.GetTenantRequest(name=name_or_id)
    if len(name_or_id) == 36 and name_or_id.count("-") == 4:
        request = datastore_pb2.GetTenantRequest(id=name_or_id)
    return str((await stub.GetTenant(request)).id)


async def ensure_tenant_key(
    stub: datastore_pb2_grpc.DataStoreAsyncStub, name: str, requests_per_minute: int = 0, tokens_per_minute: int = 0
) -> str:
    """A new API key for tenant ``name``, creating the tenant (with these limits) if there is none."""
    try:
        found = await tenant_id(stub, name)
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            raise
        create = datastore_pb2.CreateTenantRequest(
            name=name,
            tier=datastore_pb2.TIER_STANDARD,
            requests_per_minute=requests_per_minute,
            tokens_per_minute=tokens_per_minute,
        )
        found = (await stub.CreateTenant(create)).id
    return str((await stub.IssueApiKey(datastore_pb2.IssueApiKeyRequest(tenant_id=found))).api_key)


async def run(args: argparse.Namespace) -> int:
    tls = certificates.files(args.tls_dir, "admin") if args.tls_dir.is_dir() else None
    connected = channel(args.target, tls)
    stub = datastore_pb2_grpc.DataStoreStub(connected)
    try:
        match args.action:
            case "create-tenant":
                tenant = await stub.CreateTenant(
                    datastore_pb2.CreateTenantRequest(
                        name=args.name,
                        tier=TIERS[args.tier],
                        scheduling_weight=args.weight,
                        requests_per_minute=args.requests_per_minute,
                        tokens_per_minute=args.tokens_per_minute,
                    )
                )
                print(f"tenant {tenant.name}: {tenant.id}")
            case "issue-key":
                issued = await stub.IssueApiKey(
                    datastore_pb2.IssueApiKeyRequest(tenant_id=await tenant_id(stub, args.tenant))
                )
                print(f"api key (shown once): {issued.api_key}\nkey id: {issued.key_id}")
            case "list-tenants":
                listed = await stub.ListTenants(datastore_pb2.ListTenantsRequest(limit=args.limit, after=args.after))
                for tenant in listed.tenants:
                    tier = datastore_pb2.Tier.Name(tenant.tier).removeprefix("TIER_").lower()
                    print(
                        f"{tenant.name}\t{tenant.id}\t{tier}\tweight {tenant.scheduling_weight}\t"
                        f"{tenant.requests_per_minute or 'unlimited'} requests/min\t"
                        f"{tenant.tokens_per_minute or 'unlimited'} tokens/min"
                    )
            case "list-keys":
                of_tenant = datastore_pb2.ListApiKeysRequest(tenant_id=await tenant_id(stub, args.tenant))
                for key in (await stub.ListApiKeys(of_tenant)).keys:
                    created = key.created_at.ToDatetime().isoformat(timespec="seconds")
                    state = (
                        f"revoked {key.revoked_at.ToDatetime().isoformat(timespec='seconds')}"
                        if key.HasField("revoked_at")
                        else "active"
                    )
                    print(f"{key.key_id}\tcreated {created}\t{state}")
            case _:
                key = args.key
                by_id = len(key) == 36 and key.count("-") == 4
                request = (
                    datastore_pb2.RevokeApiKeyRequest(key_id=key)
                    if by_id
                    else datastore_pb2.RevokeApiKeyRequest(api_key=key)
                )
                revoked = (await stub.RevokeApiKey(request)).revoked
                print("revoked" if revoked else "no active key matched")
                return 0 if revoked else 1
    except grpc.aio.AioRpcError as exc:
        print(f"error: {exc.code().name}: {from_rpc_error(exc).message}", file=sys.stderr)
        return 1
    finally:
        await connected.close()
    return 0
