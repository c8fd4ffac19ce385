"""Data-access settings, from ``SLUICE_DATASTORE_*`` environment variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from sluice_core.settings import ServiceSettings


class DataStoreSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SLUICE_DATASTORE_")

    database_url: str = Field("postgresql://postgres@127.0.0.1:5432/sluice", description="The primary: all writes.")
    replica_urls: list[str] = Field(
        default_factory=list, description="Read replicas (a JSON list); reads go to the primary when empty."
    )
    redis_url: str = "redis://127.0.0.1:6379/0"
    migrate_on_start: bool = Field(True, description="Apply pending migrations before serving (safe with replicas).")
    pool_size: int = Field(10, gt=0, description="Connections per database pool.")
    statement_timeout_ms: int = Field(2000, gt=0)
    redis_timeout_ms: float = Field(50.0, gt=0, description="Longest wait for Redis before going to PostgreSQL.")
    tenant_ttl_s: float = Field(60.0, gt=0, description="How long a tenant stays in Redis.")
    local_tenant_ttl_s: float = Field(5.0, gt=0, description="How long a tenant stays in this process's memory.")
    negative_ttl_s: float = Field(5.0, gt=0, description="How long an unknown API key is remembered as unknown.")
    conversation_ttl_s: float = Field(30.0, gt=0)
    ttl_jitter: float = Field(
        0.1, ge=0, lt=1, description="TTLs vary by up to this share, so keys do not expire together."
    )
    read_your_writes_s: float = Field(5.0, ge=0, description="After a write, read that conversation from the primary.")
