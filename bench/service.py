"""Service benchmark: 6 MiB blocks over REST, gRPC and the local transport vs raw redis-py, lookup latency under
64 clients, host-tier latency while a slow tier is busy.

    python bench/service.py [--quick] [--out FILE] [--open-rate LOOKUPS_PER_S] [--only SECTIONS] [--paced-fraction F]

Sections (``--only blocks,lookups,workers,busy``; a partial run is saved as service_sections_quick.*):

In one run on loopback (ratios are what to read; absolute times move with the machine):
  1. put/get of one 6 MiB block through `kvtier serve` (its only tier: a private redis-server), with the
     SDK clients, REST and gRPC, vs raw redis-py SET/GET of the same frame bytes on the same Redis
     (goals: >= 0.5x raw over REST, >= 0.7x over gRPC; ratio = raw time / service time);
  2. lookup latency p50/p99 with 64 concurrent clients (keep-alive HTTP/1.1 connections, closed loop)
     on the embedded default tiers (goal p99 < 5 ms, 0 errors), and the requests/s they reach.
The clients of 2 run in 2 processes of 32 connections each, on the same 2-core box as the server.
  3. the same-host transport (`unix://`, shared memory) in 1 (goal >= 1.5x raw) and 2 (goal p99 <= 5 ms), the
     lookups both closed loop (64 clients back to back: the box saturated, p99 bounded below by queueing,
     mean >= 64 x CPU per lookup / cores) and open loop (64 clients at fixed times, --open-rate lookups/s in
     all, 2,000 by default; latency from the time each lookup was due);
  4. (busy) host-tier gets and lookups over the local transport, idle and while another client keeps an
     fsync'ing disk tier busy with demotions (its writer unpaced, and paced at --paced-fraction of the disk's own
     rate of fsync'ed 6 MiB files measured in the same run), or while Redis (written through) answers 200 ms
     late (goal: p99 busy / idle <= 2x); idle and busy windows alternate; a control runs the unpaced writer
     with nothing reaching the disk, and each row's busy p99 is divided by the control's too. The CPU per
     lookup (server and clients) is reported too: it bounds what p99 a 2-core box can give 64 clients.
  5. (workers) closed-loop lookups, 64 clients over the local transport, against 1 server process (host tier
     only; host tier + Redis) and 2 server processes sharing one Redis, the clients split between them.
Sections 1-2 are ``blocks`` (1 with the transports' no-op floors) and ``lookups`` (2 and 3's lookups).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time

# this file is named like the `service` package: import from the repository root, not from bench/
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.modules.pop("service", None)
from bench.common import KVTierServe, LocalRedis, best_of, free_port, md_table, save_results  # noqa: E402

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from kvtier.kvstore import KVSpec, Namespace, chain_hashes, encode_frame  # noqa: E402
from kvtier.kvstore.codecs.base import tensor_bytes  # noqa: E402

SPEC_6M = KVSpec("bench-6m", num_layers=12, num_kv_heads=4, head_dim=128, dtype="float16", block_tokens=256)  # 6 MiB
SPEC_SMALL = KVSpec("bench-small", num_layers=2, num_kv_heads=2, head_dim=64, dtype="float16", block_tokens=16)
NUM_CLIENTS = 64
CLIENT_PROCS = 2


# -- 1. 6 MiB blocks ---------------------------------------------------------------------------
CONFIGS = {
    # the embedded default without Redis (the usual sidecar): kvtier's host tier only; raw redis-py runs on its own Redis
    "host only": {
        "KVTIER_DEVICE_CAPACITY_BYTES": "0",
        "KVTIER_HOST_CAPACITY_BYTES": "512MiB",
        "KVTIER_DISK_CAPACITY_BYTES": "0",
        "KVTIER_REDIS_URL": "",
    },
    # every put and get goes through Redis: client -> kvtier -> Redis, two hops where raw redis-py makes one
    "redis only": {
        "KVTIER_DEVICE_CAPACITY_BYTES": "0",
        "KVTIER_HOST_CAPACITY_BYTES": "0",
        "KVTIER_DISK_CAPACITY_BYTES": "0",
        "KVTIER_PROMOTE_ON_HIT": "false",
    },
    # the default layout: a host-memory tier in front, Redis written through; gets are served from memory
    "host + redis": {"KVTIER_DEVICE_CAPACITY_BYTES": "0", "KVTIER_HOST_CAPACITY_BYTES": "512MiB", "KVTIER_DISK_CAPACITY_BYTES": "0"},
}


def _tmpdir(prefix: str) -> str:
    """A temporary directory (sockets, data) removed when this process exits."""
    import atexit
    import shutil

    d = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, d, True)
    return d


def bench_blocks(quick: bool, label: str, env: dict) -> dict:
    import redis

    from kvtier.service.client import KVTierClient
    from kvtier.service.grpc_client import KVTierGrpcClient

    repeat = 5 if quick else 20
    spec = SPEC_6M
    block = torch.randn(spec.block_shape, generator=torch.Generator().manual_seed(0)).to(spec.torch_dtype)
    sock = os.path.join(_tmpdir("kvtier-bench-sock-"), "kv.sock")
    with LocalRedis() as lr:
        srv = KVTierServe({"KVTIER_REDIS_URL": lr.url, "KVTIER_LOCAL_SOCKET": sock, **env}, grpc=True)
        try:
            raw = redis.Redis.from_url(lr.url)
            rest = KVTierClient(srv.url)
            grpc_c = KVTierGrpcClient(f"127.0.0.1:{srv.grpc_port}")
            local = KVTierClient(f"unix://{sock}")  # the same SDK class: a unix:// URL is the shared-memory transport
            # the local put as one shot (the client writes the whole request, then the server verifies and copies it),
            # side by side with the streamed put the SDK uses by default (the two overlap)
            local_one_shot = KVTierClient(f"unix://{sock}", stream_puts=False)
            model = rest.register_spec(spec)
            grpc_c.register_spec(spec)
            local.register_spec(spec)
            counter = iter(range(10**9))

            def fresh_key() -> bytes:
                return chain_hashes(spec, np.full(spec.block_tokens, next(counter) % 2**31), Namespace(salt="bench"))[0]

            frame = encode_frame(fresh_key(), spec, "identity", {}, spec.block_shape, spec.dtype, tensor_bytes(block))
            raw_key = b"raw:get"
            raw.set(raw_key, frame)
            put_keys: list[bytes] = []

            def put_with(client):
                def run():
                    k = fresh_key()
                    assert client.put(model, [k], block.unsqueeze(0)) == [True]
                    put_keys.append(k)

                return run

            out = [torch.empty_like(block)]  # an engine loads into its own buffers
            t = {
                "raw_set": [],  # SET of a new key each time: what a put does (a new block), Redis's memory grows
                "raw_set_same_key": [],  # SET overwriting one key: Redis reuses the freed value's memory
                "raw_get": [],
                "rest_put": [],
                "rest_get": [],
                "grpc_put": [],
                "grpc_get": [],
                "local_put": [],
                "local_put_one_shot": [],
                "local_get": [],
            }
            # interleaved rounds, and the least disturbed time of each contender (best_of): on a shared,
            # loaded machine a burst of someone else's work must not decide a ratio
            for _ in range(3):
                raw_new: list[bytes] = []

                def raw_set_new() -> None:
                    raw_new.append(b"raw:put:%d" % next(counter))
                    raw.set(raw_new[-1], frame)

                t["raw_set_same_key"].append(best_of(lambda: raw.set(raw_key + b"s", frame), repeat))
                t["raw_set"].append(best_of(raw_set_new, repeat))
                raw.delete(*raw_new)  # as kvtier's puts are deleted below: each round starts from the same memory
                t["rest_put"].append(best_of(put_with(rest), repeat))
                t["grpc_put"].append(best_of(put_with(grpc_c), repeat))
                t["local_put"].append(best_of(put_with(local), repeat))
                t["local_put_one_shot"].append(best_of(put_with(local_one_shot), repeat))
                for i in range(0, len(put_keys) - 1, 64):  # max_blocks_per_request per delete
                    rest.delete(model, put_keys[i : min(i + 64, len(put_keys) - 1)])
                del put_keys[:-1]
                get_key = put_keys[-1]
                t["raw_get"].append(best_of(lambda: raw.get(raw_key), repeat))
                t["rest_get"].append(best_of(lambda: rest.get(model, [get_key], out=out)[0], repeat))
                t["grpc_get"].append(best_of(lambda: grpc_c.get(model, [get_key], out=out)[0], repeat))
                t["local_get"].append(best_of(lambda: local.get(model, [get_key], out=out)[0], repeat))
            got = rest.get(model, [get_key])[0]
            assert got is not None and torch.equal(got, block)
            assert torch.equal(local.get(model, [get_key])[0], block)
            local.close()
            local_one_shot.close()
            rest.close()
            grpc_c.close()
        finally:
            srv.close()
    t = {k: float(min(v)) for k, v in t.items()}
    mb = spec.block_nbytes / 1e6
    res = {"config": label, "block_bytes": spec.block_nbytes, "repeat": repeat, **{f"{k}_s": v for k, v in t.items()}}
    for name in ("rest_put", "rest_get", "grpc_put", "grpc_get", "local_put", "local_put_one_shot", "local_get"):
        is_put = "_put" in name
        base = t["raw_set"] if is_put else t["raw_get"]
        res[f"{name}_ratio"] = base / t[name]
        if is_put:
            res[f"{name}_ratio_same_key"] = t["raw_set_same_key"] / t[name]
        print(
            f"[{label}] {name:>9}: {t[name] * 1e3:7.2f} ms ({mb / t[name]:5.0f} MB/s)  raw redis-py {base * 1e3:6.2f} ms  "
            f"ratio {base / t[name]:.2f}x"
            + (f" (SET overwriting one key {t['raw_set_same_key'] * 1e3:.2f} ms: {t['raw_set_same_key'] / t[name]:.2f}x)" if is_put else "")
        )
    return res


def bench_grpc_floor(quick: bool) -> dict:
    """grpcio alone: 6 MiB to and from a servicer that does nothing (the transport's own cost here)."""
    from concurrent import futures

    import grpc

    from kvtier.service.proto import kvtier_pb2 as pb
    from kvtier.service.proto import kvtier_pb2_grpc as pb_grpc

    data = np.random.default_rng(0).bytes(SPEC_6M.block_nbytes)

    class Echo(pb_grpc.KVTierServicer):
        def PutBlocks(self, it, ctx):
            return pb.PutReply(num_stored=sum(len(m.frame) for m in it))

        def GetBlocks(self, req, ctx):
            yield pb.BlockReply(found=True, frame=data)

    opts = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    server = grpc.server(futures.ThreadPoolExecutor(4), options=opts)
    pb_grpc.add_KVTierServicer_to_server(Echo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=opts) as ch:
            stub = pb_grpc.KVTierStub(ch)
            repeat = 5 if quick else 20
            put = best_of(lambda: stub.PutBlocks(iter([pb.PutRequest(frame=data)])), repeat)
            get = best_of(lambda: list(stub.GetBlocks(pb.KeysRequest())), repeat)
    finally:
        server.stop(0)
    print(f"grpcio alone (no-op servicer), 6 MiB: put {put * 1e3:.2f} ms, get {get * 1e3:.2f} ms")
    return {"put_s": put, "get_s": get}


_FLOOR_APP = """
import numpy as np
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

DATA = np.random.default_rng(0).bytes({nbytes})


async def put(request):
    return Response(str(len(await request.body())))


async def get(request):
    return Response(DATA, media_type="application/octet-stream")


app = Starlette(routes=[Route("/put", put, methods=["POST"]), Route("/get", get)])
"""


def bench_rest_floor(quick: bool) -> dict:
    """uvicorn + httpx alone: 6 MiB to and from a Starlette app that does nothing (the REST stack's own cost)."""
    nbytes = SPEC_6M.block_nbytes
    data = np.random.default_rng(0).bytes(nbytes)
    d = _tmpdir("kvtier-bench-floor-")
    with open(os.path.join(d, "floorapp.py"), "w") as f:
        f.write(_FLOOR_APP.format(nbytes=nbytes))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "floorapp:app", "--port", str(port), "--log-level", "warning"],
        cwd=d,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            deadline = time.time() + 30
            while True:
                try:
                    c.get("/put")
                    break
                except httpx.TransportError:
                    if time.time() > deadline:
                        raise RuntimeError("the bare uvicorn app did not start") from None
                    time.sleep(0.1)
            repeat = 5 if quick else 20
            put = best_of(lambda: c.post("/put", content=data), repeat)
            get = best_of(lambda: c.get("/get").content, repeat)
    finally:
        proc.terminate()
        proc.wait(10)
    print(f"uvicorn + httpx alone (no-op Starlette app), 6 MiB: put {put * 1e3:.2f} ms, get {get * 1e3:.2f} ms")
    return {"put_s": put, "get_s": get}


