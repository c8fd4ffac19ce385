"""Queue settings, from ``SLUICE_QUEUE_*`` environment variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from sluice_core.settings import ServiceSettings


class QueueSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SLUICE_QUEUE_")

    inference_target: str = Field(
        "127.0.0.1:8081", description="Where inference is reached: Envoy's internal listener, which balances replicas."
    )
    datastore_target: str = Field("127.0.0.1:8081", description="The data-access service (through Envoy).")
    ratelimit_target: str = Field("127.0.0.1:8081", description="The rate-limit service, for budgets (through Envoy).")
    budget_domain: str = Field("sluice-budget", description="The rate-limit domain of per-tenant budgets.")
    usage_batch_size: int = Field(200, gt=0, description="Usage records per write.")
    usage_flush_interval_s: float = Field(0.5, gt=0, description="How often buffered usage records are written.")
    max_in_flight: int = Field(64, gt=0, description="Streams relayed to inference at once; the rest wait.")
    max_waiting: int = Field(256, ge=0, description="Callers allowed to wait; beyond, RESOURCE_EXHAUSTED.")
    retry_after_s: float = Field(1.0, gt=0, description="The retry hint sent with RESOURCE_EXHAUSTED.")
    model_info_ttl_s: float = Field(30.0, gt=0, description="How long the served model's description is cached.")
