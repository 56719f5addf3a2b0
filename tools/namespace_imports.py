#!/usr/bin/env python3
"""Rewrite bare imports of kvtier's packages to the ``kvtier.*`` namespace (idempotent).

kvtier's top-level folders (``kvstore/``, ``eviction/``, ``retrieval/``, ``sparse_attn/``, ``service/``,
``connectors/``) are installed as ``kvtier.kvstore``, ``kvtier.eviction``, ... This script turns
``from kvstore import X`` into ``from kvtier.kvstore import X``, ``import sparse_attn.prefill as p`` into
``import kvtier.sparse_attn.prefill as p``, ``service.connectors`` into ``kvtier.connectors``, and the
dotted names in string literals (``"service.cli"``, ``"eviction.blocks"``) likewise.

Usage: ``python tools/namespace_imports.py [PATH ...]`` (default: the repository's Python files).
It prints the files it changed; ``--check`` changes nothing and exits 1 if any file would change.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

PACKAGES = ("kvstore", "eviction", "retrieval", "sparse_attn", "service", "connectors")
_P = "|".join(PACKAGES)
ROOT = Path(__file__).resolve().parent.parent
SKIP_DIRS = {".venv", ".venv-vllm", ".git", "build", "node_modules", "__pycache__", ".hypothesis"}

_RULES = [
    # the connectors left the service: service.connectors -> connectors (before the namespace rules)
    (re.compile(r"\bservice\.connectors\b"), "connectors"),
    # the demo and the reference-model loader left the connectors for the kvtier package itself
    (re.compile(r"\b(?:kvtier\.)?connectors\.(demo|refmodel)\b"), r"kvtier.\1"),
    (re.compile(r"^(\s*)from (?:kvtier\.)?connectors import (demo|refmodel)\b", re.M), r"\1from kvtier import \2"),
    (re.compile(r"^(\s*)from (" + _P + r")((?:\.\w+)*) import ", re.M), r"\1from kvtier.\2\3 import "),
    (re.compile(r"^(\s*)import (" + _P + r")((?:\.\w+)+) as (\w+)", re.M), r"\1import kvtier.\2\3 as \4"),
    (re.compile(r"^(\s*)import (" + _P + r")\b(?!\.)(\s+as\s+\w+)?", re.M), r"\1from kvtier import \2\3"),
    # dotted module names inside string literals: "service.cli", 'eviction.blocks', "kvstore.tiers.redis"
    (re.compile(r"""(["'])(""" + _P + r""")((?:\.\w+)+)"""), r"\1kvtier.\2\3"),
    (re.compile(r"""(["'])(""" + _P + r""")(:\w+)"""), r"\1kvtier.\2\3"),
]


def rewrite(text: str) -> str:
    for pattern, repl in _RULES:
        text = pattern.sub(repl, text)
    return text


def python_files(paths: list[Path]):
    for path in paths:
        if path.is_file() and path.suffix == ".py":
            yield path
        elif path.is_dir():
            for p in sorted(path.rglob("*.py")):
                if not SKIP_DIRS.intersection(p.relative_to(path).parts) and "_pb2" not in p.name:
                    yield p


def main(argv: list[str]) -> int:
    check = "--check" in argv
    paths = [Path(a) for a in argv if a != "--check"] or [ROOT]
    changed = []
    for p in python_files(paths):
        if p.resolve() == Path(__file__).resolve():
            continue
        old = p.read_text()
        new = rewrite(old)
        if new != old:
            changed.append(p)
            if not check:
                p.write_text(new)
    for p in changed:
        print(p)
    return 1 if (check and changed) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
