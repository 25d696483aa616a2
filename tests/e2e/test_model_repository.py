"""End to end: several models from a model repository on the real server: routing by name,
per-model settings and metrics, and Triton's repository extension driven by the stock
tritonclient (HTTP and gRPC), loads and unloads under load included."""

from __future__ import annotations

import base64
import json
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from scripts.bench.serverproc import RunningServer
from tests.conftest import shapes_image

pytestmark = pytest.mark.e2e

KEY = "repository-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def make_repository(root: Path, model_dir: Path, names: tuple[str, ...]) -> Path:
    """A repository of copies of one model folder, one per name (the cheap second model)."""
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copytree(model_dir, root / name)
    return root


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    root = make_repository(
        tmp_path_factory.mktemp("repo") / "models", tiny_model_dir, ("alpha", "beta")
    )
    # beta's own settings: a smaller batch, every detection kept, and batches that wait
    # 250 ms to fill, so that its clients always have requests inside the engine (a swap
    # that dropped the old engine's requests would fail some).
    (root / "beta" / "serve.json").write_text(
        json.dumps({"max_batch_size": 4, "default_threshold": 0.0, "max_batch_delay_ms": 250})
    )
    return root


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[RunningServer]:
    srv = RunningServer(
        [
            *("--model-repository", str(repo), "--model-control", "explicit"),
            *("--workers", "2", "--api-key", KEY, "--default-threshold", "0.5"),
        ],
        env={"DETR_SERVE_TORCH_THREADS": "1"},
    )
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]
    assert srv.leftovers == []


def _png() -> str:
    return base64.b64encode(shapes_image(fmt="PNG")).decode()


def _detect(srv: RunningServer, model: str | None = None, **extra: object) -> httpx.Response:
    body: dict[str, object] = {"images": [{"data": _png()}], **extra}
    if model is not None:
        body["model"] = model
    return httpx.post(srv.url + "/v1/detect", json=body, headers=AUTH, timeout=60)


def test_each_model_serves_under_its_name_with_its_own_settings(server: RunningServer) -> None:
    listed = httpx.get(server.url + "/v1/models", headers=AUTH).json()["models"]
    by_name = {m["name"]: m for m in listed}
    assert set(by_name) == {"alpha", "beta"}
    assert [by_name[n]["state"] for n in ("alpha", "beta")] == ["ready", "ready"]
    assert (by_name["alpha"]["max_batch_size"], by_name["beta"]["max_batch_size"]) == (8, 4)
    assert by_name["alpha"]["default"] and not by_name["beta"]["default"]

    default = _detect(server)
    assert default.status_code == 200 and default.json()["model"] == "alpha"
    beta = _detect(server, "beta")
    assert beta.status_code == 200 and beta.json()["model"] == "beta"
    # beta's serve.json keeps every detection (threshold 0); the server's default is 0.5.
    assert len(beta.json()["results"][0]["detections"]) > len(
        default.json()["results"][0]["detections"]
    )
    form = httpx.post(
        server.url + "/v1/detect",
        files={"file": ("shapes.png", shapes_image(fmt="PNG"), "image/png")},
        data={"model": "beta"},
        headers=AUTH,
    )
    assert form.status_code == 200 and form.json()["model"] == "beta"
    render = httpx.post(
        server.url + "/v1/render",
        json={"images": [{"data": _png()}], "model": "beta"},
        headers=AUTH,
    )
    assert render.status_code == 200 and render.headers["content-type"] == "image/jpeg"

    one = httpx.get(server.url + "/v1/models/beta", headers=AUTH)
    assert one.status_code == 200 and one.json()["state"] == "ready"


def test_an_unknown_model_is_404_naming_the_known_ones(server: RunningServer) -> None:
    answer = _detect(server, "gamma")
    assert answer.status_code == 404
    assert answer.json()["error"] == {
        "type": "not_found",
        "message": "unknown model 'gamma'; the models are: alpha, beta",
    }
    assert httpx.get(server.url + "/v1/models/gamma", headers=AUTH).status_code == 404
    v2 = httpx.get(server.url + "/v2/models/gamma", headers=AUTH)
    assert v2.status_code == 404 and "alpha, beta" in v2.json()["error"]


def test_metrics_are_labelled_by_model(server: RunningServer) -> None:
    assert _detect(server, "alpha").status_code == 200
    assert _detect(server, "beta").status_code == 200
    text = httpx.get(server.url + "/metrics").text
    for name in ("alpha", "beta"):
        assert f'detr_serve_model_images_total{{model="{name}"}}' in text
        assert f'detr_serve_model_batches_total{{model="{name}",outcome="ok"}}' in text
        assert f'detr_serve_model_queue_depth{{model="{name}"}}' in text


def test_repository_routes_need_the_api_key(server: RunningServer) -> None:
    for path in ("/v2/repository/index", "/v2/repository/models/beta/unload"):
        refused = httpx.post(server.url + path)
        assert refused.status_code == 401, path
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    with pytest.raises(InferenceServerException, match="401|API key|Authorization"):
        client.get_model_repository_index()
    client.close()


