"""`sluice generate`'s arguments."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sluice.common.v1 import common_pb2
from sluice.generation.v1 import generation_pb2
from sluice_cli import generate


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    generate.add_arguments(parser)
    return parser.parse_args(["a prompt", *argv])


def test_the_demo_key_is_read_from_the_stacks_state_folder(tmp_path: Path) -> None:
    (tmp_path / "demo-api-key").write_text("sk-demo\n")
    assert generate.api_key(parse("--state-dir", str(tmp_path))) == "sk-demo"
    assert generate.api_key(parse("--state-dir", str(tmp_path), "--api-key", "sk-mine")) == "sk-mine"
    assert generate.api_key(parse("--state-dir", str(tmp_path / "nothing-here"))) is None


def test_an_empty_api_key_sends_none_rather_than_the_demo_key(tmp_path: Path) -> None:
    (tmp_path / "demo-api-key").write_text("sk-demo\n")
    assert generate.api_key(parse("--state-dir", str(tmp_path), "--api-key", "")) is None


@pytest.mark.parametrize(
    "argv", [("--max-tokens", "-5"), ("--max-tokens", "5000000000"), ("--seed", "-1"), ("--top-k", "x")]
)
def test_numbers_out_of_the_apis_range_are_usage_errors(
    argv: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse(*argv)
    assert exited.value.code == 2
    assert f"argument {argv[0]}" in capsys.readouterr().err


class _Stream:
    """A finished stream, as the client library yields it."""

    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"

    def __init__(self, reason: common_pb2.FinishReason.ValueType) -> None:
        self._events = [
            generation_pb2.GenerateEvent(delta=common_pb2.TokenDelta(text="The river", token_ids=[1, 2])),
            generation_pb2.GenerateEvent(
                finished=generation_pb2.Finished(reason=reason, usage=common_pb2.Usage(completion_tokens=2))
            ),
        ]

    async def __aiter__(self) -> AsyncIterator[generation_pb2.GenerateEvent]:
        for event in self._events:
            yield event


@pytest.mark.parametrize(
    ("reason", "exit_code"), [(common_pb2.FINISH_REASON_LENGTH, 0), (common_pb2.FINISH_REASON_ABORT, 1)]
)
async def test_a_generation_the_server_cut_short_exits_non_zero(
    reason: common_pb2.FinishReason.ValueType,
    exit_code: int,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    class Client:
        def __init__(self, *_: object, **__: object) -> None:
            pass

        async def __aenter__(self) -> Client:
            return self

        async def __aexit__(self, *_: object) -> None:
            pass

        def generate(self, *_: object, **__: object) -> _Stream:
            return _Stream(reason)

    monkeypatch.setattr(generate, "GenerationClient", Client)
    assert await generate.run(parse("--api-key", "sk-mine")) == exit_code
    err = capsys.readouterr().err
    assert ("cut short" in err) == bool(exit_code)
