"""Redis servers for the tests: single node, TLS, and a 3-node Redis Cluster (a pytest plugin).

Every server is a ``redis-server`` child process started by the tests themselves on a free
127.0.0.1 port, with its own temporary directory and no persistence; nothing here ever touches a
Redis the machine already runs. Fixtures:

- ``redis_server`` (session): one shared server; ``redis_url`` (function) flushes it and yields
  its url (``redis://127.0.0.1:PORT/0``).
- ``fresh_redis_server`` (function): a private server a test may ``stop()`` and ``start()`` again.
- ``redis_tls_server`` (session): a TLS-only server (``rediss://``) whose CA and server certificate
  are made with the ``openssl`` CLI; ``ca_cert`` is the CA file a client must trust.
- ``redis_cluster`` (session): a 3-primary Redis Cluster; ``redis_cluster_url`` (function) flushes
  every primary and yields ``redis+cluster://127.0.0.1:PORT``; ``fresh_redis_cluster`` (function)
  is a private one whose nodes (``servers``) a test may stop and start.

Missing binaries mean a skip on a developer machine and a failure on CI (``CI=true`` or ``CI=1``):
a CI run that silently skipped every Redis test would prove nothing. Tests marked
``@pytest.mark.redis`` get the same treatment even when they use none of these fixtures.
"""

from __future__ import annotations

import atexit
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

HOST = "127.0.0.1"  # loopback only, always
START_TIMEOUT_S = 15.0
# Ports are drawn below the kernel's ephemeral range (32768+ on Linux), so that an outgoing
# connection of some other process cannot take a port between our probe and redis' bind, nor
# while a test has stopped a server it means to start again on the same port.
_PORT_RANGE = (20000, 32000)

_live: set["RedisServer"] = set()  # servers not yet closed: killed and removed at exit whatever happens


def on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


def require_binaries(*names: str, what: str = "Redis tests") -> None:
    """Skip (or fail on CI) unless every binary in ``names`` is on PATH."""
    missing = [n for n in names if shutil.which(n) is None]
    if not missing:
        return
    msg = f"{what} need {', '.join(missing)} on PATH (install Redis >= 6, e.g. `apt-get install redis-server`)"
    if on_ci():
        pytest.fail(f"{msg}; CI is set, so a missing Redis is a failure, not a skip", pytrace=False)
    pytest.skip(msg)


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port(*, avoid: set[int] = frozenset()) -> int:
    """A port in ``_PORT_RANGE`` that is free on 127.0.0.1 right now."""
    for _ in range(200):
        port = random.randrange(*_PORT_RANGE)
        if port not in avoid and _port_is_free(port):
            return port
    raise RuntimeError(f"no free port found on {HOST} in {_PORT_RANGE}")


class PortInUse(RuntimeError):
    """redis-server could not bind the port it was given."""


try:  # looked up here, not in the child: only a C call may run between fork and exec
    import ctypes

    _prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None
