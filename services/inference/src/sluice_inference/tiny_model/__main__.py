"""``python -m sluice_inference.tiny_model [DIR]`` builds the tiny model into DIR (default: the service's setting)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from sluice_inference import tiny_model
from sluice_inference.settings import InferenceSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model_dir", type=Path, nargs="?", help="default: SLUICE_INFERENCE_TINY_MODEL_DIR's value")
    parser.add_argument("--force", action="store_true", help="rebuild even if an identical build exists")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model_dir = args.model_dir or InferenceSettings().tiny_model_dir
    if args.force:
        tiny_model.build(model_dir)
    else:
        tiny_model.ensure(model_dir)


if __name__ == "__main__":
    main()