# -- 2. lookups under 64 concurrent clients ------------------------------------------------------
async def _client_loop(port: int, body: bytes, headers: bytes, n_conns: int, duration_s: float, warmup_s: float, q) -> None:
    lat: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + warmup_s + duration_s
    measure_from = time.perf_counter() + warmup_s
    request = (
        b"POST /v1/lookup HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + headers
        + b"Content-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )
    count = 0

    async def conn():
        nonlocal errors, count
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                break
            writer.write(request)
            try:
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head[9:12])
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                await reader.readexactly(length)
            except (asyncio.IncompleteReadError, ConnectionError):
                errors += 1
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                continue
            t1 = time.perf_counter()
            if t0 >= measure_from:
                lat.append(t1 - t0)
                count += 1
                if status != 200:
                    errors += 1
        writer.close()

    await asyncio.gather(*(conn() for _ in range(n_conns)))
    q.put((lat, errors))


def _client_proc(port, body, headers, n_conns, duration_s, warmup_s, q):
    asyncio.run(_client_loop(port, body, headers, n_conns, duration_s, warmup_s, q))


def _latency_stats(lat: list[float], errors: int, duration: float) -> dict:
    """Requests, errors, p50/p99 (ms) and rate of one concurrent-clients run (latencies in seconds)."""
    lat_ms = np.array(lat) * 1e3
    return {
        "requests": len(lat),
        "errors": errors,
        "p50_ms": float(np.percentile(lat_ms, 50)),
        "p99_ms": float(np.percentile(lat_ms, 99)),
        "rps": len(lat) / duration,
        "clients": NUM_CLIENTS,
        "duration_s": duration,
    }


