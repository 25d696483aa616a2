"""A real Prometheus scrapes a real detr-serve with the project's own prometheus.yml.

Needs Debian's `prometheus` package (prometheus and promtool on PATH): `make test-deps`
installs it. Under CI=true a missing binary fails the test instead of skipping it.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from scripts.bench.serverproc import RunningServer, free_port
from tests.conftest import shapes_image

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_YML = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "detr-serve.json"
ADAPTER_RULES = ROOT / "deploy" / "k8s" / "prometheus-adapter-rules.yaml"
JOB = "detr-serve"
IMAGES_SENT = 5  # three requests of 1 + 1 + 3 images


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path:
        return path
    message = f"`{name}` is not on PATH: `make test-deps` installs Debian's prometheus package"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def prometheus_bin() -> str:
    return _binary("prometheus")


@pytest.fixture(scope="module")
def promtool_bin() -> str:
    return _binary("promtool")


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[RunningServer]:
    srv = RunningServer(
        ["--model", str(tiny_model_dir), "--default-threshold", "0.0"],
        env={"DETR_SERVE_TORCH_THREADS": "1"},
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def served_images(server: RunningServer) -> int:
    data = base64.b64encode(shapes_image()).decode()
    for count in (1, 1, 3):
        r = httpx.post(
            server.url + "/v1/detect", json={"images": [{"data": data}] * count}, timeout=60
        )
        assert r.status_code == 200, r.text
        assert len(r.json()["results"]) == count
    return IMAGES_SENT


def render_config(target: str) -> dict[str, Any]:
    """The project's prometheus.yml with the detr-serve job pointed at `target` (instead of
    compose's DNS discovery) and a one-second scrape interval; all else as shipped."""
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    config.setdefault("global", {})["scrape_interval"] = "1s"
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == JOB]
    for key in [k for k in job if k.endswith("_sd_configs") or k == "static_configs"]:
        del job[key]
    job["static_configs"] = [{"targets": [target]}]
    job.pop("scrape_interval", None)
    return config


@pytest.fixture(scope="module")
def prometheus(
    prometheus_bin: str,  # first: a missing binary skips or fails before the server boots
    server: RunningServer,
    served_images: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("prometheus")
    config = tmp / "prometheus.yml"
    config.write_text(yaml.safe_dump(render_config(f"127.0.0.1:{server.port}")))
    port = free_port()
    log = (tmp / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            prometheus_bin,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"prometheus exited with {proc.returncode}:\n{_read(tmp)}")
            try:
                if httpx.get(url + "/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prometheus was not ready in 60 s:\n{_read(tmp)}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _read(tmp: Path) -> str:
    return (tmp / "prometheus.log").read_text(errors="replace")[-4000:]


def query(prometheus: str, promql: str) -> dict[str, Any]:
    r = httpx.get(prometheus + "/api/v1/query", params={"query": promql}, timeout=5)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"{promql}: {body}"
    return body["data"]


def wait_for_series(prometheus: str, promql: str, timeout_s: float = 30) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while True:
        result = query(prometheus, promql)["result"]
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.5)


def test_prometheus_scrapes_images_total_from_the_server(
    prometheus: str, server: RunningServer, served_images: int
) -> None:
    result = wait_for_series(prometheus, "detr_serve_images_total")
    assert result, "Prometheus never scraped detr_serve_images_total"
    (series,) = result
    assert series["metric"]["job"] == JOB
    assert series["metric"]["instance"] == f"127.0.0.1:{server.port}"
    assert float(series["value"][1]) == served_images
    (up,) = query(prometheus, f'up{{job="{JOB}"}}')["result"]
    assert up["value"][1] == "1"


def test_dashboard_and_autoscaling_queries_run_on_scraped_data(
    prometheus: str, served_images: int
) -> None:
    # PromQL is only checked by Prometheus itself: every dashboard and adapter query must
    # parse and evaluate, and give series once rate() has two scrapes to work with.
    assert wait_for_series(prometheus, "count_over_time(detr_serve_images_total[1m]) >= 2")
    variables = {"$__rate_interval": "1m", "$instance": ".*", "$quantile": "0.95"}
    dashboard = json.loads(DASHBOARD.read_text())
    results = {}
    for target in (t for p in dashboard["panels"] for t in p.get("targets", [])):
        expr = target["expr"]
        for name, value in variables.items():
            expr = expr.replace(name, value)
        results[target["expr"]] = query(prometheus, expr)["result"]
    throughput = [r for e, r in results.items() if e.startswith("sum(rate(detr_serve_images")]
    assert throughput and throughput[0], "the throughput panel shows nothing"
    stage = [r for e, r in results.items() if "detr_serve_stage_duration_seconds_bucket" in e]
    assert {s["metric"]["stage"] for s in stage[0]} >= {"decode", "queue", "inference"}

    adapter = yaml.safe_load(ADAPTER_RULES.read_text())
    for rule in yaml.safe_load(adapter["data"]["config.yaml"])["rules"]:
        # What prometheus-adapter sends, for all pods of our (label-less) test target.
        expr = (
            rule["metricsQuery"]
            .replace("<<.GroupBy>>", "instance")
            .replace("<<.LabelMatchers>>", f'job="{JOB}"')
        )
        (pending,) = query(prometheus, expr)["result"]
        assert float(pending["value"][1]) >= 0


def test_promtool_accepts_the_metrics_exposition(
    promtool_bin: str, server: RunningServer, served_images: int
) -> None:
    body = httpx.get(server.url + "/metrics").text
    assert "detr_serve_images_total" in body
    proc = subprocess.run(
        [promtool_bin, "check", "metrics"], input=body, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_accepts_the_project_prometheus_config(promtool_bin: str) -> None:
    proc = subprocess.run(
        [promtool_bin, "check", "config", str(PROMETHEUS_YML)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout + proc.stderr
