"""`--backend auto` (the default): onnxruntime on the CPU on an export made once and cached, torch
on CUDA, and torch again, with the reason in /v1/models, when the export cannot be made."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest
import torch

from app.config import Settings
from app.engine import backend_choice
from app.engine.backend_choice import choose_backend
from app.engine.build import build_engines
from app.engine.tasks import DetectionTask, ImageDetections
from app.main import create_app
from tests.conftest import shapes_image

pytest.importorskip("onnxruntime")


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def model_dir(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A copy of the tiny model: its own export key is the tiny model's, its folder is fresh."""
    copy = tmp_path / "tiny"
    shutil.copytree(tiny_model_dir, copy)
    return copy


def settings(model_dir: Path, cache_dir: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "model": model_dir,
        "device": "cpu",
        "onnx_cache_dir": cache_dir,
        "max_batch_size": 2,
        "torch_threads": 1,
        "default_threshold": 0.0,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def test_auto_is_the_default_and_picks_torch_with_cuda_graphs_on_cuda(model_dir, tmp_path):
    cache_dir = tmp_path / "cache"
    s = Settings(model=model_dir, onnx_cache_dir=cache_dir)
    assert s.backend == "auto"
    choice = choose_backend(s, "cuda")
    assert choice.backend == "torch" and "CUDA graphs" in choice.reason
    assert not cache_dir.exists(), "auto on CUDA exported anyway"
    explicit = choose_backend(settings(model_dir, tmp_path, backend="torch"), "cpu")
    assert (explicit.backend, explicit.reason) == ("torch", "--backend torch")


def test_auto_without_onnxruntime_serves_torch_and_onnx_says_what_to_install(
    model_dir, tmp_path, monkeypatch
):
    monkeypatch.setattr(backend_choice, "_missing_onnx_packages", lambda: ["onnxruntime"])
    choice = choose_backend(settings(model_dir, tmp_path), "cpu")
    assert choice.backend == "torch" and "onnxruntime not installed" in choice.reason
    with pytest.raises(RuntimeError, match=r"pip install -e '\.\[onnx\]'"):
        choose_backend(settings(model_dir, tmp_path, backend="onnx"), "cpu")


def test_auto_on_the_cpu_exports_once_then_the_next_start_reuses_the_cache(model_dir, tmp_path):
    cache_dir = tmp_path / "cache"
    (first,) = build_engines(settings(model_dir, cache_dir))
    assert first.info.backend == "onnx"
    assert "auto on the CPU" in first.info.backend_reason
    assert "(exported)" in first.info.backend_reason, first.info.backend_reason
    exported = list(cache_dir.rglob("model.onnx"))
    assert len(exported) == 1 and str(exported[0]) in first.info.backend_reason
    assert not (model_dir / "model.onnx").exists(), "the model folder was written"

    (second,) = build_engines(settings(model_dir, cache_dir))
    assert second.info.backend == "onnx" and "(cache)" in second.info.backend_reason
    assert list(cache_dir.rglob("model.onnx")) == exported
    [result] = second.run_batch([DetectionTask(_pixels(), 0.0, 5)])
    assert isinstance(result, ImageDetections) and len(result.scores) == 5


async def test_a_failed_export_falls_back_to_torch_and_says_why(model_dir, tmp_path, monkeypatch):
    import app.export.onnx_export as exporter

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the exporter broke on purpose")

    monkeypatch.setattr(exporter, "export_onnx", broken)
    app = create_app(settings(model_dir, tmp_path / "cache"))
    async with app.router.lifespan_context(app):
        runtime = app.state.runtime
        await runtime.wait_ready()
        assert runtime.state == "ready", runtime.load_error
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            (card,) = (await client.get("/v1/models")).json()["models"]
            files = {"file": ("a.jpg", shapes_image(), "image/jpeg")}
            response = await client.post("/v1/detect", files=files, data={"max_detections": "2"})
    assert card["backend"] == "torch"
    assert "export failed" in card["backend_reason"]
    assert "the exporter broke on purpose" in card["backend_reason"]
    assert response.status_code == 200, response.text
    assert len(response.json()["results"][0]["detections"]) == 2
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.suffix in (".onnx", ".tmp")]


async def test_a_failed_export_with_backend_onnx_asked_for_is_not_ready(
    model_dir, tmp_path, monkeypatch
):
    import app.export.onnx_export as exporter

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the exporter broke on purpose")

    monkeypatch.setattr(exporter, "export_onnx", broken)
    app = create_app(settings(model_dir, tmp_path / "cache", backend="onnx"))
    async with app.router.lifespan_context(app):
        runtime = app.state.runtime
        await runtime.wait_ready()
        assert runtime.state == "failed"
        assert "the exporter broke on purpose" in str(runtime.load_error)
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/readyz")).status_code == 503


def test_int8_without_a_quantized_file_serves_float32_and_says_how_to_make_one(
    model_dir, onnx_cache_dir
):
    choice = choose_backend(settings(model_dir, onnx_cache_dir, precision="int8"), "cpu")
    assert choice.backend == "onnx" and not choice.int8
    assert "scripts/export_onnx.py" in choice.reason and "--int8" in choice.reason


def test_int8_settings_refuse_the_torch_backend_and_half_precision(model_dir, tmp_path):
    with pytest.raises(ValueError, match="backend auto or onnx"):
        settings(model_dir, tmp_path, precision="int8", backend="torch")
    with pytest.raises(ValueError, match="dtype"):
        settings(model_dir, tmp_path, precision="int8", dtype="bfloat16")


def _pixels():
    import io

    import numpy as np
    from PIL import Image

    return np.array(Image.open(io.BytesIO(shapes_image())).convert("RGB"))
