"""The settings every service has; each service subclasses them with its own prefix."""

from __future__ import annotations

import difflib
import os
import socket
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


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
