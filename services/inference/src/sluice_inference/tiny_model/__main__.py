"""``python -m sluice_inference.tiny_model DIR`` builds the tiny model into DIR."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from sluice_inference import tiny_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--force", action="store_true", help="rebuild even if an identical build exists")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.force:
        tiny_model.build(args.model_dir)
    else:
        tiny_model.ensure(args.model_dir)


if __name__ == "__main__":
    main()
