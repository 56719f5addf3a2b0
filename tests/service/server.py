"""A real ``kvtier serve`` process for the integration tests, on free loopback ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.redis_servers import _die_with_parent, free_port

ROOT = Path(__file__).resolve().parents[2]
SMALL = {  # small tiers: tests fill them quickly
    "KVTIER_DEVICE_CAPACITY_BYTES": "1MiB",
    "KVTIER_DEVICE_SLOT_BYTES": "0",
    "KVTIER_HOST_CAPACITY_BYTES": "2MiB",
    "KVTIER_DISK_CAPACITY_BYTES": "4MiB",
}


class ServiceProcess:
    """``python -m service.cli serve`` with the given ``KVTIER_*`` settings; ``url``, ``grpc_target``."""

    def __init__(
        self,
        env: dict[str, str] | None = None,
        *,
        grpc: bool = False,
        data_dir: str | None = None,
        small: bool = True,
        log_level: str = "warning",
    ) -> None:
        """``small``: the tests' small tiers (``SMALL``), else the embedded defaults; ``env`` overrides both."""
        self.port = free_port()
        self.grpc_port = free_port(avoid={self.port}) if grpc else None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="kvtier-svc-")
        self.env = {
            **os.environ,
            **(SMALL if small else {}),
            "KVTIER_PORT": str(self.port),
            "KVTIER_DATA_DIR": self.data_dir,
            "KVTIER_GRPC_PORT": "" if self.grpc_port is None else str(self.grpc_port),
            "KVTIER_LOG_LEVEL": log_level,
            "PYTHONPATH": str(ROOT),
            **(env or {}),
        }
        self.url = f"{'https' if self.env.get('KVTIER_TLS_CERT') else 'http'}://127.0.0.1:{self.port}"
        self.grpc_target = None if self.grpc_port is None else f"127.0.0.1:{self.grpc_port}"
        self.log = Path(self.data_dir) / "serve.log"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self, timeout_s: float = 30.0) -> "ServiceProcess":
        self._logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvtier.service.cli", "serve"],
            cwd=ROOT,
            env=self.env,
            stdout=self._logf,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kvtier serve exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1, verify=False).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.close()
        raise RuntimeError(f"kvtier serve did not answer within {timeout_s}s:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def stop(self, timeout_s: float = 20.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._logf.close()

    close = stop
