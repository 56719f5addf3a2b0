"""One real vLLM engine with the kvtier connector, driven over stdin/stdout; ``Engine`` starts and drives one.

The driver runs with vLLM's environment (``.venv-vllm``, ``make vllm-env``)::

    .venv-vllm/bin/python bench/vllm_engine.py '{"model": DIR, "dtype": "float32", "kvtier": {...extra config...}, ...}'

``Engine(opts)`` (kvtier's environment: the tests in ``tests/service/test_vllm_engine.py`` and
``bench/vllm_e2e.py``) starts that process and sends it commands.

Reads one JSON command per line on stdin and answers one line ``@@kvtier@@ {json}`` on stdout
(vLLM's own logging goes to the same streams; only those lines are answers):

- ``{"op": "generate", "prompts": [[ids...], ...], "max_tokens": n}`` ->
  ``{"tokens": [[ids...]], "num_cached_tokens": [...], "ttft_s": [...], "wall_s": s}``
  (all prompts submitted together: they run concurrently);
- ``{"op": "quit"}``.

Options (the JSON argument): ``model``, ``dtype``, ``kvtier`` (``kv_connector_extra_config``; absent:
no connector), ``kv_role``, ``prefix_caching`` (default false), ``max_num_batched_tokens``,
``max_model_len``, ``executor`` (``distributed_executor_backend``), ``kv_events_endpoint`` (vLLM's
own ZMQ event publisher), ``kv_load_failure_policy``, ``kv_cache_memory_bytes`` (vLLM's KV space;
``VLLM_CPU_KVCACHE_SPACE``, 1 GiB otherwise, is then unset: vLLM's CPU platform lets it win),
``env`` (environment variables set before vLLM is imported).
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

MARK = "@@kvtier@@ "


def reply(obj) -> None:
    sys.stdout.write(MARK + json.dumps(obj) + "\n")
    sys.stdout.flush()


def build_engine(opts: dict):
    from vllm import LLM
    from vllm.config import KVEventsConfig, KVTransferConfig

    kwargs = dict(
        model=opts["model"],
        dtype=opts.get("dtype", "float32"),
        enforce_eager=True,
        seed=0,
        max_model_len=opts.get("max_model_len", 4096),
        enable_prefix_caching=opts.get("prefix_caching", False),
        max_num_batched_tokens=opts.get("max_num_batched_tokens", 4096),
        max_num_seqs=opts.get("max_num_seqs", 16),
        disable_log_stats=False,
    )
    if opts.get("executor"):
        kwargs["distributed_executor_backend"] = opts["executor"]
    if opts.get("kv_cache_memory_bytes"):
        kwargs["kv_cache_memory_bytes"] = int(opts["kv_cache_memory_bytes"])
    if opts.get("block_size"):
        kwargs["block_size"] = opts["block_size"]
    if opts.get("kvtier") is not None:
        kwargs["kv_transfer_config"] = KVTransferConfig(
            kv_connector="KVTierConnector",
            kv_connector_module_path=opts.get("module", "kvtier.connectors.vllm"),
            kv_role=opts.get("kv_role", "kv_both"),
            kv_connector_extra_config=opts["kvtier"],
            kv_load_failure_policy=opts.get("kv_load_failure_policy", "recompute"),
        )
    if opts.get("kv_events_endpoint"):
        kwargs["kv_events_config"] = KVEventsConfig(enable_kv_cache_events=True, publisher="zmq", endpoint=opts["kv_events_endpoint"])
    return LLM(**kwargs)


def generate(llm, cmd: dict) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=cmd.get("max_tokens", 8), ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in cmd["prompts"]]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    res = {"tokens": [], "num_cached_tokens": [], "ttft_s": [], "wall_s": wall}
    for o in outs:
        res["tokens"].append(list(o.outputs[0].token_ids))
        res["num_cached_tokens"].append(o.num_cached_tokens)
        m = o.metrics
        ttft = None
        if m is not None:
            ttft = getattr(m, "first_token_latency", None)
            if ttft is None and getattr(m, "first_token_ts", None) and getattr(m, "arrival_time", None):
                ttft = m.first_token_ts - m.arrival_time
        res["ttft_s"].append(ttft)
    return res


def main() -> int:
    opts = json.loads(sys.argv[1])
    os.environ.update(opts.get("env") or {})  # before vLLM is imported
    if opts.get("kv_cache_memory_bytes"):
        # vLLM's CPU platform lets this legacy variable (GiB) override kv_cache_memory_bytes: without this, an
        # engine asked for a small KV space silently got 1 GiB
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    else:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    try:
        llm = build_engine(opts)
    except Exception as e:  # the engine refused to start: say why, on the answer channel
        reply({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-6000:]})
        return 1
    reply({"ready": True})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        try:
            reply(generate(llm, cmd))
        except Exception as e:
            reply({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-6000:]})
    reply({"bye": True})
    del llm
    return 0


# -- the parent side (kvtier's environment) ------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("KVTIER_VLLM_PYTHON") or ROOT / ".venv-vllm" / "bin" / "python")


class Engine:
    """One vLLM engine process (this file run by ``VLLM_PYTHON``); ``ready`` is its first answer
    (``{"ready": true}`` or ``{"error": ...}``), ``log`` its recent output lines."""

    def __init__(self, opts: dict, *, ready_timeout_s: float = 600.0, python: Path | None = None) -> None:
        env = {
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_CPU_OMP_THREADS_BIND": "nobind",
            "HF_HUB_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
        }
        env.pop("PYTHONPATH", None)  # kvtier is installed in vLLM's environment (editable): nothing of this one leaks in
        self.proc = subprocess.Popen(
            [str(python or VLLM_PYTHON), str(Path(__file__).resolve()), json.dumps(opts)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd="/",
            preexec_fn=_die_with_parent,
        )
        self.log: list[str] = []
        self.replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.ready = self.reply(ready_timeout_s)

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                self.replies.put(json.loads(line[len(MARK) :]))
            else:
                self.log.append(line)
                del self.log[:-400]
        self.replies.put({"error": f"the engine exited ({self.proc.wait()})"})

    def reply(self, timeout_s: float = 600.0) -> dict:
        try:
            return self.replies.get(timeout=timeout_s)
        except queue.Empty:
            raise RuntimeError(f"no answer from the engine in {timeout_s}s:\n{self.tail()}") from None

    def tail(self, n: int = 60) -> str:
        return "".join(self.log[-n:])

    def send(self, cmd: dict) -> None:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def generate(self, prompts: list[list[int]], max_tokens: int = 8, timeout_s: float = 600.0) -> dict:
        """Greedy outputs of ``prompts`` submitted together: tokens, num_cached_tokens, ttft_s per prompt."""
        self.send({"op": "generate", "prompts": prompts, "max_tokens": max_tokens})
        out = self.reply(timeout_s)
        if "error" in out:
            raise RuntimeError(f"{out['error']}\n{out.get('traceback', '')}\n{self.tail()}")
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send({"op": "quit"})
                self.proc.wait(60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _die_with_parent() -> None:
    """In the child: die with the parent (Linux), so an interrupted run leaves no engine behind."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main())
