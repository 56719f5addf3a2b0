"""Packaging: one import package, a lock that covers pyproject, and the import rules between rooms."""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
ROOMS = ("kvstore", "eviction", "retrieval", "sparse_attn", "service", "connectors")


def _pyproject_requirements() -> dict[str, list[Requirement]]:
    """{list name: requirements}, for the runtime dependencies and each extra (self-references left out)."""
    project = PYPROJECT["project"]
    lists = {"dependencies": project["dependencies"], **project["optional-dependencies"]}
    return {name: [r for r in map(Requirement, reqs) if canonicalize_name(r.name) != "kvtier"] for name, reqs in lists.items()}


def _lock() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        if m:
            pins[canonicalize_name(m.group(1))] = Version(m.group(2))
    return pins


def test_each_dependency_is_listed_once_per_list():
    for name, reqs in _pyproject_requirements().items():
        names = [canonicalize_name(r.name) for r in reqs]
        assert len(names) == len(set(names)), f"{name} lists a package twice: {sorted(n for n in names if names.count(n) > 1)}"


def test_lock_pins_every_pyproject_requirement_within_its_range():
    pins = _lock()
    for list_name, reqs in _pyproject_requirements().items():
        for req in reqs:
            key = canonicalize_name(req.name)
            assert key in pins, f"pyproject's {list_name} names {req.name} but requirements.lock lacks it: run make lock"
            assert req.specifier.contains(pins[key], prereleases=True), (
                f"requirements.lock pins {req.name}=={pins[key]}, outside pyproject's {list_name} range {req.specifier}: run make lock"
            )


def test_lock_pins_the_locked_grpcio_tools_that_generated_the_grpc_code():
    generated = (ROOT / "service/proto/kvtier_pb2_grpc.py").read_text()
    m = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", generated)
    assert m and Version(m.group(1)) == _lock()["grpcio-tools"], "regenerate with python tools/gen_proto.py after make lock"


def test_the_makefile_installs_torch_from_the_lock():
    out = subprocess.run(["make", "-n", "-s", "--no-print-directory", "-f", "Makefile", "-p"], cwd=ROOT, capture_output=True, text=True)
    torch_pin = re.search(r"^TORCH_PIN.*", out.stdout, re.M)
    assert torch_pin and "$(LOCK)" in torch_pin.group(0)


def test_setuptools_packages_cover_every_room_and_nothing_else():
    tool = PYPROJECT["tool"]["setuptools"]
    expected = {"kvtier"}
    for room in ROOMS:
        for init in (ROOT / room).rglob("__init__.py"):
            expected.add("kvtier." + ".".join(init.parent.relative_to(ROOT).parts))
    assert set(tool["packages"]) == expected
    assert tool["package-dir"] == {"kvtier": "kvtier", **{f"kvtier.{room}": room for room in ROOMS}}


def test_bare_room_names_are_not_importable_from_outside_the_checkout(tmp_path):
    code = (
        "import importlib.util, kvtier.kvstore, kvtier.service.cli\n"
        f"print([n for n in {ROOMS!r} if importlib.util.find_spec(n) is not None])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_no_code_imports_the_bare_room_names():
    spec = importlib.util.spec_from_file_location("namespace_imports", ROOT / "tools" / "namespace_imports.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    stale = [
        str(p.relative_to(ROOT))
        for p in mod.python_files([ROOT])
        if mod.rewrite(p.read_text()) != p.read_text() and p.resolve() != (ROOT / "tools" / "namespace_imports.py").resolve()
    ]
    assert stale == [], f"bare imports of kvtier's rooms (run python tools/namespace_imports.py): {stale}"


def _kvtier_imports(room: str) -> dict[str, set[str]]:
    """{file: the kvtier rooms it imports} for every module of a room (absolute and relative imports)."""
    found = {}
    for path in (ROOT / room).rglob("*.py"):
        rooms = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against the file's package
                    pkg = path.parent.relative_to(ROOT).parts
                    base = pkg[: len(pkg) - (node.level - 1)]
                    names = [".".join((*base, node.module)) if node.module else ".".join(base)]
                    names = ["kvtier." + n for n in names]
                elif node.module:
                    names = [node.module] + ([f"kvtier.{a.name}" for a in node.names] if node.module == "kvtier" else [])
            for n in names:
                parts = n.split(".")
                if parts[0] == "kvtier" and len(parts) > 1 and parts[1] in ROOMS:
                    rooms.add(parts[1])
        found[str(path.relative_to(ROOT))] = rooms - {room}
    return found


@pytest.mark.parametrize(
    "room,allowed",
    [
        ("kvstore", set()),
        ("sparse_attn", set()),
        ("eviction", {"kvstore", "sparse_attn", "retrieval"}),
        ("retrieval", {"kvstore", "sparse_attn"}),
        ("connectors", {"kvstore", "eviction", "retrieval", "sparse_attn", "service"}),
        ("service", {"kvstore", "eviction", "retrieval", "sparse_attn"}),
    ],
)
def test_imports_go_one_way(room, allowed):
    bad = {f: sorted(r - allowed) for f, r in _kvtier_imports(room).items() if r - allowed}
    assert bad == {}, f"{room} may import only {sorted(allowed)}: {bad}"


def test_connectors_reach_the_service_only_through_its_client():
    # ... and, for an in-process store built exactly as `kvtier serve` builds its own (the vLLM
    # connector's `url: inprocess`), through the settings class and the store builder.
    allowed = {
        "kvtier.service.client",
        "kvtier.service.grpc_client",
        "kvtier.service.wire",
        "kvtier.service.settings",
        "kvtier.service.storebuild",
    }
    bad = []
    for path in (ROOT / "connectors").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kvtier.service") and node.module not in allowed:
                bad.append(f"{path.name}: {node.module}")
    assert bad == []
