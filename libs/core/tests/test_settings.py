"""Service settings from the environment."""

from __future__ import annotations

import pydantic
import pytest
from pydantic_settings import SettingsConfigDict

from sluice_core.settings import ServiceSettings


class _Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SLUICE_EXAMPLE_")

    max_waiting_per_tenant: int = 256


def test_a_setting_is_read_from_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_EXAMPLE_MAX_WAITING_PER_TENANT", "3")
    assert _Settings().max_waiting_per_tenant == 3


def test_a_misspelt_variable_is_refused_with_the_name_it_resembles(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_EXAMPLE_MAX_WAITNG_PER_TENANT", "3")
    with pytest.raises(pydantic.ValidationError, match="did you mean SLUICE_EXAMPLE_MAX_WAITING_PER_TENANT"):
        _Settings()