except (OSError, AttributeError):  # pragma: no cover
    _prctl = None


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the test process dies, even by SIGKILL (no leaked servers)."""
    _prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1, with its own temporary directory.

    ``port=None`` picks a free port (and another one if the bind loses a race); ``start()``
    after ``stop()`` reuses the same port. ``tls`` is a ``TlsFiles`` to serve TLS only;
    ``extra_args`` are more ``--option value`` arguments (e.g. cluster mode).
    """

    def __init__(
        self, *, port: int | None = None, tls: "TlsFiles | None" = None, extra_args: tuple[str, ...] = (), start: bool = True
    ) -> None:
        self.host = HOST
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port()
        self.tls = tls
        self.ca_cert = str(tls.ca_cert) if tls else None
        self.extra_args = tuple(extra_args)
        self.dir = Path(tempfile.mkdtemp(prefix="kvtier-redis-"))
        self.proc: subprocess.Popen | None = None
        _live.add(self)
        if start:
            try:
                self.start()
            except BaseException:
                self.close()
                raise

    # -- addresses ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://{self.host}:{self.port}/0"

    @property
    def logfile(self) -> Path:
        return self.dir / "redis.log"

    def client(self, **kwargs):
        """A ``redis.Redis`` for this server (TLS set up when the server is TLS-only)."""
        import redis

        opts = dict(socket_timeout=5.0, socket_connect_timeout=2.0)
        if self.tls:
            opts["ssl_ca_certs"] = self.ca_cert
        opts.update(kwargs)
        return redis.Redis.from_url(self.url, **opts)

    # -- life cycle --------------------------------------------------------------------------
    def _argv(self) -> list[str]:
        argv = [
            "redis-server",
            "--bind",
            self.host,
            "--protected-mode",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.dir),
            "--logfile",
            str(self.logfile),
            "--daemonize",
            "no",
        ]
        if self.tls:
            argv += [
                "--port",
                "0",
                "--tls-port",
                str(self.port),
                "--tls-cert-file",
                str(self.tls.server_cert),
                "--tls-key-file",
                str(self.tls.server_key),
                "--tls-ca-cert-file",
                str(self.tls.ca_cert),
                "--tls-auth-clients",
                "no",
            ]
        else:
            argv += ["--port", str(self.port)]
        return argv + list(self.extra_args)

    def start(self) -> "RedisServer":
        """Start the server (same port as before) and wait until it answers PING."""
        if self.running:
            return self
        for attempt in range(5):
            self.proc = subprocess.Popen(
                self._argv(),
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                preexec_fn=_die_with_parent if _prctl is not None else None,
            )
            if self._wait_ready():
                return self
            log = self._log_tail()
            self.stop()
            in_use = "Address already in use" in log
            if in_use and not self._fixed_port and attempt < 4:
                self.port = free_port(avoid={self.port})  # lost a race for the port: draw another
                continue
            raise (PortInUse if in_use else RuntimeError)(
                f"redis-server on {self.host}:{self.port} did not start; its log ends with:\n{log}"
            )
        raise AssertionError("unreachable")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT_S
        client = self.client(socket_timeout=1.0, socket_connect_timeout=1.0)
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    return False
                try:
                    if client.ping():
                        return True
                except Exception:
                    pass
                time.sleep(0.02)
            return False
        finally:
            client.close()

    def _log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """Kill the server (no shutdown save) and wait for it to exit."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - a kill that does not kill
            pass

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
        _live.discard(self)

    def __enter__(self) -> "RedisServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RedisServer({self.url}, running={self.running})"


@atexit.register
def _close_leftovers() -> None:
    for server in list(_live):
        server.close()


# -- TLS -------------------------------------------------------------------------------------
class TlsFiles:
    """A throw-away CA and a server certificate for 127.0.0.1 signed by it (``openssl`` CLI)."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.ca_key, self.ca_cert = self.dir / "ca.key", self.dir / "ca.crt"
        self.server_key, self.server_cert = self.dir / "server.key", self.dir / "server.crt"
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        self._openssl(
            "req",
            "-x509",
            *ec,
            "-keyout",
            self.ca_key,
            "-out",
            self.ca_cert,
            "-days",
            "7",
            "-subj",
            "/CN=kvtier test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        )
        csr, ext = self.dir / "server.csr", self.dir / "server.ext"
        ext.write_text(
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth\n"
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
            "authorityKeyIdentifier=keyid\n"
            "subjectKeyIdentifier=hash\n"
        )
        self._openssl("req", "-new", *ec, "-keyout", self.server_key, "-out", csr, "-subj", "/CN=127.0.0.1")
        self._openssl(
            "x509",
            "-req",
            "-in",
            csr,
            "-CA",
            self.ca_cert,
            "-CAkey",
            self.ca_key,
            "-CAcreateserial",
            "-out",
            self.server_cert,
            "-days",
            "7",
            "-extfile",
            ext,
        )

    def _openssl(self, *args) -> None:
        res = subprocess.run(["openssl", *map(str, args)], cwd=self.dir, capture_output=True, text=True, timeout=60)
        if res.returncode:
            raise RuntimeError(f"openssl {args[0]} failed: {res.stderr.strip()}")


# -- cluster ---------------------------------------------------------------------------------
class RedisCluster:
    """A Redis Cluster of ``num_nodes`` primaries (no replicas) on free 127.0.0.1 ports."""

    def __init__(self, num_nodes: int = 3) -> None:
        self.servers: list[RedisServer] = []
        try:
            used: set[int] = set()
            for _ in range(num_nodes):
                for attempt in range(5):
                    port = free_port(avoid=used)
                    bus = free_port(avoid=used | {port})
                    used |= {port, bus}
                    try:
                        self.servers.append(
                            RedisServer(
                                port=port,
                                extra_args=(
                                    "--cluster-enabled",
                                    "yes",
                                    "--cluster-config-file",
                                    "nodes.conf",
                                    "--cluster-port",
                                    str(bus),  # the bus port, chosen too (default port+10000)
                                    "--cluster-node-timeout",
                                    "5000",
                                ),
                            )
                        )
                        break
                    except PortInUse:  # another process took a port between probe and bind
                        if attempt == 4:
                            raise
            self._create()
        except BaseException:
            self.close()
            raise

    @property
    def nodes(self) -> list[tuple[str, int]]:
        return [(s.host, s.port) for s in self.servers]

    @property
    def url(self) -> str:
        return f"redis+cluster://{self.servers[0].host}:{self.servers[0].port}"

    def _create(self) -> None:
        addrs = [f"{h}:{p}" for h, p in self.nodes]
        res = subprocess.run(
            ["redis-cli", "--cluster", "create", *addrs, "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        if res.returncode:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{res.stdout}\n{res.stderr}")
        deadline = time.monotonic() + 30
        while True:
            states = [self._cluster_info(s) for s in self.servers]
            if all(
                st.get("cluster_state") == "ok"
                and st.get("cluster_known_nodes") == str(len(self.servers))
                and st.get("cluster_slots_ok") == "16384"
                for st in states
            ):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster did not reach cluster_state:ok: {states}")
            time.sleep(0.05)

    @staticmethod
    def _cluster_info(server: RedisServer) -> dict:
        with server.client() as c:
            info = c.execute_command("CLUSTER INFO")  # redis-py parses it into a dict
        if isinstance(info, (bytes, str)):
            text = info.decode() if isinstance(info, bytes) else info
            info = dict(line.split(":", 1) for line in text.split() if ":" in line)
        return {str(k): str(v) for k, v in info.items()}

    def flushall(self) -> None:
        for s in self.servers:
            with s.client() as c:
                c.flushall()

    def close(self) -> None:
        for s in self.servers:
            s.close()

    def __repr__(self) -> str:
        return f"RedisCluster({self.url}, nodes={self.nodes})"


# -- the marker ------------------------------------------------------------------------------
def pytest_runtest_setup(item) -> None:
    if item.get_closest_marker("redis") is not None:
        require_binaries("redis-server")


# -- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def redis_server():
    """A session-wide ``RedisServer`` (use ``redis_url`` for a flushed one per test)."""
    require_binaries("redis-server")
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server) -> str:
    """The session server's url, FLUSHALLed before the test."""
    if not redis_server.running:  # a test stopped it: bring it back for the next one
        redis_server.start()
    with redis_server.client() as c:
        c.flushall()
    return redis_server.url


@pytest.fixture
def fresh_redis_server():
    """A private ``RedisServer`` for one test, which may stop and start it."""
    require_binaries("redis-server")
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def redis_tls_server():
    """A session-wide TLS-only ``RedisServer``: ``url`` is ``rediss://``, ``ca_cert`` the CA file."""
    require_binaries("redis-server", what="Redis tests")
    require_binaries("openssl", what="Redis TLS tests")
    cert_dir = tempfile.mkdtemp(prefix="kvtier-redis-tls-")
    try:
        with RedisServer(tls=TlsFiles(Path(cert_dir))) as server:
            yield server
    finally:
        shutil.rmtree(cert_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_cluster():
    """A session-wide 3-primary Redis Cluster: ``url`` (``redis+cluster://``), ``nodes``, ``servers``."""
    require_binaries("redis-server", "redis-cli", what="Redis Cluster tests")
    cluster = RedisCluster(3)
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def fresh_redis_cluster():
    """A private 3-primary cluster for one test, which may stop and start its nodes."""
    require_binaries("redis-server", "redis-cli", what="Redis Cluster tests")
    cluster = RedisCluster(3)
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def redis_cluster_url(redis_cluster) -> str:
    """The session cluster's url, every primary flushed before the test."""
    redis_cluster.flushall()
    return redis_cluster.url