def bench_lookups(quick: bool) -> dict:
    from kvtier.service.client import KVTierClient

    duration = 3.0 if quick else 15.0
    srv = KVTierServe(
        {"KVTIER_DEVICE_CAPACITY_BYTES": "64MiB", "KVTIER_HOST_CAPACITY_BYTES": "256MiB", "KVTIER_DISK_CAPACITY_BYTES": "1GiB"}
    )
    try:
        spec = SPEC_SMALL
        with KVTierClient(srv.url) as c:
            model = c.register_spec(spec)
            tokens = list(range(spec.block_tokens * 8))  # 8 blocks of 16 tokens
            keys = c.hashes(model, tokens)
            c.put(model, keys[:6], torch.zeros(6, *spec.block_shape, dtype=spec.torch_dtype))
            assert c.lookup(model, hashes=keys).num_blocks == 6
        results = {}
        for label, body in (
            ("by hashes (8 blocks)", {"model": model, "hashes": [k.hex() for k in keys]}),
            ("by token ids (128 tokens)", {"model": model, "token_ids": tokens}),
        ):
            raw = json.dumps(body).encode()
            q = mp.get_context("fork").Queue()
            procs = [
                mp.get_context("fork").Process(
                    target=_client_proc, args=(srv.port, raw, b"", NUM_CLIENTS // CLIENT_PROCS, duration, 1.0, q)
                )
                for _ in range(CLIENT_PROCS)
            ]
            for p in procs:
                p.start()
            lat, errors = [], 0
            for _ in procs:
                l_, e_ = q.get(timeout=duration + 60)
                lat += l_
                errors += e_
            for p in procs:
                p.join()
            r = _latency_stats(lat, errors, duration)
            # one client alone: the latency without queueing behind 63 others
            with httpx.Client(base_url=srv.url) as h:
                single = []
                for _ in range(200 if quick else 1000):
                    t0 = time.perf_counter()
                    assert h.post("/v1/lookup", content=raw, headers={"content-type": "application/json"}).status_code == 200
                    single.append(time.perf_counter() - t0)
            r["single_client_p50_ms"] = float(np.median(single) * 1e3)
            results[label] = r
            print(
                f"lookup {label}: {NUM_CLIENTS} clients p50 {r['p50_ms']:.2f} ms p99 {r['p99_ms']:.2f} ms, "
                f"{r['rps']:.0f} req/s, {errors} errors; one client p50 {r['single_client_p50_ms']:.2f} ms"
            )
        return results
    finally:
        srv.close()


def _local_client_proc(
    sock: str, args: dict, n_threads: int, duration_s: float, warmup_s: float, q, rate_per_client: float | None = None
) -> None:
    """``n_threads`` lookup clients over the local transport (one connection each). ``rate_per_client``
    None: closed loop (each sends its next lookup as soon as the last is answered). A rate: open loop,
    each client sends at fixed times (``1 / rate`` apart, random phase) and a lookup's latency counts
    from the time it was due, so a client that falls behind sees the queueing too (no coordinated omission)."""
    import random
    import threading

    from kvtier.service.client import KVTierClient

    lat: list[list[float]] = [[] for _ in range(n_threads)]
    errors = [0] * n_threads
    start = time.perf_counter()
    measure_from, stop_at = start + warmup_s, start + warmup_s + duration_s

    def loop(i: int) -> None:
        c = KVTierClient(f"unix://{sock}", segment_bytes=1 << 16)
        period = None if rate_per_client is None else 1.0 / rate_per_client
        due = time.perf_counter() + (random.random() * period if period else 0.0)
        while True:
            if period is not None:
                wait = due - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                t0 = due
                due += period
            else:
                t0 = time.perf_counter()
            if t0 >= stop_at:
                break
            try:
                c.lookup(**args)
            except Exception:
                errors[i] += 1
                continue
            if t0 >= measure_from:
                lat[i].append(time.perf_counter() - t0)
        c.close()

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(n_threads)]
    for th in threads:
        th.start()
    time.sleep(max(0.0, measure_from - time.perf_counter()))
    cpu0 = time.process_time()
    for th in threads:
        th.join()
    q.put(([x for ls in lat for x in ls], sum(errors), time.process_time() - cpu0))


def _collect(q, n_procs: int, duration_s: float) -> tuple[list[float], int, float]:
    """The latencies, errors and CPU seconds the ``n_procs`` client processes of ``_local_client_proc`` put on ``q``."""
    lat: list[float] = []
    errors, client_cpu = 0, 0.0
    for _ in range(n_procs):
        l_, e_, cpu_ = q.get(timeout=duration_s + 120)
        lat += l_
        errors += e_
        client_cpu += cpu_
    return lat, errors, client_cpu


