"""Build the TieredStore that ``kvtier serve`` runs on, from the settings, and probe its tiers.

Tiers, fastest first, each left out when its capacity is 0: device (a slot pool on CUDA, or in
CPU memory without a GPU), host memory, disk under ``data_dir/blocks``, and Redis when
``redis_url`` is set (the lowest tier: shared with other instances, written through by default).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from kvtier.kvstore import DeviceTier, DiskTier, HostTier, TierConfig, TieredStore

from .settings import Settings

log = logging.getLogger(__name__)


def build_store(settings: Settings) -> TieredStore:
    s = settings
    marks = dict(high_watermark=s.high_watermark, low_watermark=s.low_watermark)
    tiers: list[TierConfig] = []
    if s.device_capacity_bytes:
        # several specs may share the server: a block larger than the device slots goes on to the host tier
        tier = DeviceTier(s.device_capacity_bytes, slot_bytes=s.device_slot_bytes or None, refuse_oversize=True)
        tiers.append(TierConfig(tier, policy=s.device_policy, **marks))
    if s.host_capacity_bytes:
        tiers.append(TierConfig(HostTier(s.host_capacity_bytes, codec=s.host_codec), policy=s.host_policy, **marks))
    if s.disk_capacity_bytes:
        disk = DiskTier(blocks_dir(s), s.disk_capacity_bytes, codec=s.disk_codec, fsync=s.disk_fsync)
        tiers.append(TierConfig(disk, policy=s.disk_policy, **marks))
    if s.redis_url:
        from kvtier.kvstore.tiers.redis import RedisTier

        redis_tier = RedisTier(
            s.redis_url, codec=s.redis_codec, capacity_bytes=s.redis_capacity_bytes, ttl_s=s.redis_ttl_s,
            socket_timeout_s=s.redis_socket_timeout_s, retry_interval_s=s.redis_retry_interval_s,
            ssl_ca_certs=s.redis_ssl_ca_certs, max_connections=s.redis_max_connections,
        )
        # the first tier is written by every put anyway; write-through is for tiers below it
        tiers.append(TierConfig(redis_tier, policy=s.redis_policy, write_through=s.redis_write_through and bool(tiers), **marks))
    return TieredStore(tiers, quotas=dict(s.quotas), promote_on_hit=s.promote_on_hit, max_events=s.max_events,
                       max_pin_ttl_s=s.max_pin_ttl_s)


def blocks_dir(settings: Settings) -> Path:
    return Path(settings.data_dir) / "blocks"


class TierProbe:
    """Readiness of each tier: memory tiers are always there; the disk must be writable; Redis must answer PING."""

    def __init__(self, settings: Settings, tier_names: list[str]) -> None:
        self.settings = settings
        self.tier_names = tier_names
        self._redis = None

    def check(self) -> dict[str, str]:
        out = {}
        for name in self.tier_names:
            if name == "disk":
                path = blocks_dir(self.settings)
                out[name] = "ok" if path.is_dir() and os.access(path, os.W_OK) else f"not writable: {path}"
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
            return f"unreachable: {type(e).__name__}: {str(e)[:200]}"

    def close(self) -> None:
        if self._redis is not None:
            try:
                self._redis.close()
            except Exception:
                pass


def _redis_client(settings: Settings):
    import redis
    from redis.cluster import RedisCluster

    url = settings.redis_url
    scheme, rest = url.split("://", 1)
    opts = dict(socket_timeout=1.0, socket_connect_timeout=1.0)
    if scheme.lower().startswith("rediss") and settings.redis_ssl_ca_certs:
        opts["ssl_ca_certs"] = str(settings.redis_ssl_ca_certs)
    if scheme.lower().endswith("+cluster"):
        base = "rediss" if scheme.lower().startswith("rediss") else "redis"
        return RedisCluster.from_url(f"{base}://{rest.split('/', 1)[0]}", **opts)
    return redis.Redis.from_url(url, **opts)
