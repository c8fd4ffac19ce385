"""Settings of the OpenAI front, from ``SLUICE_OPENAI_*`` environment variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from sluice_core.settings import ServiceSettings


class OpenAISettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SLUICE_OPENAI_")

    queue_target: str = Field(
        "127.0.0.1:8081", description="Where the Generation API is reached: Envoy's internal listener."
    )
    default_max_tokens: int = Field(
        512, ge=1, description="max_tokens of a request that sets none (sluice needs a bound; OpenAI's chat has none)."
    )
    max_body_bytes: int = Field(
        4 * 1024 * 1024,
        ge=1024,
        description="Largest request body taken; larger ones are refused with 413. A body is parsed on the event "
        "loop every stream of this process shares: far more than a model's context holds would only stall them.",
    )
    models_refresh_s: float = Field(
        5.0, gt=0, description="How long the served models' list is reused before the queue is asked again."
    )
