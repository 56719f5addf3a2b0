"""Peak server RSS under many concurrent uploaders of 64 MiB blocks: REST vs gRPC, side by side.

    python bench/transfer_rss.py [--quick] [--clients 16 32] [--seconds S] [--out FILE]

For each number of clients and each transport, a fresh ``kvtier serve`` (host tier 256 MiB, no
device or disk tier: what is measured is the memory requests hold, not the store's) and that many
client threads, each putting 64 MiB blocks under new keys in a loop for ``--seconds``. The figure is
the server's peak RSS (``VmHWM``) and the uploads it acknowledged. ``max_concurrent_transfers``
(default 8) bounds the bodies both transports hold at once: a gRPC ``PutBlocks`` stream is not read
until it has a slot, as a REST body is not. Issue 17 measured before that bound: REST 888 MiB at 16
clients, gRPC 2,793 MiB (16) and 3,145 MiB (32).

Results: bench/results/transfer_rss.json and .md (``transfer_rss_quick.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.modules.pop("service", None)
from bench.common import ServiceProcess, machine, md_table, save_results  # noqa: E402

import torch  # noqa: E402

from kvtier.kvstore import KVSpec, Namespace, chain_hashes  # noqa: E402
from kvtier.service.client import KVTierClient  # noqa: E402
from kvtier.service.grpc_client import KVTierGrpcClient  # noqa: E402

SPEC = KVSpec("rss64", num_layers=32, num_kv_heads=8, head_dim=128, dtype="float16", block_tokens=512)  # 64 MiB blocks
ENV = {
    "KVTIER_DEVICE_CAPACITY_BYTES": "0",
    "KVTIER_HOST_CAPACITY_BYTES": "256MiB",
    "KVTIER_DISK_CAPACITY_BYTES": "0",
    "KVTIER_LOG_LEVEL": "warning",
}


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def run(transport: str, clients: int, seconds: float, block: torch.Tensor) -> dict:
    for attempt in range(3):  # start-up (Python, torch) may take longer than 30 s on a loaded box
        try:
            srv = ServiceProcess(ENV, grpc=True, small=False)
            break
        except RuntimeError:
            if attempt == 2:
                raise
    done, errors = [0], [0]
    lock = threading.Lock()
    stop = threading.Event()
    try:
        base = peak_rss(srv.proc.pid)

        def uploader(i: int) -> None:
            c = (
                KVTierGrpcClient(srv.grpc_target, retries=0, timeout=120)
                if transport == "grpc"
                else KVTierClient(srv.url, retries=0, timeout=120)
            )
            try:
                model = None
                for _ in range(5):  # a loaded box may drop a connection: register again
                    try:
                        model = c.register_spec(SPEC)
                        break
                    except Exception:
                        with lock:
                            errors[0] += 1
                        time.sleep(1)
                n = 0
                while model is not None and not stop.is_set():
                    n += 1
                    key = chain_hashes(SPEC, list(range(SPEC.block_tokens)), Namespace(salt=f"{transport}-{i}-{n}"))
                    try:
                        ok = c.put(model, key, block[None])
                        with lock:
                            done[0] += ok == [True]
                    except Exception:
                        with lock:
                            errors[0] += 1
            finally:
                c.close()

        threads = [threading.Thread(target=uploader, args=(i,), daemon=True) for i in range(clients)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        while time.monotonic() - t0 < seconds:
            time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(180)
        elapsed = time.monotonic() - t0
        return {
            "transport": transport,
            "clients": clients,
            "seconds": round(elapsed, 1),
            "uploads_acknowledged": done[0],
            "errors": errors[0],
            "idle_rss_mib": round(base / 2**20, 1),
            "peak_rss_mib": round(peak_rss(srv.proc.pid) / 2**20, 1),
        }
    finally:
        srv.stop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="16 clients only, 8 s per transport")
    ap.add_argument("--clients", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--seconds", type=float, default=30.0, help="upload time per (transport, clients) (default 30)")
    ap.add_argument("--out", help="also write the JSON figures here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    clients = [16] if args.quick else args.clients
    seconds = 8.0 if args.quick else args.seconds
    block = torch.randn(SPEC.block_shape, generator=torch.Generator().manual_seed(0)).half()  # shared by every client
    rows, figures = [], {"machine": machine(), "block_mib": SPEC.block_nbytes / 2**20, "runs": []}
    for n in clients:
        by = {}
        for transport in ("rest", "grpc"):
            r = run(transport, n, seconds, block)
            figures["runs"].append(r)
            by[transport] = r
            print(r, flush=True)
        rows.append(
            [
                n,
                by["rest"]["peak_rss_mib"],
                by["grpc"]["peak_rss_mib"],
                f"{by['grpc']['peak_rss_mib'] / by['rest']['peak_rss_mib']:.2f}x",
                f"{by['rest']['uploads_acknowledged']} / {by['grpc']['uploads_acknowledged']}",
                f"{by['rest']['errors']} / {by['grpc']['errors']}",
            ]
        )
    cmd = "python bench/transfer_rss.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = (
        f"# Peak server RSS, concurrent 64 MiB uploads\n\n`{cmd}` on {figures['machine']}; {seconds:g} s per run, "
        "a fresh `kvtier serve` per run (host tier 256 MiB only), max_concurrent_transfers 8 (default).\n\n"
        + md_table(
            ["clients", "REST peak RSS MiB", "gRPC peak RSS MiB", "gRPC / REST", "uploads acked REST / gRPC", "errors REST / gRPC"], rows
        )
        + "\n\nBefore the bound (issue 17): REST 888 MiB (16 clients); gRPC 2,793 MiB (16), 3,145 MiB (32).\n"
    )
    print(md)
    save_results("transfer_rss_quick" if args.quick else "transfer_rss", figures, md, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
