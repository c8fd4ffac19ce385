"""The tiny model is the same, byte for byte, every time it is built."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from sluice_inference import tiny_model


def digest(model_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(model_dir.iterdir())}


def test_builds_reproducibly_from_the_fixed_seed(tmp_path: Path) -> None:
    tiny_model.build(tmp_path / "a")
    tiny_model.build(tmp_path / "b")
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    # vLLM's CPU attention refuses a head size of 16; 64 works.
    assert config["hidden_size"] // config["num_attention_heads"] == 64 == config["head_dim"]
    assert config["vocab_size"] == tiny_model.VOCAB_SIZE
    assert tiny_model.is_built(tmp_path / "a")
    assert not tiny_model.is_built(tmp_path / "missing")
