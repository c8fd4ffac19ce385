"""The settings every service has; each service subclasses them with its own prefix."""

from __future__ import annotations

import difflib
import os
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from sluice_core.tls import TlsFiles


class ServiceSettings(BaseSettings):
    """Read from ``SLUICE_<SERVICE>_*`` environment variables, once, in ``main``."""

    model_config = SettingsConfigDict(env_ignore_empty=True, extra="forbid", frozen=True)

    host: str = Field("127.0.0.1", description="Address the gRPC server binds; 0.0.0.0 in containers.")
    port: int = Field(0, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="Prometheus /metrics port; unset disables.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    otlp_endpoint: str | None = Field(None, description="OTLP/gRPC collector (host:port); unset exports no spans.")
    shutdown_grace_s: float = Field(30.0, gt=0, description="How long in-flight calls may finish after SIGTERM.")
    drain_delay_s: float = Field(
        1.0, ge=0, description="After SIGTERM, keep accepting calls this long while load balancers see NOT_SERVING."
    )
    replica_id: str = Field("", description="Names this process in traces, logs and replies; host:port when empty.")
    tls_ca: Path | None = Field(
        None,
        description="The certificate authority of sluice's internal network. With tls_cert and tls_key, every "
        "connection in and out is mutual TLS; unset, the port takes whoever connects.",
    )
    tls_cert: Path | None = Field(None, description="This process's certificate (PEM), naming its identity.")
    tls_key: Path | None = Field(None, description="This process's private key (PEM).")
    tls_callers: tuple[str, ...] = Field(
        ("spiffe://sluice.local/envoy", "spiffe://sluice.local/admin"),
        description="With TLS, the identities that may call this port (itself too): Envoy, and the operator's tools.",
    )

    def tls(self) -> TlsFiles | None:
        """The TLS files, if set."""
        if self.tls_ca is None or self.tls_cert is None or self.tls_key is None:
            return None
        return TlsFiles(self.tls_ca, self.tls_cert, self.tls_key)

    @model_validator(mode="after")
    def _tls_whole(self) -> ServiceSettings:
        given = [f for f in ("tls_ca", "tls_cert", "tls_key") if getattr(self, f) is not None]
        if given and len(given) < 3:
            raise ValueError(f"TLS needs tls_ca, tls_cert and tls_key together; only {', '.join(given)} given")
        return self

    @model_validator(mode="after")
    def _no_unknown_variables(self) -> ServiceSettings:
        # pydantic-settings ignores a variable it has no field for: a misspelt setting
        # would be silently left at its default.
        prefix = str(self.model_config.get("env_prefix", "")).upper()
        if prefix:
            known = [prefix + name.upper() for name in type(self).model_fields]
            environment = os.environ  # noqa: TID251 - the settings' own check of what pydantic-settings reads
            unknown = sorted(key for key in environment if key.upper().startswith(prefix) and key.upper() not in known)
            if unknown:
                hints = [
                    f"{key} (did you mean {close[0]}?)"
                    if (close := difflib.get_close_matches(key.upper(), known, 1))
                    else key
                    for key in unknown
                ]
                raise ValueError(f"unknown settings: {', '.join(hints)}")
        return self

    @model_validator(mode="after")
    def _default_replica_id(self) -> ServiceSettings:
        if not self.replica_id:
            # The pid stands in for a port that is only picked at bind time.
            object.__setattr__(self, "replica_id", f"{socket.gethostname()}:{self.port or os.getpid()}")
        return self
