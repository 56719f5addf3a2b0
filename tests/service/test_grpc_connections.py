"""Idle gRPC connections are capped and reclaimed (issue 17), against a real ``kvtier serve``:
hundreds of TCP connections that never speak HTTP/2 and dozens of idle gRPC channels neither grow
the server's descriptors past ``grpc_max_connections`` nor stop it answering a client already
connected (nor REST); the server closes the silent ones within ``header_timeout_s`` and idle
channels within ``grpc_idle_timeout_s``, then answers new clients."""

from __future__ import annotations

import os
import socket
import time

import grpc
import httpx

from kvtier.service.grpc_client import KVTierGrpcClient

from .server import ServiceProcess

CAP = 40


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _until(pred, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return pred()


def test_idle_grpc_connections_are_capped_and_reclaimed():
    srv = ServiceProcess(
        {"KVTIER_GRPC_MAX_CONNECTIONS": str(CAP), "KVTIER_HEADER_TIMEOUT_S": "1", "KVTIER_GRPC_IDLE_TIMEOUT_S": "3"},
        grpc=True,
    )
    socks: list[socket.socket] = []
    channels: list[grpc.Channel] = []
    try:
        client = KVTierGrpcClient(srv.grpc_target, retries=0, timeout=5)
        assert client.stats()["tenant"]["tenant"] == ""  # connected before the flood
        base = _fds(srv.proc.pid)
        for _ in range(20):  # idle gRPC channels: connected (HTTP/2 settled), no call
            ch = grpc.insecure_channel(srv.grpc_target)
            grpc.channel_ready_future(ch).result(timeout=5)
            channels.append(ch)
        for _ in range(300):  # and connections that never send a byte
            socks.append(socket.create_connection(("127.0.0.1", srv.grpc_port)))
        time.sleep(0.3)
        assert _fds(srv.proc.pid) <= base + CAP + 4  # the cap: the rest were closed at once
        assert client.stats()["tenant"]["tenant"] == ""  # a client already connected is answered
        assert httpx.get(srv.url + "/healthz", timeout=5).status_code == 200

        def silent_ones_closed() -> bool:
            n = 0
            for s in socks:
                s.settimeout(0.001)
                try:
                    n += s.recv(1 << 16) == b""
                except socket.timeout:
                    pass
                except OSError:
                    n += 1
            return n == len(socks)

        assert _until(silent_ones_closed, 5)  # header_timeout_s (1 s): none of the silent connections is left
        with KVTierGrpcClient(srv.grpc_target, retries=0, timeout=5) as fresh:  # room again for new clients
            assert fresh.stats()["tenant"]["tenant"] == ""
        # the idle channels (and the clients', now idle) are closed by the server after grpc_idle_timeout_s
        assert _until(lambda: _fds(srv.proc.pid) <= base - 1, 8)
        assert client.stats()["tenant"]["tenant"] == ""  # a closed idle channel reconnects by itself
    finally:
        for s in socks:
            s.close()
        for ch in channels:
            ch.close()
        srv.stop()


def test_graceful_stop_drains_grpc_calls():
    """SIGTERM while a gRPC upload is in progress and other calls keep coming: the upload finishes
    and is stored; the other calls are answered OK, or UNAVAILABLE (retryable) during the drain; no
    server error. (A few CANCELLED remain possible at the instant the server stops: 2 of 8 runs
    here, 1-3 calls, against 4 of 5 runs before the drain.)"""
    import signal
    import threading

    import torch

    from kvtier.kvstore import Namespace, chain_hashes
    from kvtier.service.grpc_client import _put_msgs

    from .conftest import TINY

    srv = ServiceProcess({"KVTIER_GRACEFUL_SHUTDOWN_S": "20"}, grpc=True)
    codes: list[str] = []
    stop = threading.Event()
    try:
        with KVTierGrpcClient(srv.grpc_target, retries=0, timeout=30) as g:
            model = g.register_spec(TINY)
            keys = chain_hashes(TINY, list(range(32)), Namespace(salt="drain"))
            data = torch.randn(2, *TINY.block_shape, generator=torch.Generator().manual_seed(0)).to(TINY.torch_dtype)
            msgs = _put_msgs(TINY, model, keys, data, None)
            started = threading.Event()

            def slow_stream():
                yield msgs[0]
                started.set()
                time.sleep(2.0)  # still uploading when SIGTERM comes
                yield from msgs[1:]

            holder: dict = {}
            upload = threading.Thread(target=lambda: holder.setdefault("reply", g._put_blocks(slow_stream(), timeout=60)))

            def hammer():
                with KVTierGrpcClient(srv.grpc_target, retries=0, timeout=10) as h:
                    while not stop.is_set():
                        try:
                            h.lookup(model, hashes=keys)
                            codes.append("OK")
                        except Exception as e:  # KVTierError
                            codes.append(getattr(e, "code", type(e).__name__))
                            time.sleep(0.01)

            hammers = [threading.Thread(target=hammer) for _ in range(3)]
            upload.start()
            assert started.wait(10)
            for t in hammers:
                t.start()
            time.sleep(0.3)
            srv.proc.send_signal(signal.SIGTERM)
            upload.join(30)
            srv.proc.wait(30)  # uvicorn re-raises SIGTERM once stopped: -15 after a graceful stop
            stop.set()
            for t in hammers:
                t.join(15)
        counts = {c: codes.count(c) for c in set(codes)}
        print("answers while stopping:", counts)
        assert list(holder["reply"].stored) == [True, True]  # the call in progress was drained, not cancelled
        assert counts.get("UNAVAILABLE", 0) > 0 and counts.get("OK", 0) > 0  # refused during the drain, retryable
        # Never a server error. A CANCELLED remains possible for a call grpc core had received but not yet
        # handed to a handler at the instant the server stops (not one in progress, nor one during the drain)
        assert set(codes) <= {"OK", "UNAVAILABLE", "CANCELLED"}, counts
        assert counts.get("CANCELLED", 0) <= 3, counts
    finally:
        stop.set()
        srv.stop()
