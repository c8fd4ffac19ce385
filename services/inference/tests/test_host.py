"""The model host's lifecycle, with a stand-in for vLLM at the engine module's boundary."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import types
from pathlib import Path

import pytest

from sluice_inference.host import ModelHost
from sluice_inference.settings import InferenceSettings


async def test_a_stop_while_loading_still_shuts_down_the_engine_being_built(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    finish_building = threading.Event()
    shut_down = threading.Event()

    class Engine:
        def shutdown(self) -> None:
            shut_down.set()

    def build(*_: object) -> Engine:
        finish_building.wait(5)  # a model that takes a while to load
        return Engine()

    monkeypatch.setitem(sys.modules, "sluice_inference.engine", types.SimpleNamespace(build=build))
    host = ModelHost(InferenceSettings(model=str(tmp_path)))
    starting = asyncio.create_task(host.start())
    await asyncio.sleep(0.05)
    starting.cancel()  # SIGTERM while loading
    with contextlib.suppress(asyncio.CancelledError):
        await starting
    finish_building.set()
    await host.close()
    assert shut_down.is_set(), "the engine built after the stop was left running"
