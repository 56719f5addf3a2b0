"""Shared helpers for the benchmark scripts: timing, saving results, and (from the tests' process
helpers, one implementation for both) a private redis-server and a ``kvtier serve`` process."""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# one set of process helpers for tests and benches: a private redis-server, a kvtier serve process
from tests.redis_servers import RedisServer, free_port  # noqa: E402,F401  (free_port re-exported for the benches)
from tests.service.server import ServiceProcess  # noqa: E402


def machine() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPU cores"
    except Exception:
        pass
    return f"{platform.machine()} CPU, {os.cpu_count()} cores, no GPU"


def _times(fn: Callable[[], object], repeat: int, warmup: int) -> list[float]:
    """Sorted wall times of ``repeat`` runs of ``fn`` after ``warmup`` untimed ones (seconds)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)


def best_of(fn: Callable[[], object], repeat: int, warmup: int = 1) -> float:
    """Minimum wall time of ``fn`` over ``repeat`` runs (seconds): the least disturbed run."""
    return _times(fn, repeat, warmup)[0]


def median_of(fn: Callable[[], object], repeat: int, warmup: int = 1) -> float:
    """Median wall time of ``fn`` over ``repeat`` runs (seconds)."""
    times = _times(fn, repeat, warmup)
    return times[len(times) // 2]


def paired_medians(fa: Callable[[], object], fb: Callable[[], object], repeat: int, warmup: int = 1) -> tuple[float, float]:
    """Median wall times of ``fa`` and ``fb`` measured alternately (a, b, a, b, ...), so that both
    see the same machine load: on a shared box the ratio of the two is what to read."""
    for _ in range(warmup):
        fa()
        fb()
    ta, tb = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fa()
        t1 = time.perf_counter()
        fb()
        t2 = time.perf_counter()
        ta.append(t1 - t0)
        tb.append(t2 - t1)
    ta.sort()
    tb.sort()
    return ta[len(ta) // 2], tb[len(tb) // 2]


def LocalRedis() -> RedisServer:
    """A private redis-server on a free loopback port (no persistence; bulk values up to 1 GiB) for one
    benchmark run: the tests' ``RedisServer``, a context manager with ``url`` and ``port``."""
    return RedisServer(extra_args=("--proto-max-bulk-len", "1gb"))


def save_results(name: str, figures: dict, markdown: str, out: str | None) -> None:
    """Write figures to bench/results/<name>.json and .md, and to --out when given."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    figures = {"benchmark": name, "machine": machine(), "date": time.strftime("%Y-%m-%d"), **figures}
    text = json.dumps(figures, indent=2, default=float)
    (RESULTS / f"{name}.json").write_text(text + "\n")
    (RESULTS / f"{name}.md").write_text(markdown.rstrip() + "\n")
    if out:
        Path(out).write_text(text + "\n")
    print(f"\nresults: {RESULTS / (name + '.json')}, {RESULTS / (name + '.md')}" + (f", {out}" if out else ""))


def md_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        lines.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(lines)


class KVTierServe(ServiceProcess):
    """``kvtier serve`` on free loopback ports with the embedded default tiers (the tests'
    ``ServiceProcess``), its data under a temporary directory that ``close()`` removes; ``env`` adds
    ``KVTIER_*`` settings. Stopped with SIGTERM (graceful)."""

    def __init__(self, env: dict[str, str] | None = None, *, grpc: bool = False, log_level: str = "warning") -> None:
        try:
            super().__init__(env, grpc=grpc, small=False, log_level=log_level)
        except RuntimeError as e:
            raise SystemExit(f"kvtier serve did not start: {e}") from None

    def close(self) -> int:  # type: ignore[override]
        code = self.stop(timeout_s=30.0)
        shutil.rmtree(self.data_dir, ignore_errors=True)
        return code