def bench_local_lookups(quick: bool, open_rate: float = 2000.0) -> dict:
    """Lookup latency with 64 concurrent clients over the local transport (2 processes x 32 threads): closed
    loop (every client back to back) and open loop (``open_rate`` lookups/s in all, spread over the 64)."""
    from kvtier.service.client import KVTierClient

    duration = 3.0 if quick else 15.0
    sock = os.path.join(_tmpdir("kvtier-bench-sock-"), "kv.sock")
    srv = KVTierServe(
        {
            "KVTIER_DEVICE_CAPACITY_BYTES": "64MiB",
            "KVTIER_HOST_CAPACITY_BYTES": "256MiB",
            "KVTIER_DISK_CAPACITY_BYTES": "1GiB",
            "KVTIER_LOCAL_SOCKET": sock,
        }
    )
    cores = os.cpu_count() or 1
    try:
        spec = SPEC_SMALL
        with KVTierClient(f"unix://{sock}") as c:
            model = c.register_spec(spec)
            tokens = list(range(spec.block_tokens * 8))
            keys = c.hashes(model, tokens)
            c.put(model, keys[:6], torch.zeros(6, *spec.block_shape, dtype=spec.torch_dtype))
            assert c.lookup(model, hashes=keys).num_blocks == 6
        args = {"model": model, "hashes": keys}

        def run(rate: float | None) -> dict:
            ctx = mp.get_context("fork")
            q = ctx.Queue()
            per_client = None if rate is None else rate / NUM_CLIENTS
            procs = [
                ctx.Process(target=_local_client_proc, args=(sock, args, NUM_CLIENTS // CLIENT_PROCS, duration, 1.0, q, per_client))
                for _ in range(CLIENT_PROCS)
            ]
            load0 = os.getloadavg()[0]
            for p in procs:
                p.start()
            time.sleep(1.0)  # the clients' warm-up
            server_cpu0 = _process_cpu_s(srv.proc.pid)
            lat, errors, client_cpu = _collect(q, len(procs), duration)
            server_cpu = _process_cpu_s(srv.proc.pid) - server_cpu0
            for p in procs:
                p.join()
            r = {
                "loop": "closed" if rate is None else "open",
                "target_rps": rate,
                **_latency_stats(lat, errors, duration),
                # CPU time per request, server and clients (load-independent: what a request costs, whoever waits)
                "server_cpu_us_per_request": server_cpu / max(1, len(lat)) * 1e6,
                "client_cpu_us_per_request": client_cpu / max(1, len(lat)) * 1e6,
                "load_average": max(load0, os.getloadavg()[0]),
            }
            cpu_s = (r["server_cpu_us_per_request"] + r["client_cpu_us_per_request"]) * 1e-6
            if rate is None:
                # Little's law with every core busy on lookups: 64 clients always waiting see a mean latency of at
                # least 64 x (CPU per lookup) / cores, whatever the server does; p99 sits above the mean
                r["bound_mean_ms"] = NUM_CLIENTS * cpu_s / cores * 1e3
                r["bound"] = (
                    f"closed loop: mean >= {NUM_CLIENTS} x {cpu_s * 1e6:.0f} us CPU per lookup / {cores} cores = "
                    f"{r['bound_mean_ms']:.2f} ms (queueing; p99 is above the mean)"
                )
            else:
                r["cpu_utilization"] = rate * cpu_s / cores  # the share of the box's cores the offered load needs
                r["bound"] = (
                    f"open loop: {rate:.0f}/s x {cpu_s * 1e6:.0f} us CPU per lookup = {r['cpu_utilization']:.0%} of {cores} cores "
                    f"(queueing only in bursts; the floor is one lookup's own time)"
                )
            name = "closed loop" if rate is None else f"open loop at {rate:.0f}/s"
            print(
                f"lookup by hashes (8 blocks), local transport, {name}: {NUM_CLIENTS} clients p50 {r['p50_ms']:.2f} ms "
                f"p99 {r['p99_ms']:.2f} ms (goal <= 5 ms), {r['rps']:.0f} req/s, {errors} errors; CPU per request: server "
                f"{r['server_cpu_us_per_request']:.0f} us, clients {r['client_cpu_us_per_request']:.0f} us "
                f"(load average {r['load_average']:.1f}); {r['bound']}"
            )
            return r

        r = run(None)
        r["open_loop"] = run(open_rate)
        with KVTierClient(f"unix://{sock}") as c:
            single = []
            for _ in range(200 if quick else 1000):
                t0 = time.perf_counter()
                c.lookup(**args)
                single.append(time.perf_counter() - t0)
        r["single_client_p50_ms"] = float(np.median(single) * 1e3)
        r["open_loop"]["single_client_p50_ms"] = r["single_client_p50_ms"]
        print(f"lookup by hashes (8 blocks), local transport, one client alone: p50 {r['single_client_p50_ms']:.2f} ms")
        return r
    finally:
        srv.close()


def bench_lookup_workers(quick: bool) -> dict:
    """Closed-loop lookups, 64 clients over the local transport (2 processes x 32 threads), against one
    server process and against two server processes sharing one Redis (each client process talks to one
    of them), so: do more server processes serve more lookups on this machine? Three layouts, one after
    the other: one process with its host tier only (the default sidecar, lookups answered on the
    transport's loop thread), one process with the host tier in front of Redis, two such processes on
    the same Redis (the shared tier makes a lookup ask Redis, at most ``redis_lookup_wait_s``), and those two
    answering from what they last saw of Redis (``redis_lookup_wait_s=0``: no wait)."""
    from kvtier.service.client import KVTierClient

    duration = 3.0 if quick else 10.0
    spec = SPEC_SMALL
    out: dict = {}
    with LocalRedis() as rs:
        for label, n_servers, redis, wait in (
            ("1 process, host tier", 1, False, None),
            ("1 process, host + Redis", 1, True, None),
            ("2 processes, host + one Redis", 2, True, None),
            ("2 processes, host + one Redis, redis_lookup_wait_s=0", 2, True, 0.0),
        ):
            rs.client().flushall()
            socks, srvs = [], []
            try:
                for _ in range(n_servers):
                    sock = os.path.join(_tmpdir("kvtier-bench-sock-"), "kv.sock")
                    env = {
                        "KVTIER_DEVICE_CAPACITY_BYTES": "0",
                        "KVTIER_HOST_CAPACITY_BYTES": "256MiB",
                        "KVTIER_DISK_CAPACITY_BYTES": "0",
                        "KVTIER_LOCAL_SOCKET": sock,
                        "KVTIER_REDIS_URL": rs.url if redis else "",
                    }
                    if wait is not None:
                        env["KVTIER_REDIS_LOOKUP_WAIT_S"] = str(wait)
                    srvs.append(KVTierServe(env))
                    socks.append(sock)
                tokens = list(range(spec.block_tokens * 8))
                with KVTierClient(f"unix://{socks[0]}") as c:
                    model = c.register_spec(spec)
                    keys = c.hashes(model, tokens)
                    c.put(model, keys[:6], torch.zeros(6, *spec.block_shape, dtype=spec.torch_dtype))
                for sock in socks:  # every server finds the 6 blocks (the others through Redis)
                    with KVTierClient(f"unix://{sock}") as c:
                        assert c.register_spec(spec) == model
                        deadline = time.monotonic() + 10
                        while c.lookup(model, hashes=keys).num_blocks != 6:
                            assert time.monotonic() < deadline, "a server never saw the blocks another one stored"
                            time.sleep(0.05)
                args = {"model": model, "hashes": keys}
                ctx = mp.get_context("fork")
                q = ctx.Queue()
                procs = [
                    ctx.Process(target=_local_client_proc, args=(socks[i % n_servers], args, NUM_CLIENTS // CLIENT_PROCS, duration, 1.0, q))
                    for i in range(CLIENT_PROCS)
                ]
                load0 = os.getloadavg()[0]
                for p in procs:
                    p.start()
                time.sleep(1.0)
                cpu0 = sum(_process_cpu_s(s_.proc.pid) for s_ in srvs)
                redis_cpu0 = _process_cpu_s(rs.proc.pid)
                lat, errors, client_cpu = _collect(q, len(procs), duration)
                server_cpu = sum(_process_cpu_s(s_.proc.pid) for s_ in srvs) - cpu0
                redis_cpu = _process_cpu_s(rs.proc.pid) - redis_cpu0
                for p in procs:
                    p.join()
                r = {
                    "servers": n_servers,
                    "redis": redis,
                    **_latency_stats(lat, errors, duration),
                    "server_cpu_us_per_request": server_cpu / max(1, len(lat)) * 1e6,
                    "redis_cpu_us_per_request": redis_cpu / max(1, len(lat)) * 1e6,
                    "client_cpu_us_per_request": client_cpu / max(1, len(lat)) * 1e6,
                    "load_average": max(load0, os.getloadavg()[0]),
                }
                print(
                    f"lookups, {label}: {NUM_CLIENTS} clients closed loop p50 {r['p50_ms']:.2f} ms p99 {r['p99_ms']:.2f} ms, "
                    f"{r['rps']:.0f} req/s, {errors} errors; CPU per lookup: servers {r['server_cpu_us_per_request']:.0f} us, "
                    f"Redis {r['redis_cpu_us_per_request']:.0f} us, clients {r['client_cpu_us_per_request']:.0f} us "
                    f"(load average {r['load_average']:.1f})"
                )
                out[label] = r
            finally:
                for s_ in srvs:
                    s_.close()
    return out


def _process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _busy_writer(sock: str, model: str, go, stop, q, recycle: bool = False, rate: float | None = None) -> None:
    """Puts 6 MiB blocks while ``go`` is set (until ``stop``), as fast as it can or, with ``rate``, at most
    ``rate`` puts/s (each due ``1 / rate`` after the last; a late one is not made up): with a small host
    tier each spills an older block to the disk tier, whose writes are fsync'ed (a real slow device).
    ``recycle`` (the control): each block is deleted right after its put, so the host tier never fills
    and nothing reaches the slow tier however many puts the writer makes; the put's own work is the same."""
    from kvtier.service.client import KVTierClient

    c = KVTierClient(f"unix://{sock}", segment_bytes=16 << 20)
    block = torch.randn(SPEC_6M.block_shape, generator=torch.Generator().manual_seed(1)).to(SPEC_6M.torch_dtype)
    n = i = 0
    due = time.perf_counter()
    while not stop.is_set():
        if not go.wait(0.05):
            continue
        if rate is not None:
            now = time.perf_counter()
            due = max(due + 1.0 / rate, now - 1.0 / rate)  # after a pause, no burst to catch up
            if due > now:
                time.sleep(due - now)
            if not go.is_set():
                continue
        key = chain_hashes(SPEC_6M, np.full(SPEC_6M.block_tokens, 7 + i), Namespace(salt="busy"))[0]
        c.put(model, [key], block.unsqueeze(0))
        if recycle:
            c.delete(model, [key])
        n, i = n + 1, i + 1
    c.close()
    q.put(n)


def bench_slow_redis(quick: bool) -> dict:
    """Host-tier gets and lookups over the local transport while Redis (written through) answers 200 ms
    late: in the busy windows a thread keeps Redis in ``DEBUG SLEEP 0.2`` and a writer puts 6 MiB blocks."""
    import threading

    from tests.redis_servers import RedisServer

    with RedisServer(extra_args=("--proto-max-bulk-len", "1gb", "--enable-debug-command", "yes")) as rs:
        go, stop = threading.Event(), threading.Event()

        def sleeper() -> None:
            r = rs.client(socket_timeout=10)
            while not stop.is_set():
                if go.wait(0.05):
                    r.execute_command("DEBUG", "SLEEP", "0.2")

        th = threading.Thread(target=sleeper, daemon=True)
        th.start()
        try:
            return bench_busy_tier(quick, slow_tier=True, redis_url=rs.url, redis_slow=go)
        finally:
            stop.set()
            go.clear()
            th.join(5)


def measure_disk_write_rate(quick: bool) -> dict:
    """The device's sustained rate for what the disk tier does per demoted block: a 6 MiB file written,
    fsync'ed and renamed, back to back for 2 s (1 s quick), in the temporary directory the server's
    data directory is made in (the same filesystem), by this process alone."""
    d = _tmpdir("kvtier-bench-disk-")
    data = os.urandom(SPEC_6M.block_nbytes)
    n, t0 = 0, time.perf_counter()
    try:
        while time.perf_counter() - t0 < (1.0 if quick else 2.0):
            tmp = os.path.join(d, f".tmp-{n}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            os.replace(tmp, os.path.join(d, f"{n}.kvf"))
            n += 1
        dt = time.perf_counter() - t0
    finally:
        import shutil

        shutil.rmtree(d, ignore_errors=True)
    r = {"blocks_per_s": n / dt, "mb_per_s": n * len(data) / dt / 1e6, "load_average": os.getloadavg()[0]}
    print(f"disk alone: {r['blocks_per_s']:.1f} fsync'ed 6 MiB files/s ({r['mb_per_s']:.0f} MB/s)")
    return r


def bench_busy_tier(
    quick: bool, slow_tier: bool = True, redis_url: str | None = None, redis_slow=None, writer_rate: float | None = None
) -> dict:
    """Host-tier gets and lookups over the local transport, idle and while a writer keeps the disk
    tier busy (every put demotes a 6 MiB block to a disk tier that fsyncs each file): p99 busy / idle.
    Idle and busy windows alternate (the writer is paused and resumed), so both see the same machine.
    ``slow_tier=False`` is the control: the same writer, each of its blocks deleted after its put so
    the host tier never fills (no disk I/O), so what remains is the CPU the writer takes on this machine.
    ``writer_rate``: the writer makes at most that many puts/s (None: unpaced)."""
    from kvtier.service.client import KVTierClient

    rounds, window = (4, 1.0) if quick else (10, 2.0)
    sock = os.path.join(_tmpdir("kvtier-bench-sock-"), "kv.sock")
    env = {
        "KVTIER_DEVICE_CAPACITY_BYTES": "0",
        "KVTIER_HOST_CAPACITY_BYTES": "64MiB" if slow_tier else "4GiB",
        "KVTIER_DISK_CAPACITY_BYTES": "4GiB",
        "KVTIER_DISK_FSYNC": "true",
        "KVTIER_LOCAL_SOCKET": sock,
        "KVTIER_SUMMARY_CAPACITY_BYTES": "0",
    }
    if redis_url is not None:  # host tier in front of a Redis written through (no disk)
        env.update({"KVTIER_HOST_CAPACITY_BYTES": "4GiB", "KVTIER_DISK_CAPACITY_BYTES": "0", "KVTIER_REDIS_URL": redis_url})
    srv = KVTierServe(env)
    try:
        c = KVTierClient(f"unix://{sock}")
        small = c.register_spec(SPEC_SMALL)
        big = c.register_spec(SPEC_6M)
        tokens = list(range(SPEC_SMALL.block_tokens * 4))
        keys = c.hashes(small, tokens)
        blocks = torch.randn(4, *SPEC_SMALL.block_shape, generator=torch.Generator().manual_seed(2)).to(SPEC_SMALL.torch_dtype)
        assert c.put(small, keys, blocks) == [True] * 4
        out = [torch.empty(SPEC_SMALL.block_shape, dtype=SPEC_SMALL.torch_dtype) for _ in keys]
        lat: dict[str, dict[str, list[float]]] = {"idle": {"get": [], "lookup": []}, "busy": {"get": [], "lookup": []}}
        short = {"idle": 0, "busy": 0}  # lookups that did not report all 4 blocks (with Redis: answered from a stale view)

        def measure(state: str, dur: float) -> None:
            """Gets and lookups in two threads of their own (each its own connection): a slow lookup
            does not thin out the gets' samples."""
            import threading

            stop_at = time.perf_counter() + dur

            def loop(op: str) -> None:
                while time.perf_counter() < stop_at:
                    t0 = time.perf_counter()
                    if op == "get":
                        assert c.get(small, keys, out=out)[0] is not None, "a hot host-tier block was evicted"
                    else:
                        short[state] += c.lookup(small, hashes=keys).num_blocks != len(keys)
                    lat[state][op].append(time.perf_counter() - t0)

            threads = [threading.Thread(target=loop, args=(op,)) for op in ("get", "lookup")]
            for th in threads:
                th.start()
            for th in threads:
                th.join()

        ctx = mp.get_context("fork")
        q, go, stop = ctx.Queue(), ctx.Event(), ctx.Event()
        writer = ctx.Process(target=_busy_writer, args=(sock, big, go, stop, q, not slow_tier and redis_url is None, writer_rate))
        writer.start()
        go.set()
        # the host tier fills up: from here on every put demotes to the disk
        time.sleep(1.5 if writer_rate is None else max(1.5, 14 / writer_rate))
        slow = "redis" if redis_url is not None else "disk"
        disk_before = next(t for t in c.stats()["tiers"] if t["name"] == slow)["puts"]
        for _ in range(rounds):
            go.clear()
            if redis_slow is not None:
                redis_slow.clear()
            time.sleep(0.4 if redis_slow is not None else 0.2)  # the put (and the Redis sleep) in flight end
            measure("idle", window)
            go.set()
            if redis_slow is not None:
                redis_slow.set()
            time.sleep(0.2)
            measure("busy", window)
        if redis_slow is not None:
            redis_slow.clear()
        stop.set()
        go.set()
        puts = q.get(timeout=120)
        writer.join()
        disk_puts = next(t for t in c.stats()["tiers"] if t["name"] == slow)["puts"] - disk_before
        c.close()
    finally:
        srv.close()

    def summary(v: list[float]) -> dict:
        ms = np.array(v) * 1e3
        return {"n": len(v), "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}

    idle = {op: summary(v) for op, v in lat["idle"].items()}
    busy = {op: summary(v) for op, v in lat["busy"].items()}
    r = {
        "idle": idle,
        "busy": busy,
        "busy_puts": puts,
        "writer_rate": writer_rate,
        "lookups_short": short,
        "disk_blocks_written": disk_puts,
        "rounds": rounds,
        "window_s": window,
        "load_average": os.getloadavg()[0],
        "get_p99_ratio": busy["get"]["p99_ms"] / idle["get"]["p99_ms"],
        "lookup_p99_ratio": busy["lookup"]["p99_ms"] / idle["lookup"]["p99_ms"],
    }
    label = "Redis 200 ms late" if redis_url is not None else "busy disk tier" if slow_tier else "control, no disk I/O"
    if writer_rate is not None:
        label += f", writer paced at {writer_rate:.1f} puts/s"
    print(
        f"{label} ({puts} puts of 6 MiB, {disk_puts} blocks written to the slow tier "
        f"in the measured windows): host-tier get p99 {idle['get']['p99_ms']:.2f} -> {busy['get']['p99_ms']:.2f} ms "
        f"({r['get_p99_ratio']:.2f}x), lookup p99 {idle['lookup']['p99_ms']:.2f} -> {busy['lookup']['p99_ms']:.2f} ms "
        f"({r['lookup_p99_ratio']:.2f}x); lookups that missed some of the 4 blocks: {short['idle']} idle, {short['busy']} busy"
    )
    return r


SECTIONS = ("blocks", "lookups", "workers", "busy")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and shorter load (under a minute)")
    ap.add_argument("--out", help="also write the figures as JSON here")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in this process")
    ap.add_argument(
        "--open-rate",
        type=float,
        default=2000.0,
        help="lookups/s in all (spread over the 64 clients) for the open-loop lookup case over the local transport",
    )
    ap.add_argument(
        "--only",
        help=f"comma-separated sections to run (of {', '.join(SECTIONS)}; default: all); a partial run is saved "
        "as service_sections_quick.* (never as the full results)",
    )
    ap.add_argument(
        "--paced-fraction",
        type=float,
        default=0.5,
        help="the paced writer of the busy section puts this fraction of the disk's own sustained rate of "
        "fsync'ed 6 MiB files, measured in the same run",
    )
    args = ap.parse_args()
    only = set(SECTIONS) if not args.only else {x.strip() for x in args.only.split(",") if x.strip()}
    if only - set(SECTIONS):
        ap.error(f"unknown sections {sorted(only - set(SECTIONS))}; known: {', '.join(SECTIONS)}")
    load_start = os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    blocks = grpc_floor = rest_floor = lookups = local_lookups = busy = control = paced = slow_redis = disk_rate = workers = None
    if "blocks" in only:
        blocks = {label: bench_blocks(args.quick, label, env) for label, env in CONFIGS.items()}
        grpc_floor = bench_grpc_floor(args.quick)
        rest_floor = bench_rest_floor(args.quick)
    if "lookups" in only:
        lookups = bench_lookups(args.quick)
        local_lookups = bench_local_lookups(args.quick, args.open_rate)
    if "workers" in only:
        workers = bench_lookup_workers(args.quick)
    if "busy" in only:
        disk_rate = measure_disk_write_rate(args.quick)
        busy = bench_busy_tier(args.quick)
        control = bench_busy_tier(args.quick, slow_tier=False)
        paced = bench_busy_tier(args.quick, writer_rate=args.paced_fraction * disk_rate["blocks_per_s"])
        paced["disk_alone"] = disk_rate
        paced["paced_fraction"] = args.paced_fraction
        slow_redis = bench_slow_redis(args.quick)
    mode = "quick" if args.quick else "full"
    md = [
        f"Service benchmark ({mode} mode): `python bench/service.py{' --quick' if args.quick else ''}"
        f"{' --only ' + ','.join(s_ for s_ in SECTIONS if s_ in only) if args.only else ''}`. "
        f"Load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} cores.",
        "",
    ]
    if blocks is not None:
        md += _md_blocks(blocks, grpc_floor, rest_floor)
    if lookups is not None:
        md += _md_lookups(lookups, local_lookups)
    if workers is not None:
        md += _md_workers(workers)
    if busy is not None:
        md += _md_busy(busy, control, paced, slow_redis)
    print("\n" + "\n".join(md))
    figures = {
        "mode": mode,
        "sections": [s_ for s_ in SECTIONS if s_ in only],
        "load_average_start": load_start,
        "load_average_end": os.getloadavg()[0],
        "blocks_6mib": blocks,
        "grpc_transport_alone": grpc_floor,
        "rest_transport_alone": rest_floor,
        "lookups": lookups,
        "local_lookups": local_lookups,
        "lookup_workers": workers,
        "disk_alone": disk_rate,
        "busy_tier": busy,
        "busy_control": control,
        "busy_paced": paced,
        "slow_redis": slow_redis,
    }
    name = "service_sections_quick" if args.only else "service_quick" if args.quick else "service"
    save_results(name, {k: v for k, v in figures.items() if v is not None}, "\n".join(md), args.out)


def _md_blocks(blocks: dict, grpc_floor: dict, rest_floor: dict) -> list[str]:
    rows = []
    for label, b in blocks.items():
        for tr, goal in (("rest", ">= 0.5x"), ("grpc", ">= 0.7x"), ("local", ">= 1.5x")):
            for op, base in (("put", "raw_set"), ("get", "raw_get")):
                rows.append(
                    [
                        label,
                        tr.upper(),
                        op,
                        f"{b[f'{tr}_{op}_s'] * 1e3:.1f} ms",
                        f"{b[base + '_s'] * 1e3:.1f} ms",
                        f"**{b[f'{tr}_{op}_ratio']:.2f}x**",
                        f"{b['raw_set_same_key_s'] * 1e3:.1f} ms: {b[f'{tr}_{op}_ratio_same_key']:.2f}x" if op == "put" else "-",
                        goal,
                    ]
                )
                if tr == "local" and op == "put" and "local_put_one_shot_s" in b:
                    rows.append(
                        [
                            label,
                            "LOCAL, one shot",
                            op,
                            f"{b['local_put_one_shot_s'] * 1e3:.1f} ms",
                            f"{b[base + '_s'] * 1e3:.1f} ms",
                            f"{b['local_put_one_shot_ratio']:.2f}x",
                            f"{b['raw_set_same_key_s'] * 1e3:.1f} ms: {b['local_put_one_shot_ratio_same_key']:.2f}x",
                            "(streamed put's control)",
                        ]
                    )
    md = [
        "6 MiB blocks "
        "(SDK clients, best of 3 interleaved rounds; ratio = raw redis-py time / kvtier time, higher is better). "
        "A put stores a new block, so it is compared with a SET of a new key (each round's keys deleted after it, as "
        "kvtier's are); a SET overwriting one key, where Redis reuses the freed value's memory and takes no page faults, "
        "is shown beside it. LOCAL puts are streamed (the SDK's default: the client writes a block into the segment a "
        '1 MiB part at a time and the server copies and verifies each part while the next is written); "LOCAL, one shot" '
        "is the same client with `stream_puts=False` (the whole request written, then verified and copied).",
        "",
        md_table(
            [
                "kvtier tiers",
                "transport",
                "op",
                "kvtier",
                "raw redis-py SET (new key) / GET",
                "ratio",
                "vs SET overwriting one key",
                "goal",
            ],
            rows,
        ),
        "",
        f"grpcio alone (a no-op servicer in this process), 6 MiB: put {grpc_floor['put_s'] * 1e3:.1f} ms, "
        f"get {grpc_floor['get_s'] * 1e3:.1f} ms. uvicorn + httpx alone (a no-op Starlette app in another process), "
        f"6 MiB: put {rest_floor['put_s'] * 1e3:.1f} ms, get {rest_floor['get_s'] * 1e3:.1f} ms. "
        "These are the transports' own costs: a ratio goal above raw time / transport time cannot be met with that transport.",
        "",
    ]
    host = blocks["host only"]
    frows = [
        [
            tr.upper(),
            op,
            f"{host[f'{tr}_{op}_s'] * 1e3:.1f} ms",
            f"{floor[f'{op}_s'] * 1e3:.1f} ms",
            f"**{host[f'{tr}_{op}_s'] / floor[f'{op}_s']:.2f}x**",
        ]
        for tr, floor in (("rest", rest_floor), ("grpc", grpc_floor))
        for op in ("put", "get")
    ]
    md += [
        "kvtier (host tier only) against a no-op app on the same server stack, the same 6 MiB (goal <= 1.25x):",
        "",
        md_table(["transport", "op", "kvtier", "no-op app", "kvtier / no-op"], frows),
        "",
    ]
    return md


def _md_lookups(lookups: dict, local_lookups: dict) -> list[str]:
    lrows = [
        [
            label,
            "closed",
            r["clients"],
            f"{r['p50_ms']:.2f}",
            f"{r['p99_ms']:.2f}",
            "<= 5 ms",
            f"{r['rps']:.0f}",
            r["errors"],
            f"{r['single_client_p50_ms']:.2f}",
        ]
        for label, r in lookups.items()
    ]
    loc, opn = local_lookups, local_lookups["open_loop"]
    for name, r in (("closed", loc), (f"open, {opn['target_rps']:.0f}/s in all", opn)):
        lrows.append(
            [
                "by hashes (8 blocks), local transport",
                name,
                r["clients"],
                f"{r['p50_ms']:.2f}",
                f"{r['p99_ms']:.2f}",
                "<= 5 ms",
                f"{r['rps']:.0f}",
                r["errors"],
                f"{loc['single_client_p50_ms']:.2f}",
            ]
        )
    md = [
        md_table(
            ["lookup", "loop", "concurrent clients", "p50 ms", "p99 ms", "goal p99", "requests/s", "errors", "one client p50 ms"], lrows
        ),
        "",
        "Closed loop: every client sends its next lookup as soon as the last is answered, so the box is always "
        "saturated and the latency is queueing: by Little's law the mean is at least 64 x (CPU per lookup) / cores, "
        "and p99 sits above it. Open loop: each client sends at fixed times and latency counts from the time a lookup "
        "was due (no coordinated omission).",
        "",
        f"- local transport, {loc['bound']}; CPU per lookup: server {loc['server_cpu_us_per_request']:.0f} us, clients "
        f"{loc['client_cpu_us_per_request']:.0f} us.",
        f"- local transport, {opn['bound']}; CPU per lookup: server {opn['server_cpu_us_per_request']:.0f} us, clients "
        f"{opn['client_cpu_us_per_request']:.0f} us.",
        f"- load average {max(loc['load_average'], opn['load_average']):.1f} on {os.cpu_count()} cores.",
        "",
    ]
    return md


def _md_workers(workers: dict) -> list[str]:
    base = next(iter(workers.values()))
    rows = [
        [
            label,
            f"{r['p50_ms']:.2f}",
            f"{r['p99_ms']:.2f}",
            f"{r['rps']:.0f}",
            f"**{r['rps'] / base['rps']:.2f}x**",
            r["errors"],
            f"{r['server_cpu_us_per_request']:.0f} / {r['redis_cpu_us_per_request']:.0f} / {r['client_cpu_us_per_request']:.0f}",
            f"{r['load_average']:.1f}",
        ]
        for label, r in workers.items()
    ]
    return [
        "Lookups by hashes (8 blocks), 64 clients in a closed loop over the local transport (2 client processes of 32 "
        "threads), against one server process and against two sharing one Redis (each client process talks to one "
        f"server), {base['duration_s']:.0f} s each:",
        "",
        md_table(
            [
                "servers",
                "p50 ms",
                "p99 ms",
                "requests/s",
                "vs 1 process, host tier",
                "errors",
                "CPU us per lookup: servers / Redis / clients",
                "load average",
            ],
            rows,
        ),
        "",
    ]


def _md_busy(busy: dict, control: dict, paced: dict, slow_redis: dict) -> list[str]:
    disk_alone = paced["disk_alone"]

    def vs_control(r: dict, op: str) -> str:
        if r is control:
            return "-"
        return f"{r['busy'][op]['p99_ms'] / control['busy'][op]['p99_ms']:.2f}x"

    brows = [
        [
            label,
            op,
            f"{r['idle'][op]['p50_ms']:.2f}",
            f"{r['idle'][op]['p99_ms']:.2f}",
            f"{r['busy'][op]['p50_ms']:.2f}",
            f"{r['busy'][op]['p99_ms']:.2f}",
            f"**{r[op + '_p99_ratio']:.2f}x**",
            vs_control(r, op),
            "(control)" if r is control else "<= 2x",
        ]
        for label, r in (
            (f"disk tier busy, writer unpaced ({busy['disk_blocks_written']} fsync'ed writes)", busy),
            (
                f"disk tier busy, writer paced at {paced['writer_rate']:.1f} puts/s ({paced['disk_blocks_written']} fsync'ed writes)",
                paced,
            ),
            (f"Redis 200 ms late, written through ({slow_redis['disk_blocks_written']} blocks)", slow_redis),
            (f"writer unpaced, host tier of 4 GiB ({control['disk_blocks_written']} blocks reached the disk)", control),
        )
        for op in ("get", "lookup")
    ]
    window_s = busy["rounds"] * busy["window_s"]
    return [
        "Host-tier calls over the local transport (4 small blocks) while another client puts 6 MiB blocks, each demoting "
        "one to an fsync'ing disk tier; the control runs the same writer, unpaced, with a 4 GiB host tier and each "
        "block deleted after its put, so nothing reaches the disk (what is left is the writer's CPU on this machine). "
        f"The paced writer puts {paced['paced_fraction']:.0%} of the disk's own sustained rate, measured in this run: "
        f"{disk_alone['blocks_per_s']:.1f} fsync'ed 6 MiB files/s ({disk_alone['mb_per_s']:.0f} MB/s) written by one "
        "process alone; so the disk is kept about that busy while the writer's CPU is a fraction of the unpaced one's. "
        "Idle and busy windows alternate "
        f"({busy['rounds']} rounds of {busy['window_s']:.0f} s each); blocks written to the disk per busy second: "
        f"unpaced {busy['disk_blocks_written'] / window_s:.1f}, paced {paced['disk_blocks_written'] / window_s:.1f}. "
        "The last column divides a row's busy p99 by the control's busy p99 (what the disk adds to the writer's CPU).",
        "",
        md_table(
            ["writer", "op", "idle p50 ms", "idle p99 ms", "busy p50 ms", "busy p99 ms", "p99 busy / idle", "busy p99 / control's", "goal"],
            brows,
        ),
        "",
    ]


if __name__ == "__main__":
    main()
