"""docker-compose.yml, its Dockerfile and the observability files are valid (no engine runs here)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="needs the docker-compose binary (apt-get install docker-compose)")
def test_compose_config_validates():
    for args in ([], ["--profile", "observability"]):
        out = subprocess.run(["docker-compose", *args, "config"], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
    services = yaml.safe_load(
        subprocess.run(
            ["docker-compose", "--profile", "observability", "config"], cwd=ROOT, capture_output=True, text=True, timeout=60
        ).stdout
    )["services"]
    assert set(services) == {"kvtier", "redis", "prometheus", "grafana"}
    assert all("healthcheck" in services[s] for s in services)
    assert services["kvtier"]["environment"]["KVTIER_REDIS_URL"] == "redis://redis:6379/0"
    assert any(
        str(v).startswith("kvtier-data:/data") or (isinstance(v, dict) and v.get("target") == "/data")
        for v in services["kvtier"]["volumes"]
    )


def test_compose_files_are_consistent():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert compose["services"]["prometheus"]["profiles"] == ["observability"]
    assert compose["services"]["grafana"]["profiles"] == ["observability"]
    prom = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    assert prom["scrape_configs"][0]["static_configs"][0]["targets"] == ["kvtier:8080"]
    dash = json.loads((ROOT / "deploy/grafana/dashboards/kvtier.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    for metric in ("kvtier_lookup_blocks_total", "kvtier_tier_bytes", "kvtier_request_duration_seconds_bucket", "kvtier_tier_hits_total"):
        assert metric in exprs
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "kvtier" in dockerfile and "HEALTHCHECK" in dockerfile and "/data" in dockerfile
