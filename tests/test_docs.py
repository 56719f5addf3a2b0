"""The README and docs/: every relative link resolves, the settings table is the generated one,
and `make bench-quick` runs every benchmark. Fast, no network."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# scripts under bench/ that other scripts import: not benchmarks
BENCH_HELPERS = {"common", "refmodel", "model_queries", "vllm_engine"}

_LINK = re.compile(r"(?<!!)\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)


def _without_code(text: str) -> str:
    """The page without fenced code blocks and inline code, where brackets are not links."""
    text = _FENCE.sub("", text)
    return re.sub(r"`[^`\n]*`", "", text)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (hyphens and underscores
    kept), each space a hyphen."""
    text = re.sub(r"[*`]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for line in _FENCE.sub("", path.read_text()).splitlines():
        m = re.match(r"^#{1,6} (.+?)\s*#*\s*$", line)
        if not m:
            continue
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _links(path: Path) -> list[str]:
    return [a or b for a, b in _LINK.findall(_without_code(path.read_text()))]


def test_slug_follows_github():
    assert _slug("Codecs — `bench/codecs.py`") == "codecs--benchcodecspy"
    assert _slug("REST API (`/v1`)") == "rest-api-v1"
    assert _slug("vLLM: `KVTierConnector`") == "vllm-kvtierconnector"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    bad = []
    for link in _links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", link):  # http:, https:, mailto: ...: not checked (no network)
            continue
        target, _, anchor = link.partition("#")
        dest = (page.parent / target).resolve() if target else page
        if not dest.exists():
            bad.append(f"{link}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{link}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert bad == [], f"{page.relative_to(ROOT)} has broken links:\n" + "\n".join(bad)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / link.partition("#")[0]).resolve() for link in _links(ROOT / "README.md")}
    assert sorted(p.name for p in (ROOT / "docs").glob("*.md") if p.resolve() not in linked) == []


def test_readme_stays_a_landing_page():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300


def test_settings_table_is_the_generated_one():
    settings = pytest.importorskip("kvtier.service.settings")
    table = settings.settings_table().strip()
    assert table in (ROOT / "docs/service.md").read_text(), (
        "docs/service.md's settings table differs from `kvtier settings --markdown`: paste the command's output there"
    )


def _benchmarks() -> list[str]:
    return sorted(p.stem for p in (ROOT / "bench").glob("*.py") if p.stem not in BENCH_HELPERS)


def test_every_benchmark_takes_quick_and_is_documented():
    docs = (ROOT / "docs" / "benchmarks.md").read_text()
    for name in _benchmarks():
        assert '"--quick"' in (ROOT / "bench" / f"{name}.py").read_text(), f"bench/{name}.py has no --quick"
        assert re.search(rf"^## .*`bench/{name}\.py`", docs, re.M), f"docs/benchmarks.md has no section for bench/{name}.py"


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_bench_quick_runs_every_benchmark():
    # a dry run (-n) prints the recipes without running them, nor the setup they depend on
    out = subprocess.run(
        ["make", "-n", "bench-quick", "PYTHON=python", "VENV=/nonexistent-venv"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    quick = [line for line in out.stdout.splitlines() if "--quick" in line]
    ran = {name for line in quick for name in re.findall(r"bench/(\w+)\.py", line)}
    assert ran == set(_benchmarks())


def test_readme_in_process_example_runs(tmp_path, capsys):
    """The README's first Python example, as written (its disk tier under tmp_path)."""
    code = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)[0]
    assert '"/tmp/kvtier-demo"' in code
    exec(compile(code.replace('"/tmp/kvtier-demo"', repr(str(tmp_path / "kv"))), "README.md", "exec"), {})
    assert capsys.readouterr().out.strip() == "6 torch.Size([4, 2, 2, 16, 64])"
