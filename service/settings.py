"""The one typed settings class of ``kvtier serve``.

Every option has a default that runs an embedded store with no external service (device, host
and disk tiers; the disk under ``data_dir``). Values come from, highest priority first:

1. keyword arguments (the CLI passes ``--host``, ``--port``, ... this way),
2. environment variables ``KVTIER_<NAME>`` (e.g. ``KVTIER_REDIS_URL``; mappings as JSON:
   ``KVTIER_API_KEYS='{"key-1": "acme"}'``),
3. a YAML file named by ``config`` (``--config FILE`` or ``KVTIER_CONFIG``) whose keys are the
   field names below,
4. the defaults.

Byte sizes accept an int or a string with a unit: ``"512MiB"``, ``"8GB"``, ``"1.5GiB"``.
``kvtier settings --markdown`` prints the table of every option from the descriptions here.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, YamlConfigSettingsSource

ENV_PREFIX = "KVTIER_"
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": 1 << 10,
    "kib": 1 << 10,
    "mi": 1 << 20,
    "mib": 1 << 20,
    "gi": 1 << 30,
    "gib": 1 << 30,
    "ti": 1 << 40,
    "tib": 1 << 40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def parse_bytes(value: Any) -> Any:
    """``1024``, ``"64MiB"``, ``"1.5 GB"`` -> int bytes (other values are left to the type check)."""
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"a byte size must be an int or a number with a unit (KiB, MiB, GiB, KB, MB, GB), got {value!r}")
        return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    return value


ByteSize = Annotated[int, BeforeValidator(parse_bytes), Field(ge=0)]


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "kvtier"


class Settings(BaseSettings):
    """Configuration of ``kvtier serve`` (environment prefix ``KVTIER_``, optional YAML file)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True)

    # -- the server ------------------------------------------------------------------------
    config: Path | None = Field(None, description="YAML file with settings (keys are the names in this table); `--config` sets it.")
    host: str = Field("127.0.0.1", description="Address the REST server binds. A non-loopback address needs API keys or `insecure`.")
    port: int = Field(8080, ge=0, le=65535, description="REST port (0: pick a free one).")
    grpc_port: int | None = Field(
        50051, ge=0, le=65535, description="gRPC port on the same host; an empty value disables gRPC (0: pick a free one)."
    )
    local_socket: Path | None = Field(
        None,
        description="Unix socket of the same-host transport (control on the socket, block bytes through shared memory); clients use it with a `unix://PATH` URL. Empty: off.",
    )
    max_local_clients: int = Field(
        64, ge=1, description="Most connections to the local transport at once (each maps one shared-memory segment)."
    )
    max_local_segment_bytes: ByteSize = Field(
        256 << 20, description="Largest shared-memory segment a local-transport client may ask for (its memory is touched only as used)."
    )
    local_stream_stall_s: float = Field(
        5.0,
        gt=0,
        le=300,
        description="A streamed local put (the client writes a request's blocks into the segment while the server copies and verifies the parts already written) waits at most this long for the client's next part; a client that stalls longer loses its connection (it held one of `max_concurrent_transfers` meanwhile).",
    )
    local_bulk_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="How much lower the CPU priority (nice) of the local transport's put threads is than the rest of the server, so that a client filling the store does not slow down other clients' gets and lookups on a busy machine; 0: the same. The threads making a put's page summaries after its answer run at `local_summary_nice`.",
    )
    local_summary_nice: int = Field(
        19,
        ge=0,
        le=19,
        description="How much lower the CPU priority (nice) of the threads that make a local put's page summaries after its answer is than the rest of the server. The summaries are a cache (made again when a query needs one that is missing), so by default they yield the CPU to requests: a client putting back to back is not slowed down by the summaries of its earlier puts. 0: the same priority.",
    )
    local_bulk_io_priority: str = Field(
        "low",
        description="I/O priority of the same threads (they write a put's demotions to the disk tier): `low` (best-effort, level 7: served after other best-effort I/O where the scheduler orders by level, e.g. BFQ; never starved), `idle` (only when no other I/O is pending: a put may wait for it), `normal` (unchanged). See `kvtier/threads.py`.",
    )
    tier_io_nice: int = Field(
        0,
        ge=0,
        le=19,
        description="How much lower the CPU priority (nice) of the store's write-through threads (one pool per write-through tier: disk with `disk_write_through`, Redis) is than the rest of the server. A put waits for its write-throughs, so a higher value slows puts on a busy machine; 0: the same.",
    )
    tier_io_priority: str = Field(
        "low",
        description="I/O priority of the store's write-through threads: `low`, `idle` or `normal`, as `local_bulk_io_priority`.",
    )
    insecure: bool = Field(
        False, description="Allow binding a non-loopback host with no API keys configured (anyone who can connect is admin)."
    )
    log_level: str = Field("info", description="Log level: debug, info, warning, error.")
    torch_threads: int = Field(
        1,
        ge=0,
        description="Intra-op threads torch uses in `kvtier serve` (block copies, summaries, attention); 0: torch's default, one per core. Requests already run on threads of their own; intra-op threads on top of them wait for each other on a busy machine (docs/data-path.md).",
    )
    graceful_shutdown_s: float = Field(
        10.0, gt=0, description="On SIGTERM/SIGINT, seconds to let in-flight requests finish before the store is closed."
    )
    tls_cert: Path | None = Field(
        None, description="PEM certificate (chain) of the server: REST becomes HTTPS and gRPC uses TLS on the same ports. Needs `tls_key`."
    )
    tls_key: Path | None = Field(None, description="PEM private key of `tls_cert`.")
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="A REST connection must send a request's complete headers within this many seconds of opening (or of its previous answer); otherwise it is closed.",
    )
    idle_timeout_s: float = Field(5.0, gt=0, description="A REST keep-alive connection idle this long after an answer is closed.")
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Longest wait for the next chunk of a request body; beyond it the request gets 408 and the connection is closed.",
    )
    max_connections: int = Field(
        4096,
        ge=1,
        description="Most open REST connections; at the cap a new connection closes the longest-idle one (no request in progress), or is refused when none is idle.",
    )
    max_connections_per_client: int = Field(256, ge=1, description="Most open REST connections from one client address; beyond: refused.")
    grpc_max_connections: int = Field(
        4096, ge=1, description="Most open gRPC connections (idle ones included); beyond: a new connection is closed at once."
    )
    grpc_idle_timeout_s: float = Field(
        300.0,
        gt=0,
        description="A gRPC connection with no call in progress for this long is closed (GOAWAY; clients reconnect by themselves).",
    )
    grpc_max_streams_per_connection: int = Field(
        100, ge=1, description="Most gRPC calls in progress on one connection (HTTP/2 MAX_CONCURRENT_STREAMS); more wait in the client."
    )
    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="Directory of the disk tier (`blocks/`) and the registered specs (`specs.json`). Default `$XDG_DATA_HOME/kvtier` or `~/.local/share/kvtier`.",
    )

    # -- tiers (fastest first; a capacity of 0 leaves a tier out) ---------------------------
    device_capacity_bytes: ByteSize = Field(
        256 << 20, description="Bytes of the device tier (a preallocated pool on CUDA, or CPU memory without a GPU); 0 disables it."
    )
    device_slot_bytes: ByteSize = Field(
        8 << 20, description="Slot size of the device pool; blocks larger than a slot skip the device tier."
    )
    device_policy: str = Field("lru", description="Block eviction policy of the device tier (lru, fifo, lfu, s3fifo, cost, tenant_fair).")
    host_capacity_bytes: ByteSize = Field(1 << 30, description="Bytes of the host-memory tier; 0 disables it.")
    host_policy: str = Field("lru", description="Block eviction policy of the host tier.")
    host_codec: str = Field("identity", description="Codec of the host tier (a registered codec name, optionally `+stage`).")
    host_warm_reserve_bytes: ByteSize | None = Field(
        None,
        description=(
            "Pre-faulted spare buffers the host tier keeps for the next puts while it has room (a background thread at a "
            "lower priority touches them), counted against its capacity; unset: an eighth of the capacity, at most 64 MiB; "
            "0: off. See docs/data-path.md."
        ),
    )
    host_max_spare_bytes: ByteSize | None = Field(
        None,
        description=(
            "Most bytes of freed block buffers the host tier keeps for reuse by later puts (no page faults), counted against "
            "its capacity; unset: the capacity (used + spares never pass it). See docs/data-path.md."
        ),
    )
    host_spare_idle_s: float | None = Field(
        10.0,
        gt=0,
        description="Seconds after which spare buffers no put took are freed (down to the warm reserve) by the host tier's background thread; null (YAML): kept until a put needs the room.",
    )
    disk_capacity_bytes: ByteSize = Field(8 << 30, description="Bytes of the disk tier under `data_dir/blocks`; 0 disables it.")
    disk_policy: str = Field("lru", description="Block eviction policy of the disk tier.")
    disk_codec: str = Field("identity", description="Codec of the disk tier.")
    disk_fsync: bool = Field(False, description="fsync every block file before it becomes visible (durable across power loss, slower).")
    disk_drop_written_pages: bool = Field(
        True,
        description="With `disk_fsync`: drop each block file's pages from the kernel's page cache once it is fsync'ed (they are clean then), so that filling the disk tier does not grow the page cache by every byte written and each write reuses pages instead of taking fresh ones (4x less CPU per 6 MiB write on the benchmark VM, docs/data-path.md); a later read of such a block comes from the device. false: leave them cached.",
    )
    disk_write_through: bool = Field(
        False,
        description="Write every new block to the disk tier at once, so an acknowledged block survives even `kill -9` (slower puts); false: memory tiers reach the disk on demotion and at a graceful stop (`flush_on_close`).",
    )
    disk_min_free_bytes: ByteSize = Field(
        64 << 20,
        description="The disk tier writes nothing while its filesystem has less free space (the blocks stay in the tiers above, or the put is refused); `/readyz` then reports the disk as degraded.",
    )
    flush_on_close: bool = Field(
        True,
        description="At a graceful stop (SIGTERM/SIGINT), write every block held only in memory tiers to the disk tier, so it is found again at the next start.",
    )
    encryption_key: SecretStr | None = Field(
        None,
        description="AES-256-GCM key (64 hex characters) that encrypts every block written to the disk tier and to Redis: a reader of those bytes learns nothing, a tampered block is a miss. Unset: no encryption.",
    )
    redis_url: str | None = Field(
        None,
        description="Redis as the lowest, shared tier: `redis://`, `rediss://` (TLS), `redis+cluster://`, `rediss+cluster://`. Unset: no Redis.",
    )
    redis_capacity_bytes: ByteSize | None = Field(
        None, description="Bytes this instance may write to Redis; unset: bounded by Redis' own `maxmemory`."
    )
    redis_policy: str = Field("lru", description="Block eviction policy of the Redis tier (used when `redis_capacity_bytes` is set).")
    redis_codec: str = Field("identity", description="Codec of blocks written to Redis.")
    redis_ttl_s: float | None = Field(None, gt=0, description="Expiry of every block written to Redis, in seconds; unset: no expiry.")
    redis_invalidation: bool = Field(
        True,
        description="Announce every write and delete in the Redis stream `kvtier-invalidations` (outside the `kvtier:*` block keys), and drop this instance's own copies of blocks other instances delete or rewrite (coherence across instances sharing Redis).",
    )
    redis_write_through: bool = Field(
        True,
        description="Write every new block to Redis at once (other instances see it immediately); false: only demoted blocks reach Redis.",
    )
    write_through_retry_interval_s: float = Field(
        2.0,
        ge=0,
        description="Every this many seconds, blocks a write-through tier (Redis) refused while it was down are written to it again, up to 64 per round (puts also write up to 8 each); 0: only puts do it.",
    )
    redis_ssl_ca_certs: Path | None = Field(None, description="CA file to verify a `rediss://` server with (default: system CAs).")
    redis_socket_timeout_s: float = Field(2.0, gt=0, description="Bound of one Redis socket read or write, in seconds.")
    redis_retry_interval_s: float = Field(
        1.0,
        ge=0,
        description="After a Redis failure, seconds during which Redis is skipped (calls degrade to misses) before it is tried again.",
    )
    redis_max_connections: int = Field(64, ge=1, description="Redis connection pool size (per node on a cluster).")
    redis_lookup_wait_s: float = Field(
        0.005,
        ge=0,
        description="Longest a lookup waits for Redis to say which blocks it holds; past it the lookup answers from what this instance last saw in Redis (its own writes and reads, earlier answers, other instances' announcements), so a block only another instance wrote may be missed until then (never wrong KV: a get reads Redis itself). 0: never wait.",
    )
    high_watermark: float = Field(
        0.95, gt=0, le=1, description="A tier filled above this fraction of its capacity is brought down to `low_watermark` (every tier)."
    )
    low_watermark: float = Field(0.85, gt=0, le=1, description="Fill fraction a tier is evicted down to when it passes `high_watermark`.")
    promote_on_hit: bool = Field(True, description="Copy a block read from a lower tier into the fastest tier.")
    max_events: int = Field(100_000, ge=1, description="Length of the store's event stream (older events are dropped).")
    kv_events_endpoint: str | None = Field(
        None,
        description="Publish the store's events on this ZMQ endpoint in vLLM's KV-event wire format (`BlockStored`/`BlockRemoved`, medium `kvtier/<tier>`), for KV-aware routers. As in vLLM, `tcp://*:5557` (or `::`, `ipc://`, `inproc://`) is bound, any other endpoint is connected to. Unset: no publisher.",
    )
    kv_events_topic: str = Field("", description="ZMQ topic of the published KV events.")
    kv_events_interval_s: float = Field(0.05, gt=0, description="How often new store events are published.")
    kv_events_replay_endpoint: str | None = Field(
        None,
        description="Bind a ZMQ ROUTER socket here that replays recent KV-event batches from a given sequence number (vLLM's replay protocol: a DEALER sends `(b'', seq as 8 bytes big-endian)`, gets `(b'', topic, seq, payload)` per kept batch then `(b'', b'', -1, b'')`), for a subscriber that saw a gap. Unset: no replay.",
    )
    kv_events_buffer_batches: int = Field(
        10_000,
        ge=1,
        description="KV-event batches kept for replay, and held until the first subscription reaches the publisher (nothing is sent before it).",
    )

    # -- tenants and keys ------------------------------------------------------------------
    api_keys: dict[str, str] = Field(
        default_factory=dict,
        description="API key -> tenant name (`Authorization: Bearer <key>` or `X-API-Key`). Env: JSON object. Empty (and no `admin_key`): open mode, loopback only.",
    )
    admin_key: SecretStr | None = Field(
        None,
        description='Key with admin rights: stats and events of every tenant, `/metrics` when `metrics_auth`. Its own blocks live in the default tenant `""`.',
    )
    quotas: dict[str, ByteSize] = Field(
        default_factory=dict,
        description="Tenant -> byte quota (logical bytes, each block counted once); a tenant over quota evicts its own oldest blocks first. Env: JSON object.",
    )
    default_quota_bytes: ByteSize | None = Field(
        None,
        description="Byte quota of every tenant not named in `quotas` (the admin's default tenant included); unset: such tenants are bounded only by the tiers.",
    )
    tenant_requests_per_s: float | None = Field(
        None,
        gt=0,
        description="Requests per second each tenant may make (REST and gRPC together; a token bucket of `tenant_burst`); beyond: 429 with Retry-After. Unset: no rate limit.",
    )
    tenant_burst: int = Field(100, ge=1, description="Requests a tenant may make at once before `tenant_requests_per_s` applies.")
    metrics_auth: bool = Field(
        True, description="When keys are configured, `/metrics` needs the admin key (it names tenants); false: `/metrics` is public."
    )

    # -- request bounds --------------------------------------------------------------------
    max_request_bytes: ByteSize = Field(
        128 << 20,
        description="Largest body of a block upload (`PUT /v1/blocks`), and largest gRPC put stream; larger: 413. Also bounds the keys and values one `/v1/retrieve` or `/v1/attention` selection gathers.",
    )
    max_json_bytes: ByteSize = Field(16 << 20, description="Largest JSON request body; larger: 413.")
    max_blocks_per_request: int = Field(64, ge=1, description="Most blocks (frames or hashes) one put/get/delete/pin names.")
    max_tokens_per_request: int = Field(
        1 << 20, ge=1, description="Most token ids in one lookup (and most hashes in a lookup by hashes: this / 16)."
    )
    max_block_bytes: ByteSize = Field(64 << 20, description="Largest block (`spec.block_nbytes`) a spec may register.")
    max_specs: int = Field(256, ge=1, description="Most distinct specs registered at once.")
    max_specs_per_tenant: int = Field(
        32, ge=1, description="Most specs one tenant registers (`DELETE /v1/specs/{model}` unregisters one); beyond: 429."
    )
    max_pin_ttl_s: float = Field(3600.0, gt=0, description="Longest pin (lease) TTL, in seconds.")
    max_leases: int = Field(
        10_000, ge=1, description="Most live leases (pins) over all tenants; beyond: 429. A pin that pins nothing holds no lease."
    )
    max_leases_per_tenant: int = Field(1000, ge=1, description="Most live leases one tenant holds; beyond: 429 (for that tenant only).")
    max_events_per_request: int = Field(10_000, ge=1, description="Most events one `/v1/events` call returns.")
    max_tracked_keys: int = Field(
        100_000, ge=0, description="Blocks whose owner the service remembers to show tenants their own events (oldest forgotten first)."
    )
    max_concurrent_transfers: int = Field(
        8, ge=1, description="Block uploads/downloads processed at once (the others wait): bounds memory held by request bodies."
    )
    max_retrieve_budget: int = Field(
        65536, ge=1, description="Largest `budget` (tokens per layer and KV head) of `/v1/retrieve` and `/v1/attention`."
    )
    max_query_heads: int = Field(
        1024, ge=1, description="Most query heads of the decode query `q [L_q, H_q, D]` of `/v1/retrieve` and `/v1/attention`."
    )

    limit_concurrency: int | None = Field(
        1024,
        ge=1,
        description="Most REST requests in progress at once (and gRPC calls); beyond: 503. `/healthz` and `/readyz` answer even then. Open connections are bounded by `max_connections`.",
    )

    # -- retrieval ---------------------------------------------------------------------------
    summary_capacity_bytes: ByteSize = Field(
        64 << 20,
        description="Host memory for the page summaries (Quest bounds, mean key per 16 tokens) computed when blocks are put, LRU-bounded; 0: none computed at put (retrieval then reads and summarizes each block it searches).",
    )
    retrieve_sink_tokens: int = Field(
        4, ge=0, le=4096, description="First tokens of a chain every retrieval keeps (attention sinks); part of the budget."
    )
    tier_page_cache_bytes: ByteSize = Field(
        64 << 20,
        description="Host memory for the pages `/v1/attention` reads from blocks stored with a page-addressable codec (`paged`, `paged_int8`), LRU-bounded, shared by every request.",
    )
    retrieve_recent_tokens: int = Field(
        32, ge=0, le=65536, description="Last tokens of the cached prefix every retrieval keeps (recent window); part of the budget."
    )

    # -- validation ------------------------------------------------------------------------
    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        path = init_settings.init_kwargs.get("config") or os.environ.get(ENV_PREFIX + "CONFIG")
        sources = [init_settings, env_settings]
        if path:
            if not Path(path).is_file():
                raise ValueError(f"config file {str(path)!r} does not exist")
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=Path(path)))
        return tuple(sources)

    @field_validator(
        "grpc_port",
        "local_socket",
        "redis_url",
        "redis_capacity_bytes",
        "redis_ttl_s",
        "redis_ssl_ca_certs",
        "admin_key",
        "limit_concurrency",
        "tls_cert",
        "tls_key",
        "encryption_key",
        "default_quota_bytes",
        "tenant_requests_per_s",
        mode="before",
    )
    @classmethod
    def _empty_is_none(cls, v):
        return None if isinstance(v, str) and v.strip() == "" else v

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, v: str) -> str:
        v = v.lower()
        if v not in ("debug", "info", "warning", "error", "critical"):
            raise ValueError(f"log_level must be debug, info, warning, error or critical, got {v!r}")
        return v

    @field_validator("local_bulk_io_priority", "tier_io_priority")
    @classmethod
    def _io_priority(cls, v: str) -> str:
        from kvtier.threads import check_io_priority

        return check_io_priority(v.strip().lower())

    @field_validator("device_policy", "host_policy", "disk_policy", "redis_policy")
    @classmethod
    def _policy(cls, v: str) -> str:
        from kvtier.eviction.blocks import available_policies

        if v.strip().lower() not in available_policies():
            raise ValueError(f"unknown block policy {v!r}; known: {', '.join(available_policies())}")
        return v.strip().lower()

    @field_validator("host_codec", "disk_codec", "redis_codec")
    @classmethod
    def _codec(cls, v: str) -> str:
        from kvtier.kvstore import get_codec

        get_codec(v)  # ValueError names the known codecs
        return v

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^rediss?(\+cluster)?://", v.strip().lower()):
            raise ValueError(f"redis_url must start with redis://, rediss://, redis+cluster:// or rediss+cluster://, got {v!r}")
        return v

    @field_validator("api_keys")
    @classmethod
    def _api_keys(cls, v: dict[str, str]) -> dict[str, str]:
        for key, tenant in v.items():
            if len(key) < 8:
                raise ValueError("every API key must have at least 8 characters")
            if not TENANT_RE.match(tenant):
                raise ValueError(f"tenant names must match {TENANT_RE.pattern}, got {tenant!r}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "Settings":
        if self.low_watermark > self.high_watermark:
            raise ValueError(f"low_watermark ({self.low_watermark}) must not exceed high_watermark ({self.high_watermark})")
        if self.admin_key is not None:
            secret = self.admin_key.get_secret_value()
            if len(secret) < 8:
                raise ValueError("admin_key must have at least 8 characters")
            if secret in self.api_keys:
                raise ValueError("admin_key must differ from every tenant API key")
        known = set(self.api_keys.values()) | {""}
        unknown = sorted(set(self.quotas) - known)
        if unknown:
            raise ValueError(f'quotas name tenants that no API key maps to: {unknown} (the default tenant is "")')
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both (TLS) or neither")
        for name in ("tls_cert", "tls_key"):
            if getattr(self, name) is not None and not Path(getattr(self, name)).is_file():
                raise ValueError(f"{name} {str(getattr(self, name))!r} is not a file")
        if self.encryption_key is not None:
            self.encryption_key_bytes()  # ValueError names the expected form
        if not any((self.device_capacity_bytes, self.host_capacity_bytes, self.disk_capacity_bytes, self.redis_url)):
            raise ValueError("every tier is disabled: give at least one tier a capacity, or set redis_url")
        return self

    # -- derived ---------------------------------------------------------------------------
    @property
    def open_mode(self) -> bool:
        """No keys configured: every caller is admin of the default tenant."""
        return not self.api_keys and self.admin_key is None

    def encryption_key_bytes(self) -> bytes | None:
        """The 32-byte AES-256 key of ``encryption_key`` (None: unset); ValueError if it is not 64 hex characters."""
        if self.encryption_key is None:
            return None
        text = self.encryption_key.get_secret_value().strip()
        try:
            key = bytes.fromhex(text)
        except ValueError:
            key = b""
        if len(key) != 32:
            raise ValueError("encryption_key must be 64 hex characters (a 32-byte AES-256 key), e.g. from `openssl rand -hex 32`")
        return key

    def quota_of(self, tenant: str) -> int | None:
        return self.quotas.get(tenant, self.default_quota_bytes)

    def bind_problem(self) -> str | None:
        """Why this configuration must not serve on ``host`` (None: fine)."""
        if not self.open_mode or self.insecure or is_loopback(self.host):
            return None
        return (
            f"refusing to bind {self.host!r} with no API keys configured: anyone who can connect would be admin. "
            "Set KVTIER_API_KEYS / KVTIER_ADMIN_KEY, bind 127.0.0.1, or pass --insecure"
        )

    def redacted(self) -> dict:
        """The settings as a dict with every secret masked (for logs and `kvtier settings`)."""
        d = self.model_dump(mode="json")
        d["api_keys"] = {_mask(k): t for k, t in self.api_keys.items()}
        d["admin_key"] = None if self.admin_key is None else "********"
        d["encryption_key"] = None if self.encryption_key is None else "********"
        if self.redis_url:
            d["redis_url"] = re.sub(r"//[^@/]*@", "//***@", self.redis_url)
        return d


def _mask(key: str) -> str:
    return key[:3] + "…" if len(key) > 3 else "…"


def is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def settings_table() -> str:
    """Markdown table of every option: name, environment variable, default, meaning."""
    rows = ["| name | env var | default | meaning |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        if field.default_factory is not None:
            default = {"data_dir": "`~/.local/share/kvtier`", "api_keys": "`{}`", "quotas": "`{}`"}.get(name, "")
        elif field.default is None:
            default = "unset"
        elif isinstance(field.default, int) and not isinstance(field.default, bool) and field.default >= 1 << 20 and name.endswith("bytes"):
            default = f"`{_human(field.default)}`"
        else:
            default = f"`{field.default}`"
        rows.append(f"| `{name}` | `{ENV_PREFIX}{name.upper()}` | {default} | {field.description} |")
    return "\n".join(rows)


def _human(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n % size == 0:
            return f"{n // size}{unit}"
    return str(n)
