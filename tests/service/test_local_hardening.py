"""The local transport (``unix://``) against a real ``kvtier serve``: the per-tenant request rate
limit applies to it as to REST and gRPC (one bucket per tenant for all three), and only processes
of the server's own user (or root) may use the socket (file mode 0600 and SO_PEERCRED)."""

from __future__ import annotations

import json
import os
import socket
import stat
import tempfile

import pytest

from kvtier.service.client import KVTierClient, KVTierError
from kvtier.service.local import recv_msg

from .conftest import KEYS, TINY
from .server import ServiceProcess

KEY_A, KEY_B = list(KEYS)


@pytest.fixture(scope="module")
def server():
    d = tempfile.mkdtemp(prefix="kvtier-local-hard-")
    s = ServiceProcess(
        {
            "KVTIER_API_KEYS": json.dumps(KEYS),
            "KVTIER_LOCAL_SOCKET": f"{d}/kv.sock",
            "KVTIER_TENANT_REQUESTS_PER_S": "0.2",  # one token back every 5 s: the test outruns it
            "KVTIER_TENANT_BURST": "5",
        },
        data_dir=d,
    )
    s.socket_path = f"{d}/kv.sock"
    yield s
    s.stop()


def test_the_tenant_rate_limit_applies_to_the_local_transport(server):
    a = KVTierClient(f"unix://{server.socket_path}", api_key=KEY_A)
    b = KVTierClient(f"unix://{server.socket_path}", api_key=KEY_B)
    try:
        model = a.register_spec(TINY)  # 1 request of acme's 5
        answered = 1
        with pytest.raises(KVTierError) as e:
            for _ in range(10):
                a.lookup(model, hashes=[bytes(32)])
                answered += 1
        assert e.value.status == 429 and "tenant_requests_per_s" in e.value.message
        assert answered == 5  # the burst, then refused
        with pytest.raises(KVTierError) as e:  # the same bucket as REST's
            with KVTierClient(server.url, api_key=KEY_A, retries=0) as rest:
                rest.lookup(model, hashes=[bytes(32)])
        assert e.value.status == 429
        mb = b.register_spec(TINY)  # another tenant is not affected
        assert b.lookup(mb, hashes=[bytes(32)]).num_blocks == 0
    finally:
        a.close()
        b.close()


def test_the_socket_is_private_to_the_servers_user(server):
    st = os.stat(server.socket_path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
    if os.geteuid() != 0:
        pytest.skip("connecting as another user needs root (to switch to that user)")
    # another user cannot open it (the file mode); and if the mode is loosened, SO_PEERCRED still refuses
    for loosen in (False, True):
        if loosen:  # the operator opens the socket (and its directory) to everyone
            os.chmod(os.path.dirname(server.socket_path), 0o755)
            os.chmod(server.socket_path, 0o666)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: become "nobody", try the socket, report
            os.close(r)
            try:
                os.setgid(65534)
                os.setuid(65534)
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(5)
                try:
                    s.connect(server.socket_path)
                    answer = recv_msg(s, 1 << 16)
                    out = json.dumps(answer)
                except PermissionError:
                    out = "EACCES"
                except OSError as e:  # e.g. no answer (timeout): the server waits for a hello
                    out = json.dumps({"no answer": str(e)})
                os.write(w, out.encode())
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            out = f.read()
        os.waitpid(pid, 0)
        if not loosen:
            assert out == "EACCES"
        else:
            assert json.loads(out)["error"]["status"] == 403
    os.chmod(server.socket_path, 0o600)
    with KVTierClient(f"unix://{server.socket_path}", api_key=KEY_B) as c:  # the server's own user still gets in
        assert c.stats()["tenant"] == "globex"
