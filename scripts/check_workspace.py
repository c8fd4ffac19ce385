"""Fail when a list of packages in pyproject.toml misses a package or names one that is gone (``make lint``).

A package is a folder libs/*/ or services/*/ with a pyproject.toml; the folders in its src/ are what
it brings to import. The Makefile, scripts/lock.sh, pytest, ruff and mypy's ``files`` find the
packages by glob. Two tools cannot: mypy's ``mypy_path`` takes no glob, and import-linter needs the
names, split by its contracts into libraries and services. This check keeps those lists whole.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def source_dirs(layer: str) -> list[Path]:
    """The src/ folders of the packages under ``layer`` (libs or services)."""
    return sorted(p.parent / "src" for p in ROOT.glob(f"{layer}/*/pyproject.toml") if (p.parent / "src").is_dir())


def import_packages(layer: str) -> set[str]:
    return {
        module.name
        for src in source_dirs(layer)
        for module in src.iterdir()
        if module.is_dir() and module.name.isidentifier() and module.name != "__pycache__"
    }


def compare(where: str, listed: list[str], wanted: set[str]) -> list[str]:
    return [f"{where}: add {name!r}" for name in sorted(wanted - set(listed))] + [
        f"{where}: remove {name!r}, no package has it" for name in sorted(set(listed) - wanted)
    ]


def main() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    linter = config["tool"]["importlinter"]
    contracts = {contract.get("id"): contract for contract in linter["contracts"]}
    libraries, services = import_packages("libs"), import_packages("services")
    sources = {str(src.relative_to(ROOT)) for layer in ("libs", "services") for src in source_dirs(layer)}
    problems = [
        *compare("[tool.mypy] mypy_path (':'-separated)", config["tool"]["mypy"]["mypy_path"].split(":"), sources),
        *compare("[tool.importlinter] root_packages", linter["root_packages"], libraries | services),
        *compare(
            "the contract libraries-import-no-service, source_modules",
            contracts["libraries-import-no-service"]["source_modules"],
            libraries,
        ),
        *compare(
            "the contract libraries-import-no-service, forbidden_modules",
            contracts["libraries-import-no-service"]["forbidden_modules"],
            services,
        ),
        *compare(
            "the contract services-import-no-other-service, modules",
            contracts["services-import-no-other-service"]["modules"],
            services,
        ),
    ]
    if problems:
        sys.exit(
            "pyproject.toml's lists of packages differ from the folders libs/*/ and services/*/:\n"
            + "\n".join(f"  {problem}" for problem in problems)
        )


if __name__ == "__main__":
    main()
