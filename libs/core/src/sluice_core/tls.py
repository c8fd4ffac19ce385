"""Mutual TLS on sluice's internal network: who a process is, and who is calling it.

Each process has a certificate naming its identity as a SPIFFE ID
(``spiffe://sluice.local/queue``) and trusts one authority. With TLS set, a
service's port takes only callers that show a certificate from that
authority, and of those only the identities it was told to take (Envoy and
the operator's tools, by default) and itself; its calls out show its own.
Which identity may call which internal route is decided at Envoy.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509


@dataclass(frozen=True)
class TlsFiles:
    """One identity's certificate and key, and the authority to trust, as PEM files."""

    ca: Path
    cert: Path
    key: Path

    @cached_property
    def identity(self) -> str:
        """The SPIFFE ID in the certificate: its first URI name."""
        cert = x509.load_pem_x509_certificate(self.cert.read_bytes())
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier
        )
        if not uris:
            raise ValueError(f"{self.cert} names no identity (a spiffe:// URI)")
        return str(uris[0])

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key.read_bytes(), self.cert.read_bytes())],
            root_certificates=self.ca.read_bytes(),
            require_client_auth=True,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.ca.read_bytes(), self.key.read_bytes(), self.cert.read_bytes())


def peer_identity(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    """The caller's SPIFFE ID, from the certificate it showed; None without one."""
    values = list(context.auth_context().get("peer_spiffe_id") or ())
    return values[0].decode() if values else None
