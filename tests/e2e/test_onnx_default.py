"""End to end: the default backend on a CPU machine. The first start exports the model into the
cache (/readyz 503 meanwhile) and serves it with onnxruntime; the second start reuses the file."""

from __future__ import annotations

import shutil
import time

import httpx
import pytest

from scripts.bench.serverproc import RunningServer
from tests.conftest import shapes_image

pytestmark = pytest.mark.e2e
pytest.importorskip("onnxruntime")

EXPORTING = "onnx export: exporting"
CHOSEN = "backend onnx: "  # logged once the file is there


class ExportWatchingServer(RunningServer):
    """Records what /readyz said once the engine had logged that it was exporting."""

    readyz_while_exporting: httpx.Response | None = None

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            log = self.log()
            if CHOSEN in log:
                break  # chosen: exported already, or never exporting
            if EXPORTING in log:
                # The export (model load, torch.onnx, checks) takes seconds after this line; the
                # front ends may still be starting.
                try:
                    answer = httpx.get(self.url + "/readyz", timeout=5)
                except httpx.HTTPError:
                    time.sleep(0.05)
                    continue
                if CHOSEN not in self.log():
                    self.readyz_while_exporting = answer
                break
            time.sleep(0.05)
        super()._wait_ready(max(1.0, deadline - time.monotonic()))


def test_default_backend_exports_once_then_starts_from_the_cache(tiny_model_dir, tmp_path):
    model = tmp_path / "tiny"
    shutil.copytree(tiny_model_dir, model)
    cache = tmp_path / "cache"
    env = {"DETR_SERVE_ONNX_CACHE_DIR": str(cache), "DETR_SERVE_TORCH_THREADS": "1"}
    args = ["--model", str(model), "--default-threshold", "0.0", "--log-level", "info"]

    first = ExportWatchingServer(args, env=env, ready_timeout_s=300)
    try:
        (card,) = httpx.get(first.url + "/v1/models").json()["models"]
        files = [("file", ("a.jpg", shapes_image(), "image/jpeg"))]
        detect = httpx.post(first.url + "/v1/detect", files=files, data={"max_detections": "3"})
    finally:
        first.stop()
    assert card["backend"] == "onnx", card
    assert "auto on the CPU" in card["backend_reason"] and "(exported)" in card["backend_reason"]
    assert detect.status_code == 200, detect.text
    assert len(detect.json()["results"][0]["detections"]) == 3
    while_exporting = first.readyz_while_exporting
    assert while_exporting is not None, first.log()
    assert while_exporting.status_code == 503
    assert while_exporting.json()["status"] == "loading"
    exported = list(cache.rglob("model.onnx"))
    assert len(exported) == 1 and not (model / "model.onnx").exists()

    second = ExportWatchingServer(args, env=env, ready_timeout_s=300)
    try:
        (card,) = httpx.get(second.url + "/v1/models").json()["models"]
    finally:
        second.stop()
    assert card["backend"] == "onnx" and "(cache)" in card["backend_reason"], card
    assert str(exported[0]) in card["backend_reason"]
    assert EXPORTING not in second.log()
    assert second.readyz_while_exporting is None
