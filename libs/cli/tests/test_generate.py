"""`sluice generate`'s arguments."""

from __future__ import annotations

import argparse
from pathlib import Path

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
