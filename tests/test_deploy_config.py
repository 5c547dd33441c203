"""The deploy/ configuration against the metrics the services actually export."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
import yaml
from prometheus_client import CollectorRegistry

from splitllm.services.common.metrics import CoordinatorMetrics, StageMetrics, serve_metrics, set_build_info

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
DEFAULT_METRICS = {"127.0.0.1:9400": None, **{f"127.0.0.1:{9400 + k}": str(k) for k in range(1, 5)}}
RAW_NAME = re.compile(r"\bsplitllm_\w+")
RECORDED_NAME = re.compile(r"\bsplitllm:[\w:]+")
BY_LABELS = re.compile(r"\bby\s*\(([^)]*)\)")


def load_yaml(rel: str) -> dict:
    return yaml.safe_load((DEPLOY / rel).read_text())


def rules() -> list[dict]:
    return [r for g in load_yaml("prometheus/rules.yml")["groups"] for r in g["rules"]]


def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana/dashboards/splitllm.json").read_text())


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p["targets"]]


@pytest.fixture(scope="module")
def samples() -> list:
    """Every sample of a coordinator and four stage processes, as the services build them."""
    registries = []
    for stage in (None, 1, 2, 3, 4):
        reg = CollectorRegistry()
        if stage is None:
            CoordinatorMetrics(reg)
        else:
            StageMetrics(reg, stage, "0")
        set_build_info(reg, "0.1.0", "f" * 64, "cpu", stage)
        registries.append(reg)
    return [s for reg in registries for family in reg.collect() for s in family.samples]


def test_every_queried_name_is_exported(samples) -> None:
    exported = {s.name for s in samples}
    exprs = [r["expr"] for r in rules()] + dashboard_exprs()
    queried = {n for e in exprs for n in RAW_NAME.findall(e)}
    assert queried, "no splitllm_ names found in the queries"
    assert queried <= exported, f"queried but not exported: {sorted(queried - exported)}"


def test_recorded_names_are_defined(samples) -> None:
    recorded = {r["record"] for r in rules()}
    assert all(RECORDED_NAME.fullmatch(n) for n in recorded)
    used = {n for e in [r["expr"] for r in rules()] + dashboard_exprs() for n in RECORDED_NAME.findall(e)}
    assert used <= recorded, f"used but never recorded: {sorted(used - recorded)}"
    for name in ("splitllm:ttft_seconds:p50", "splitllm:ttft_seconds:p95",
                 "splitllm:inter_token_latency_seconds:p50", "splitllm:inter_token_latency_seconds:p95",
                 "splitllm:generated_tokens:rate1m", "splitllm:kv_cache_usage:ratio"):
        assert name in recorded


def test_grouping_labels_exist_and_labels_stay_low_cardinality(samples) -> None:
    labels = {k for s in samples for k in s.labels}
    build_info = {"version", "manifest_sha256", "backend"}
    assert labels <= {"stage", "replica", "mode", "status", "code", "reason", "outcome", "le"} | build_info
    exprs = [r["expr"] for r in rules()] + dashboard_exprs()
    grouped = {g.strip() for e in exprs for m in BY_LABELS.findall(e) for g in m.split(",")}
    assert grouped <= labels


def test_dashboard_uses_the_provisioned_datasource() -> None:
    (source,) = load_yaml("grafana/provisioning/datasources/prometheus.yml")["datasources"]
    dash = dashboard()
    assert 36 <= dash["schemaVersion"] <= 41
    panels = dash["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for p in panels:
        assert p["type"] == "timeseries" and p["targets"]
        for ref in [p["datasource"]] + [t["datasource"] for t in p["targets"]]:
            assert ref == {"type": source["type"], "uid": source["uid"]}
    provider = load_yaml("grafana/provisioning/dashboards/splitllm.yml")["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


def test_prometheus_scrapes_the_default_ports() -> None:
    config = load_yaml("prometheus/prometheus.yml")
    assert config["rule_files"] == ["rules.yml"]
    targets = {t: sc.get("labels", {}).get("stage")
               for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == DEFAULT_METRICS


def test_metrics_served_over_http() -> None:
    reg = CollectorRegistry()
    stage = StageMetrics(reg, 2, "r0")
    set_build_info(reg, "0.1.0", "ab" * 32, "qnn", 2)
    stage.forward_seconds["token"].observe(0.003)
    stage.watch_kv(SimpleNamespace(in_use=1, bytes_in_use=256, bytes_capacity=1024))
    stage.error(grpc.StatusCode.NOT_FOUND)
    coordinator = CoordinatorMetrics(reg2 := CollectorRegistry())
    coordinator.requests["ok"].inc()
    servers = [serve_metrics(reg, 0), serve_metrics(reg2, 0)]
    try:
        stage_text, coord_text = (
            urllib.request.urlopen(f"http://127.0.0.1:{s.server_port}/metrics", timeout=5).read().decode()
            for s in servers)
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()
    sha = "ab" * 32
    assert f'splitllm_build_info{{backend="qnn",manifest_sha256="{sha}",stage="2",version="0.1.0"}} 1.0' \
        in stage_text
    assert 'splitllm_stage_kv_cache_usage_ratio{replica="r0",stage="2"} 0.25' in stage_text
    assert 'splitllm_stage_forward_seconds_bucket{le="0.005",mode="token",replica="r0",stage="2"} 1.0' \
        in stage_text
    assert 'splitllm_stage_errors_total{code="NOT_FOUND",replica="r0",stage="2"} 1.0' in stage_text
    assert 'splitllm_requests_total{status="ok"} 1.0' in coord_text


def test_image_gives_the_stages_the_launchers_huge_pages() -> None:
    from splitllm.services.client.launcher import HUGE_PAGES

    assert f"ENV GLIBC_TUNABLES={HUGE_PAGES}\n" in (DEPLOY / "Dockerfile").read_text()
