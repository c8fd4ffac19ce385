"""Rate-limit settings, from ``SLUICE_RATELIMIT_*`` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from sluice_core.settings import ServiceSettings


class RateLimitSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SLUICE_RATELIMIT_")

    config_paths: list[Path] = Field(
        default_factory=lambda: [Path("config/ratelimit")],
        description="YAML files, or folders of them, in envoyproxy/ratelimit's format (JSON list in the env).",
    )
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_timeout_ms: float = Field(
        250.0,
        gt=0,
        description="Longest wait for Redis to answer a pipeline once sent (plus 0.2 ms per call in it); keep it "
        "below Envoy's rate-limit filter timeout.",
    )
    fail_closed: bool = Field(
        False, description="Answer UNAVAILABLE when Redis fails, instead of allowing (fail open)."
    )
    local_cache: bool = Field(True, description="Answer keys known to be over their limit without Redis.")
    near_limit_ratio: float = Field(0.8, gt=0, lt=1, description="Hits past this share of a limit count as near_limit.")
    reload_interval_s: float = Field(
        1.0, gt=0, description="How often the configuration files are checked for changes."
    )
    key_prefix: str = "sluice:rl:"
