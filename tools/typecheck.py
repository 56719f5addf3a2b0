#!/usr/bin/env python3
"""Type-check the kvtier package with mypy, as it is installed (``kvtier.kvstore``, ...).

The source tree keeps the rooms as top-level folders and setuptools maps them under ``kvtier.``;
mypy does not run the editable install's import hook, so this builds the installed layout as a
tree of symbolic links under ``build/typecheck/kvtier`` (from pyproject's package-dir) and runs
``mypy -p kvtier`` there with pyproject's ``[tool.mypy]`` settings. Exit status: mypy's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build_tree() -> Path:
    base = ROOT / "build" / "typecheck"
    shutil.rmtree(base, ignore_errors=True)
    pkg = base / "kvtier"
    pkg.mkdir(parents=True)
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for src in (ROOT / package_dir["kvtier"]).glob("*.py"):
        os.symlink(src, pkg / src.name)
    for name, folder in package_dir.items():
        if name != "kvtier":
            os.symlink(ROOT / folder, pkg / name.split(".", 1)[1])
    return base


def main(argv: list[str]) -> int:
    base = build_tree()
    cmd = [
        sys.executable,
        "-m",
        "mypy",
        "--config-file",
        str(ROOT / "pyproject.toml"),
        "--cache-dir",
        str(ROOT / "build" / "mypy-cache"),
        "-p",
        "kvtier",
        *argv,
    ]
    return subprocess.run(cmd, cwd=base).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
