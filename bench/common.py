"""Shared helpers for the benchmark scripts: timing, a private redis-server, a ``kvtier serve``
process, saving results."""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


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


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRedis:
    """A private redis-server on a free loopback port (no persistence), for one benchmark run."""

    def __init__(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise SystemExit("redis-server not found: install Redis (make setup does it as root)")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="kvtier-bench-redis-")
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir, "--protected-mode", "no", "--proto-max-bulk-len", "1gb"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"
        import redis

        deadline = time.time() + 10
        while True:
            try:
                redis.Redis(port=self.port).ping()
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(0.05)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


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


class KVTierServe:
    """``python -m service.cli serve`` on a free loopback port (and a gRPC port with ``grpc=True``),
    its data under a temporary directory; ``env`` adds ``KVTIER_*`` settings. ``close()`` stops it
    with SIGTERM (graceful) and removes the directory."""

    def __init__(self, env: dict[str, str] | None = None, *, grpc: bool = False, log_level: str = "warning",
                 timeout_s: float = 60.0) -> None:
        import httpx

        self.port = free_port()
        self.grpc_port = free_port() if grpc else None
        self.dir = tempfile.mkdtemp(prefix="kvtier-bench-svc-")
        e = {**os.environ, "PYTHONPATH": str(ROOT), "KVTIER_PORT": str(self.port), "KVTIER_DATA_DIR": self.dir,
             "KVTIER_LOG_LEVEL": log_level, "KVTIER_GRPC_PORT": str(self.grpc_port) if grpc else "", **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "kvtier.service.cli", "serve"], cwd=ROOT, env=e)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise SystemExit("kvtier serve did not start")
            time.sleep(0.1)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
