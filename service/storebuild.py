"""Build the TieredStore that ``kvtier serve`` runs on, from the settings, and probe its tiers.

Tiers, fastest first, each left out when its capacity is 0: device (a slot pool on CUDA, or in
CPU memory without a GPU), host memory, disk under ``data_dir/blocks``, and Redis when
``redis_url`` is set (the lowest tier: shared with other instances, written through by default).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kvtier.kvstore import DeviceTier, DiskTier, HostTier, TierConfig, TieredStore
from kvtier.kvstore.crypto import FrameCipher

from .settings import Settings

log = logging.getLogger(__name__)


def build_store(settings: Settings, on_invalidate=None) -> TieredStore:
    """The store of ``settings``. With Redis and ``redis_invalidation``, blocks other instances delete
    or rewrite are dropped from this store's own tiers, then ``on_invalidate(keys, deleted)`` is called
    (``keys`` None: announcements were missed)."""
    s = settings
    key = s.encryption_key_bytes()
    cipher = None if key is None else FrameCipher(key)  # disk and Redis: the tiers whose bytes leave the process
    marks: dict[str, Any] = dict(high_watermark=s.high_watermark, low_watermark=s.low_watermark)
    tiers: list[TierConfig] = []
    if s.device_capacity_bytes:
        # several specs may share the server: a block larger than the device slots goes on to the host tier
        tier = DeviceTier(s.device_capacity_bytes, slot_bytes=s.device_slot_bytes or None, refuse_oversize=True)
        tiers.append(TierConfig(tier, policy=s.device_policy, **marks))
    if s.host_capacity_bytes:
        tiers.append(
            TierConfig(
                HostTier(
                    s.host_capacity_bytes,
                    codec=s.host_codec,
                    warm_reserve_bytes=s.host_warm_reserve_bytes,
                    max_spare_bytes=s.host_max_spare_bytes,
                    spare_idle_s=s.host_spare_idle_s,
                ),
                policy=s.host_policy,
                **marks,
            )
        )
    if s.disk_capacity_bytes:
        disk = DiskTier(
            blocks_dir(s),
            s.disk_capacity_bytes,
            codec=s.disk_codec,
            fsync=s.disk_fsync,
            drop_written_pages=s.disk_drop_written_pages,
            min_free_bytes=s.disk_min_free_bytes,
            cipher=cipher,
        )
        tiers.append(TierConfig(disk, policy=s.disk_policy, write_through=s.disk_write_through and bool(tiers), **marks))
    if s.redis_url:
        from kvtier.kvstore.tiers.redis import RedisTier

        redis_tier = RedisTier(
            s.redis_url,
            codec=s.redis_codec,
            capacity_bytes=s.redis_capacity_bytes,
            ttl_s=s.redis_ttl_s,
            socket_timeout_s=s.redis_socket_timeout_s,
            retry_interval_s=s.redis_retry_interval_s,
            ssl_ca_certs=s.redis_ssl_ca_certs,
            max_connections=s.redis_max_connections,
            publish_invalidations=s.redis_invalidation,
            cipher=cipher,
            pending_deletes_path=pending_deletes_path(s),
        )
        # the first tier is written by every put anyway; write-through is for tiers below it
        tiers.append(TierConfig(redis_tier, policy=s.redis_policy, write_through=s.redis_write_through and bool(tiers), **marks))
    # every known tenant gets its quota (its own, or default_quota_bytes); tenants are the API keys' and the default ""
    quota_or_none = {t: s.quota_of(t) for t in {*s.api_keys.values(), ""}} | dict(s.quotas)
    quotas = {t: q for t, q in quota_or_none.items() if q is not None}
    store = TieredStore(
        tiers,
        quotas=quotas,
        promote_on_hit=s.promote_on_hit,
        max_events=s.max_events,
        max_pin_ttl_s=s.max_pin_ttl_s,
        shared_lookup_wait_s=s.redis_lookup_wait_s,
        io_nice=s.tier_io_nice,
        io_priority=s.tier_io_priority,
    )
    if s.redis_url and s.redis_invalidation:  # drop our copies of blocks other instances delete or rewrite

        def invalidated(keys, deleted):
            store.drop_local_copies(keys, deleted)
            if on_invalidate is not None:
                on_invalidate(keys, deleted)

        redis_tier.listen_invalidations(invalidated)
    return store


def pending_deletes_path(settings: Settings) -> Path:
    """Where the Redis tier records deletes Redis has not confirmed yet (read back at the next start):
    one file per Redis address under ``data_dir``, so pointing kvtier at another Redis ignores it."""
    split = urlsplit(str(settings.redis_url))
    where = f"{split.scheme}://{split.hostname}:{split.port}{split.path}".encode()
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    return Path(settings.data_dir) / f"redis-pending-deletes-{hashlib.sha256(where).hexdigest()[:16]}"


def blocks_dir(settings: Settings) -> Path:
    return Path(settings.data_dir) / "blocks"


class TierProbe:
    """Readiness of each tier: memory tiers are always there; the disk must be writable; Redis must answer PING."""

    def __init__(self, settings: Settings, tier_names: list[str]) -> None:
        self.settings = settings
        self.tier_names = tier_names
        self._redis: Any = None  # a redis-py client, made at the first readiness check
        self._last_warn = -1e9

    def check(self) -> dict[str, str]:
        """Tier -> "ok", or why not (no addresses, paths or secrets: ``/readyz`` is public)."""
        out = {}
        for name in self.tier_names:
            if name == "disk":
                path = blocks_dir(self.settings)
                if not (path.is_dir() and os.access(path, os.W_OK)):
                    out[name] = "not writable"
                elif self.settings.disk_min_free_bytes and _free_bytes(path) < self.settings.disk_min_free_bytes:
                    out[name] = "full: less free space than disk_min_free_bytes (blocks stay in memory or puts are refused)"
                else:
                    out[name] = "ok"
            elif name == "redis":
                out[name] = self._ping_redis()
            else:
                out[name] = "ok"
        return out

    def _ping_redis(self) -> str:
        try:
            if self._redis is None:
                self._redis = _redis_client(self.settings)
            self._redis.ping()
            return "ok"
        except Exception as e:  # any failure to answer PING is "unreachable", with the reason
            client, self._redis = self._redis, None
            if client is not None:
                try:
                    client.close()
                except Exception:
                    pass
            if time.monotonic() - self._last_warn > 30:  # the detail (address, reason) goes to the log only
                self._last_warn = time.monotonic()
                log.warning("readiness: Redis does not answer PING: %s: %s", type(e).__name__, str(e)[:300])
            return f"unreachable ({type(e).__name__})"

    def close(self) -> None:
        if self._redis is not None:
            try:
                self._redis.close()
            except Exception:
                pass


def _free_bytes(path: Path) -> int:
    try:
        st = os.statvfs(path)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def _redis_client(settings: Settings):
    import redis
    from redis.cluster import RedisCluster

    url = settings.redis_url
    if url is None:
        raise ValueError("redis_url is not set")
    scheme, rest = url.split("://", 1)
    opts: dict[str, Any] = dict(socket_timeout=1.0, socket_connect_timeout=1.0)
    if scheme.lower().startswith("rediss") and settings.redis_ssl_ca_certs:
        opts["ssl_ca_certs"] = str(settings.redis_ssl_ca_certs)
    if scheme.lower().endswith("+cluster"):
        base = "rediss" if scheme.lower().startswith("rediss") else "redis"
        return RedisCluster.from_url(f"{base}://{rest.split('/', 1)[0]}", **opts)
    return redis.Redis.from_url(url, **opts)
