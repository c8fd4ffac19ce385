"""Install package folders and what they depend on at requirements.lock's versions, each file checked
against the lock's hash: ``python docker/install.py ./libs/core ./services/queue``.

pip cannot hash a folder, so it refuses one in hash-checking mode, and a hash in a constraints file
does not count as pinning a dependency there. So pip first resolves the folders against the lock's
versions without installing anything, then installs the pins that resolve chose with
--require-hashes and no dependencies, and last the folders themselves, also without dependencies.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

LOCK = Path("requirements.lock")


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pip_install(*args: str) -> None:
    if subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *args], check=False).returncode:
        sys.exit("pip install failed (above)")


def main() -> None:
    folders = sys.argv[1:]
    pins = {normalized(line.split("==")[0]): line for line in LOCK.read_text().splitlines() if "==" in line}
    with tempfile.TemporaryDirectory() as tmp:
        constraints, report, pinned = (Path(tmp) / name for name in ("constraints.txt", "report.json", "pinned.txt"))
        constraints.write_text("".join(pin.split(" ")[0] + "\n" for pin in pins.values()))
        pip_install("--dry-run", "--report", str(report), "-c", str(constraints), *folders)
        plan = json.loads(report.read_text())["install"]
        needed = [item["metadata"]["name"] for item in plan if "dir_info" not in item["download_info"]]
        if unpinned := [name for name in needed if normalized(name) not in pins]:
            sys.exit(f"requirements.lock pins none of {unpinned}: run `make lock`")
        pinned.write_text("".join(pins[normalized(name)] + "\n" for name in needed))
        pip_install("--require-hashes", "--no-deps", "-r", str(pinned))
    pip_install("--no-deps", *folders)


if __name__ == "__main__":
    main()
