"""The settings class (env prefix KVTIER_, YAML file, units, validation) and the CLI's start-up checks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from kvtier.service.settings import Settings, parse_bytes, settings_table

from .server import ROOT


def test_defaults_run_embedded_and_open_on_loopback(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    s = Settings()
    assert s.host == "127.0.0.1" and s.open_mode and s.bind_problem() is None
    assert s.redis_url is None and s.device_capacity_bytes and s.host_capacity_bytes and s.disk_capacity_bytes
    assert s.data_dir == tmp_path / "kvtier"


def test_env_yaml_and_keyword_precedence(monkeypatch, tmp_path):
    cfg = tmp_path / "kvtier.yaml"
    cfg.write_text(
        "port: 9000\nhost_capacity_bytes: 64MiB\nquotas: {acme: 1GB}\napi_keys: {key-acme-0001: acme}\nredis_url: redis://127.0.0.1:1/0\n"
    )
    monkeypatch.setenv("KVTIER_CONFIG", str(cfg))
    monkeypatch.setenv("KVTIER_PORT", "9100")
    monkeypatch.setenv("KVTIER_DISK_CAPACITY_BYTES", "1.5GiB")
    s = Settings(log_level="WARNING")
    assert s.port == 9100  # env over YAML
    assert s.host_capacity_bytes == 64 << 20 and s.disk_capacity_bytes == int(1.5 * (1 << 30))
    assert s.quotas == {"acme": 10**9} and s.api_keys == {"key-acme-0001": "acme"} and not s.open_mode
    assert s.log_level == "warning" and s.redis_url == "redis://127.0.0.1:1/0"
    assert "key-acme-0001" not in str(s.redacted())
    assert Settings(port=9200).port == 9200  # keywords (the CLI flags) over env


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"port": 70000}, "port"),
        ({"host_capacity_bytes": "12 parsecs"}, "host_capacity_bytes"),
        ({"device_policy": "random"}, "device_policy"),
        ({"redis_url": "http://x"}, "redis_url"),
        ({"api_keys": {"short": "a"}}, "api_keys"),
        ({"api_keys": {"long-enough-key": "bad tenant!"}}, "api_keys"),
        ({"quotas": {"ghost": 10}}, "quotas"),
        ({"low_watermark": 0.99, "high_watermark": 0.9}, "low_watermark"),
        ({"device_capacity_bytes": 0, "host_capacity_bytes": 0, "disk_capacity_bytes": 0}, "every tier"),
        ({"bogus": 1}, "bogus"),
        ({"local_bulk_io_priority": "urgent"}, "local_bulk_io_priority"),
        ({"tier_io_priority": "realtime"}, "tier_io_priority"),
        ({"tier_io_nice": 20}, "tier_io_nice"),
    ],
)
def test_invalid_settings_name_the_field(kwargs, field):
    with pytest.raises(ValidationError) as e:
        Settings(**kwargs)
    assert field in str(e.value)


def test_units_and_table():
    assert parse_bytes("512MiB") == 512 << 20 and parse_bytes("8GB") == 8 * 10**9 and parse_bytes(7) == 7
    table = settings_table()
    for name in Settings.model_fields:
        assert f"`KVTIER_{name.upper()}`" in table


def _cli(*args, env=None, timeout=60):
    e = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "kvtier.service.cli", *args], cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout
    )


def test_cli_refuses_open_mode_on_a_public_address_and_bad_config(tmp_path):
    out = _cli("serve", "--host", "0.0.0.0", "--port", "1", env={"KVTIER_DATA_DIR": str(tmp_path)})
    assert out.returncode == 2 and "no API keys" in out.stderr
    out = _cli("serve", env={"KVTIER_PORT": "not-a-port", "KVTIER_DATA_DIR": str(tmp_path)})
    assert out.returncode == 2 and "port" in out.stderr
    out = _cli("settings", "--markdown")
    assert out.returncode == 0 and "KVTIER_REDIS_URL" in out.stdout


def test_open_mode_is_announced_at_start(open_server):
    assert "OPEN MODE" in open_server.log_text() and "127.0.0.1" in open_server.log_text()
