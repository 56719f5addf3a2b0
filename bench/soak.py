"""Soak: mixed traffic from several tenants over REST and gRPC while Redis and kvtier are killed.

    python bench/soak.py [--quick | --minutes N] [--out FILE]

One ``kvtier serve`` (REST + gRPC, 3 tenants, device/host/disk tiers with disk write-through,
Redis written through) on loopback, and a private redis-server. Worker threads (REST and gRPC,
each a tenant) put chains of blocks, get, look up, delete, and rewrite deleted keys with other
bytes, for the whole run. Meanwhile, in turn: Redis is killed (SIGKILL) and restarted empty,
kvtier is killed (SIGKILL) and restarted on the same data directory, and kvtier is stopped
gracefully (SIGTERM) and restarted. At the end every block that was acknowledged is read back:

- lost: an acknowledged block (not deleted since) that is a miss (disk write-through makes every
  acknowledged block durable, so the goal is 0);
- corrupt: bytes that are no version ever written under the key;
- stale: an older version of the key's bytes (deleted and rewritten), or a deleted block found;
- 5xx: REST answers >= 500 and gRPC INTERNAL/UNKNOWN/CANCELLED (connection failures while kvtier is
  down are counted apart as ``unavailable``; a gRPC CANCELLED while the harness itself stops or kills
  kvtier is the server going away, counted apart as ``grpc_cancelled_during_stop``: we never cancel);
- peak RSS of the kvtier process (every incarnation).

Goals: 0 corrupt, 0 stale, 0 lost, 0 5xx. ``--quick`` (15 s of traffic, a Redis kill and a kvtier
kill) runs in under a minute; the figures go to
bench/results/soak.json and soak.md (soak_quick.* with --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.modules.pop("service", None)
from bench.common import ROOT, free_port, md_table, save_results  # noqa: E402

import httpx  # noqa: E402
import torch  # noqa: E402

from kvtier.kvstore import KVSpec, Namespace, chain_hashes  # noqa: E402
from kvtier.service.client import KVTierClient, KVTierError  # noqa: E402
from kvtier.service.grpc_client import KVTierGrpcClient  # noqa: E402

SPEC = KVSpec("soak", num_layers=4, num_kv_heads=2, head_dim=64, dtype="float16", block_tokens=32)  # 64 KiB blocks
KEYS = {"soak-key-tenant-a": "alpha", "soak-key-tenant-b": "beta", "soak-key-tenant-c": "gamma"}


def block_of(seed: int) -> torch.Tensor:
    return torch.randn(SPEC.block_shape, generator=torch.Generator().manual_seed(seed)).half()


class Redis:
    """A redis-server on a fixed port that can be killed and started again (empty: no persistence)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="kvtier-soak-redis-")
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                shutil.which("redis-server"),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                "--protected-mode",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        import redis

        deadline = time.time() + 10
        while True:
            try:
                redis.Redis(port=self.port).ping()
                return
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(0.05)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class Service:
    """``kvtier serve`` on fixed ports and one data directory, killed and restarted at will."""

    def __init__(self, redis_url: str) -> None:
        self.port, self.grpc_port = free_port(), free_port()
        self.dir = tempfile.mkdtemp(prefix="kvtier-soak-svc-")
        self.env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "KVTIER_PORT": str(self.port),
            "KVTIER_GRPC_PORT": str(self.grpc_port),
            "KVTIER_DATA_DIR": self.dir,
            "KVTIER_LOG_LEVEL": "warning",
            "KVTIER_REDIS_URL": redis_url,
            "KVTIER_API_KEYS": json.dumps(KEYS),
            "KVTIER_ADMIN_KEY": "soak-admin-key-0000",
            "KVTIER_DEVICE_CAPACITY_BYTES": "8MiB",
            "KVTIER_HOST_CAPACITY_BYTES": "16MiB",
            "KVTIER_DISK_CAPACITY_BYTES": "2GiB",
            "KVTIER_DISK_WRITE_THROUGH": "true",
            "KVTIER_REDIS_RETRY_INTERVAL_S": "0.5",
            "KVTIER_REDIS_SOCKET_TIMEOUT_S": "1",
        }
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"
        self.log = open(os.path.join(self.dir, "serve.log"), "ab")
        self.proc = None
        self.peak_rss = 0
        self.start()

    def start(self, timeout_s: float = 60) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvtier.service.cli", "serve"], cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise SystemExit(f"kvtier serve exited with {self.proc.returncode}")
            time.sleep(0.1)
        raise SystemExit("kvtier serve did not start")

    def sample_rss(self) -> None:
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith(("VmHWM:", "VmRSS:")):
                        self.peak_rss = max(self.peak_rss, int(line.split()[1]) * 1024)
        except OSError:
            pass

    def stop(self, sig=signal.SIGTERM) -> None:
        self.sample_rss()
        self.proc.send_signal(sig)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.stop()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class Ledger:
    """What the service acknowledged: key -> the seed of its current bytes, and every older seed."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.current: dict[tuple[str, bytes], int] = {}  # (tenant, key) -> seed of the acknowledged bytes
        self.deleted: dict[tuple[str, bytes], int] = {}  # (tenant, key) -> seed it held when deleted
        self.history: dict[tuple[str, bytes], set[int]] = {}  # every seed ever written under the key
        self.doubt: set[tuple[str, bytes]] = set()  # a delete or rewrite whose answer never came (kvtier killed): either outcome is right
        # keys a worker is deleting or rewriting now: another worker of the same tenant leaves them alone,
        # so the ledger's order of the acknowledgements is the server's order of the operations
        self.busy: set[tuple[str, bytes]] = set()
        self.stopping = threading.Event()  # the harness is stopping kvtier on purpose (SIGTERM or SIGKILL)
        self.stopping_fault = ""  # which: kvtier-term or kvtier-kill
        self.cancelled_in: dict[str, int] = {}  # fault -> CANCELLED calls while it happened
        self.counts = {
            "puts": 0,
            "gets": 0,
            "lookups": 0,
            "deletes": 0,
            "rewrites": 0,
            "5xx": 0,
            "unavailable": 0,
            "get_misses": 0,
            "get_wrong": 0,
            "cancelled_during_stop": 0,
        }

    def count(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.counts[name] += n


class Worker(threading.Thread):
    def __init__(self, wid: int, api_key: str, transport: str, svc: Service, ledger: Ledger, stop: threading.Event, seed: int) -> None:
        super().__init__(name=f"soak-{wid}", daemon=True)
        self.wid, self.api_key, self.transport, self.svc, self.ledger, self.stop = wid, api_key, transport, svc, ledger, stop
        self.tenant = KEYS[api_key]
        self.rng = random.Random(seed)
        self.seq = 0
        self.model = None

    def client(self):
        if self.transport == "grpc":
            return KVTierGrpcClient(self.svc.grpc_target, self.api_key, retries=0, timeout=10)
        return KVTierClient(self.svc.url, self.api_key, retries=0, timeout=10)

    def run(self) -> None:
        c = self.client()
        while not self.stop.is_set():
            self.inflight = None
            try:
                if self.model is None:
                    self.model = c.register_spec(SPEC)
                self.step(c)
            except KVTierError as e:
                if not (e.code == "UNAVAILABLE" and "failed to connect" in e.message.lower()):  # never sent: no doubt
                    self.in_doubt()
                down = self.transport == "grpc" and e.code == "UNAVAILABLE"  # connection refused while kvtier restarts
                if self.transport == "grpc" and e.code == "CANCELLED" and self.ledger.stopping.is_set():
                    # the server cancelled the call because the harness was stopping it: the server went
                    # away, as a refused connection (its outcome is in doubt, counted above); any other
                    # CANCELLED (we never cancel a call) is counted a 5xx below
                    self.ledger.count("cancelled_during_stop")
                    with self.ledger.lock:
                        f = self.ledger.stopping_fault
                        self.ledger.cancelled_in[f] = self.ledger.cancelled_in.get(f, 0) + 1
                    down = True
                if e.status >= 500 and not down:
                    self.ledger.count("5xx")
                    print(f"  5xx from {self.transport}: {e}", flush=True)
                else:
                    self.ledger.count("unavailable")  # kvtier down or restarting (connection refused, 503 UNAVAILABLE)
                    time.sleep(0.05)
            except (httpx.HTTPError, OSError) as e:
                if not isinstance(e, httpx.ConnectError):  # a refused connection sent nothing: no doubt
                    self.in_doubt()
                self.ledger.count("unavailable")
                time.sleep(0.05)
            finally:
                if self.inflight is not None:
                    with self.ledger.lock:
                        self.ledger.busy.discard(self.inflight)
        c.close()

    def claim(self, candidates: list) -> tuple[str, bytes] | None:
        """One of ``candidates`` no other worker is deleting or rewriting now, marked busy (None: all are)."""
        free = [k for k in candidates if k not in self.ledger.busy]
        if not free:
            return None
        key = self.rng.choice(free)
        with self.ledger.lock:
            if key in self.ledger.busy:
                return None
            self.ledger.busy.add(key)
        self.inflight = key
        return key

    def in_doubt(self) -> None:
        if self.inflight is not None:
            with self.ledger.lock:
                self.ledger.doubt.add(self.inflight)

    def step(self, c) -> None:
        L, r = self.ledger, self.rng.random()
        with L.lock:
            mine = [k for k in L.current if k[0] == self.tenant]
            gone = [k for k in L.deleted if k[0] == self.tenant]
        if r < 0.35 or not mine:  # put a new chain of 1-3 blocks
            n = self.rng.randint(1, 3)
            self.seq += 1
            keys = chain_hashes(
                SPEC, [self.rng.randrange(50000) for _ in range(SPEC.block_tokens * n)], Namespace(salt=f"w{self.wid}-{self.seq}")
            )
            seeds = [self.rng.randrange(1 << 30) for _ in keys]
            stored = c.put(self.model, keys, torch.stack([block_of(s) for s in seeds]))
            with L.lock:
                L.counts["puts"] += 1
                for k, s, ok in zip(keys, seeds, stored):
                    if ok:
                        L.current[(self.tenant, k)] = s
                        L.history.setdefault((self.tenant, k), set()).add(s)
        elif r < 0.70:  # get
            key = self.rng.choice(mine)
            with L.lock:
                want = L.current.get(key)
            got = c.get(self.model, [key[1]])[0]
            L.count("gets")
            if got is None:
                L.count("get_misses")
            elif want is not None and not torch.equal(got, block_of(want)):
                with L.lock:
                    still = L.current.get(key) == want  # not rewritten meanwhile by this tenant's other worker
                if still:
                    L.count("get_wrong")
        elif r < 0.85:  # lookup by hashes
            c.lookup(self.model, hashes=[self.rng.choice(mine)[1]])
            L.count("lookups")
        elif r < 0.95:  # delete
            key = self.claim(mine)
            if key is None:
                return
            c.delete(self.model, [key[1]])
            with L.lock:
                L.counts["deletes"] += 1
                if key in L.current:
                    L.deleted[key] = L.current.pop(key)
        elif gone:  # rewrite a deleted key with other bytes
            key = self.claim(gone)
            if key is None:
                return
            seed = self.rng.randrange(1 << 30)
            with L.lock:
                L.history.setdefault(key, set()).add(seed)  # it may land even if the answer is lost
            if c.put(self.model, [key[1]], block_of(seed)[None]) == [True]:
                with L.lock:
                    L.counts["rewrites"] += 1
                    L.deleted.pop(key, None)
                    L.current[key] = seed
                    L.history.setdefault(key, set()).add(seed)


def verify(svc: Service, ledger: Ledger) -> dict:
    out = {"checked": 0, "lost": 0, "corrupt": 0, "stale": 0, "deleted_checked": 0, "stale_older": 0, "stale_deleted": 0, "in_doubt": 0}
    clients = {t: KVTierClient(svc.url, k, retries=3, timeout=30) for k, t in KEYS.items()}
    try:
        models = {t: c.register_spec(SPEC) for t, c in clients.items()}
        by_tenant: dict[str, list] = {}
        for (t, k), s in ledger.current.items():
            by_tenant.setdefault(t, []).append((k, s))
        for t, items in by_tenant.items():
            for i in range(0, len(items), 32):
                part = items[i : i + 32]
                got = clients[t].get(models[t], [k for k, _ in part])
                for (k, s), g in zip(part, got):
                    out["checked"] += 1
                    if (t, k) in ledger.doubt:  # its delete or rewrite may or may not have happened: only wrong bytes count
                        out["in_doubt"] += 1
                        if g is not None and not any(torch.equal(g, block_of(o)) for o in ledger.history.get((t, k), ())):
                            out["corrupt"] += 1
                        continue
                    if g is None:
                        out["lost"] += 1
                        if os.environ.get("SOAK_DEBUG"):
                            import redis as _r
                            from kvtier.service.tenancy import KeySpace

                            sk = KeySpace(t).storage_key(k)
                            rk = f"kvtier:{SPEC.short_fingerprint}:{sk.hex()}"
                            print(
                                "lost",
                                t,
                                k.hex()[:12],
                                "versions:",
                                len(ledger.history.get((t, k), ())),
                                "redis:",
                                _r.Redis.from_url(os.environ["SOAK_REDIS"]).exists(rk),
                                "disk:",
                                any(p.name.startswith(sk.hex()) for p in __import__("pathlib").Path(svc.dir).rglob("*.kvf")),
                            )
                    elif not torch.equal(g, block_of(s)):
                        older = ledger.history.get((t, k), set()) - {s}
                        stale = any(torch.equal(g, block_of(o)) for o in older)
                        out["stale" if stale else "corrupt"] += 1
                        out["stale_older"] += stale
        for t, k in ledger.deleted:
            if (t, k) in ledger.doubt:
                continue
            out["deleted_checked"] += 1
            if clients[t].get(models[t], [k])[0] is not None:
                out["stale"] += 1  # a deleted block came back
                out["stale_deleted"] += 1
                if os.environ.get("SOAK_DEBUG"):
                    import redis as _r
                    from kvtier.service.tenancy import KeySpace

                    sk = KeySpace(t).storage_key(k)
                    rk = f"kvtier:{SPEC.short_fingerprint}:{sk.hex()}"
                    print(
                        "resurrected",
                        t,
                        k.hex()[:12],
                        "redis:",
                        _r.Redis.from_url(os.environ["SOAK_REDIS"]).exists(rk),
                        "disk:",
                        any(p.name.startswith(sk.hex()) for p in __import__("pathlib").Path(svc.dir).rglob("*.kvf")),
                    )
    finally:
        for c in clients.values():
            c.close()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="15 s of traffic, two faults: under a minute in all")
    ap.add_argument("--minutes", type=float, default=10.0, help="length of the traffic phase (default 10)")
    ap.add_argument("--workers", type=int, default=4, help="worker threads, alternately REST and gRPC (default 4)")
    ap.add_argument("--out", help="also write the JSON figures here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    duration = 15.0 if args.quick else args.minutes * 60
    chaos_every = 5.0 if args.quick else 30.0
    redis = Redis()
    os.environ["SOAK_REDIS"] = redis.url
    svc = Service(redis.url)
    ledger, stop = Ledger(), threading.Event()
    events: list[str] = []
    t_start = time.monotonic()
    try:
        keys = list(KEYS)
        workers = [Worker(i, keys[i % len(keys)], "grpc" if i % 2 else "rest", svc, ledger, stop, seed=i) for i in range(args.workers)]
        for w in workers:
            w.start()
        faults = ["redis-kill", "kvtier-kill", "kvtier-term"]
        nxt, i = t_start + chaos_every, 0
        while time.monotonic() - t_start < duration:
            svc.sample_rss()
            time.sleep(0.2)
            if time.monotonic() >= nxt:
                fault = faults[i % len(faults)]
                i += 1
                t0 = time.monotonic()
                at = t0 - t_start
                if fault == "redis-kill":
                    redis.kill()
                    time.sleep(2.0)
                    redis.start()
                else:
                    ledger.stopping_fault = fault
                    ledger.stopping.set()
                    try:
                        svc.stop(signal.SIGKILL if fault == "kvtier-kill" else signal.SIGTERM)
                        time.sleep(0.5)
                        svc.start()
                    finally:
                        ledger.stopping.clear()
                events.append(f"{at:.1f}s {fault} ({time.monotonic() - t0:.1f}s until it answered again)")
                print("  " + events[-1], flush=True)
                nxt = time.monotonic() + chaos_every
        stop.set()
        for w in workers:
            w.join(30)
        svc.sample_rss()
        t_verify = time.monotonic()
        result = verify(svc, ledger)
        verify_s = time.monotonic() - t_verify
        metrics = httpx.get(svc.url + "/metrics", headers={"Authorization": "Bearer soak-admin-key-0000"}).text
        server_5xx = sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("kvtier_requests_total") and 'status="5' in line
        )
    finally:
        stop.set()
        svc.close()
        redis.close()
    c = ledger.counts
    figures = {
        "quick": args.quick,
        "duration_s": round(duration, 1),
        "workers": args.workers,
        "faults": events,
        "operations": {k: c[k] for k in ("puts", "gets", "lookups", "deletes", "rewrites")},
        "acknowledged_blocks": result["checked"],
        "deleted_blocks": result["deleted_checked"],
        "lost": result["lost"],
        "corrupt": result["corrupt"],
        "stale": result["stale"],
        "stale_older_version": result["stale_older"],
        "stale_deleted_found": result["stale_deleted"],
        "in_doubt": result["in_doubt"],
        "client_5xx": c["5xx"],
        "grpc_cancelled_during_stop": c["cancelled_during_stop"],
        "grpc_cancelled_during": dict(ledger.cancelled_in),
        "server_5xx_last_incarnation": server_5xx,
        "unavailable": c["unavailable"],
        "get_misses_during_run": c["get_misses"],
        "get_wrong_during_run": c["get_wrong"],
        "peak_rss_mib": round(svc.peak_rss / 2**20, 1),
        "verify_s": round(verify_s, 1),
    }
    rows = [[k, v] for k, v in figures.items() if k not in ("faults", "operations")]
    md = (
        f"# Soak ({'--quick' if args.quick else f'--minutes {args.minutes:g}'})\n\n"
        f"{args.workers} workers (REST and gRPC, 3 tenants) for {duration:.0f} s; faults: "
        + "; ".join(events)
        + "\n\noperations: "
        + json.dumps(figures["operations"])
        + "\n\n"
        + md_table(["figure", "value"], rows)
        + "\n\nGoals: 0 lost, 0 corrupt, 0 stale, 0 5xx. `unavailable`: calls that found kvtier down or restarting.\n"
    )
    print(md)
    save_results("soak_quick" if args.quick else "soak", figures, md, args.out)
    ok = result["lost"] == result["corrupt"] == result["stale"] == c["5xx"] == c["get_wrong"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