def _infer(client: httpclient.InferenceServerClient, model: str) -> None:
    tensor = httpclient.InferInput("images", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([shapes_image(fmt="JPEG")], dtype=np.object_))
    # A copy: tritonclient writes its Inference-Header-Content-Length into the dict it gets.
    result = client.infer(model, [tensor], headers=dict(AUTH))
    assert result.as_numpy("num_detections") is not None


def test_tritonclient_loads_and_unloads_under_load_without_a_failed_request(
    server: RunningServer, repo: Path, tiny_model_dir: Path
) -> None:
    url = server.url.removeprefix("http://")
    control = httpclient.InferenceServerClient(url, network_timeout=300)
    # A model added to the repository at run time is listed, not loaded.
    make_repository(repo, tiny_model_dir, ("gamma",))
    index = {m["name"]: m for m in control.get_model_repository_index(headers=AUTH)}
    assert index["gamma"]["state"] == "UNAVAILABLE"
    assert index["alpha"]["state"] == index["beta"]["state"] == "READY"

    outcomes: Counter[str] = Counter()
    failures: list[str] = []
    stop = threading.Event()

    def client_loop(model: str) -> None:
        client = httpclient.InferenceServerClient(url, network_timeout=120)
        while not stop.is_set():
            try:
                _infer(client, model)
                outcomes[model] += 1
            except Exception as exc:  # every failure is recorded and fails the test below
                failures.append(f"{model}: {exc}")
        client.close()

    clients = [
        threading.Thread(target=client_loop, args=(m,)) for m in ("alpha", "beta", "beta", "beta")
    ]
    for thread in clients:
        thread.start()
    try:
        control.load_model("gamma", headers=AUTH)
        _infer(control, "gamma")
        control.load_model("beta", headers=AUTH)  # a new version: swapped in under load
        before = outcomes["beta"]
        control.load_model("beta", headers=AUTH)
        control.unload_model("gamma", headers=AUTH)
        deadline = time.monotonic() + 60
        while outcomes["beta"] < before + 3 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop.set()
        for thread in clients:
            thread.join(120)
    assert failures == []
    assert outcomes["alpha"] > 0 and outcomes["beta"] > before + 2

    index = {m["name"]: m for m in control.get_model_repository_index(headers=AUTH)}
    assert (index["gamma"]["state"], index["gamma"]["reason"]) == ("UNAVAILABLE", "unloaded")
    with pytest.raises(InferenceServerException, match="not loaded"):
        _infer(control, "gamma")
    gone = httpx.get(server.url + "/v1/models/gamma", headers=AUTH).json()
    assert gone["state"] == "unloaded"
    with pytest.raises(InferenceServerException, match="unknown model 'delta'"):
        control.load_model("delta", headers=AUTH)
    control.close()


def test_grpc_repository_rpcs_go_through_the_same_control(server: RunningServer) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    metadata = {"authorization": f"Bearer {KEY}"}
    index = client.get_model_repository_index(headers=metadata, as_json=True)
    names = {m["name"]: m.get("state") for m in index["models"]}
    assert names["alpha"] == names["beta"] == "READY"
    client.unload_model("beta", headers=metadata)
    assert not client.is_model_ready("beta", headers=metadata)
    # A start-up model unloaded on purpose no longer holds readiness back.
    assert httpx.get(server.url + "/readyz").status_code == 200
    client.load_model("beta", headers=metadata)
    assert client.is_model_ready("beta", headers=metadata)
    with pytest.raises(InferenceServerException, match="UNAUTHENTICATED|API key"):
        client.get_model_repository_index()
    client.close()


class _Started(RunningServer):
    """Started without waiting for /readyz (which a failed start-up model keeps at 503)."""

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise TimeoutError(self.log())


def test_a_bad_serve_json_fails_that_model_alone_and_control_can_be_off(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    root = make_repository(tmp_path / "models", tiny_model_dir, ("good", "bad"))
    (root / "bad" / "serve.json").write_text(json.dumps({"max_batch_size": "many"}))
    srv = _Started(
        ["--model-repository", str(root), "--workers", "1", "--backend", "null"], ready_timeout_s=60
    )
    try:
        deadline = time.monotonic() + 60
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            models = httpx.get(srv.url + "/v1/models").json()["models"]
            states = {m["name"]: m["state"] for m in models}
            if states == {"good": "ready", "bad": "failed"}:
                break
            time.sleep(0.2)
        assert states == {"good": "ready", "bad": "failed"}
        bad = httpx.get(srv.url + "/v1/models/bad").json()
        assert (
            "serve.json is not valid: max_batch_size: Input should be a valid integer"
            in (bad["reason"])
        )
        ready = httpx.get(srv.url + "/readyz")
        assert ready.status_code == 503
        assert ready.json()["models"]["bad"].startswith("failed: ")
        assert _detect(srv, "good").status_code == 200
        refused = _detect(srv, "bad")
        assert refused.status_code == 503 and "serve.json" in refused.json()["error"]["message"]
        # --model-control none (the default): the index is served, loads are refused.
        index = httpx.post(srv.url + "/v2/repository/index").json()
        assert {e["name"]: e["state"] for e in index} == {"bad": "UNAVAILABLE", "good": "READY"}
        load = httpx.post(srv.url + "/v2/repository/models/good/load")
        assert load.status_code == 403 and "--model-control explicit" in load.json()["error"]
    finally:
        assert srv.stop() == 0
