"""`--backend onnx`: start-up, provider choice, and the same detections as the eager backend."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from app.config import DEFAULT_MODEL_NAME, REPO_MODELS_DIR, Settings
from app.engine.pipeline import Engine
from app.engine.tasks import DetectionTask, ImageDetections
from app.main import create_app
from tests.conftest import shapes_image

pytest.importorskip("onnxruntime")
from app.backends.onnx_backend import OnnxModelMissingError, choose_providers  # noqa: E402
from tests.unit.test_onnx_export import exported_tiny_checkpoint  # noqa: E402

DEFAULT_MODEL = REPO_MODELS_DIR / DEFAULT_MODEL_NAME


@pytest.fixture(autouse=True)
def one_torch_thread():
    # Small models on a 2-core machine that is busy elsewhere: a second thread only waits.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def onnx_tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return exported_tiny_checkpoint(tmp_path_factory.getbasetemp())
    finally:
        torch.set_num_threads(threads)


def decoded_images() -> list[np.ndarray]:
    """Real decoded pictures of several sizes and aspect ratios, plus noise."""
    images = []
    for seed, (width, height) in enumerate([(320, 240), (200, 300), (128, 128), (641, 97)]):
        jpeg = shapes_image(width, height, seed=seed)
        images.append(np.array(Image.open(io.BytesIO(jpeg)).convert("RGB")))
    images.append(np.random.default_rng(0).integers(0, 255, (180, 260, 3), dtype=np.uint8))
    return images


def assert_same_detections(want: ImageDetections, got: ImageDetections) -> None:
    """Labels equal, scores within 1e-3, boxes within 1 px, matched one to one (near-equal
    scores may swap places). Detections within 1e-3 of the lowest kept score may differ."""
    floor = min(want.scores.min(initial=1.0), got.scores.min(initial=1.0)) + 1e-3
    unmatched = list(range(len(got.scores)))
    for score, label, box in zip(want.scores, want.labels, want.boxes, strict=True):
        match = next(
            (
                j
                for j in unmatched
                if got.labels[j] == label
                and abs(got.scores[j] - score) <= 1e-3
                and np.abs(got.boxes[j] - box).max() <= 1.0
            ),
            None,
        )
        if match is None:
            assert score <= floor, f"no onnx detection for {label} {score:.4f} {box}"
        else:
            unmatched.remove(match)
    assert all(got.scores[j] <= floor for j in unmatched), "onnx found extra detections"


def run_both(model_dir: Path, images: list[np.ndarray], max_detections: int) -> None:
    eager = Engine.load(model_dir, name="m", device="cpu", backend="torch", msda_kernel=False)
    onnx = Engine.load(model_dir, name="m", device="cpu", backend="onnx")
    assert onnx.info.backend == "onnx" and onnx.info.device == "cpu"
    tasks = [DetectionTask(image, 0.0, max_detections) for image in images]
    for batch in (tasks[:1], tasks):
        want, got = eager.run_batch(batch), onnx.run_batch(batch)
        for w, g in zip(want, got, strict=True):
            assert isinstance(w, ImageDetections) and isinstance(g, ImageDetections)
            assert len(w.scores) == len(g.scores) > 0
            assert_same_detections(w, g)


def test_choose_providers_prefers_tensorrt_then_cuda_then_cpu():
    everything = ["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"]
    assert choose_providers(everything, "auto") == [
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert choose_providers(["AzureExecutionProvider", "CPUExecutionProvider"], "auto") == [
        "CPUExecutionProvider"
    ]
    assert choose_providers(everything, "cpu") == ["CPUExecutionProvider"]
    with pytest.raises(RuntimeError, match="onnxruntime-gpu"):
        choose_providers(["CPUExecutionProvider"], "cuda")


def test_onnx_backend_without_model_onnx_says_how_to_export(tiny_model_dir):
    with pytest.raises(OnnxModelMissingError, match="scripts/export_onnx.py"):
        Engine.load(tiny_model_dir, name="tiny", device="cpu", backend="onnx")


def test_onnx_backend_gives_the_eager_detections_on_the_tiny_model(onnx_tiny_dir):
    run_both(onnx_tiny_dir, decoded_images(), max_detections=100)


def test_onnx_backend_rejects_a_dtype_the_file_was_not_exported_in(onnx_tiny_dir):
    with pytest.raises(ValueError, match="--dtype auto"):
        Engine.load(onnx_tiny_dir, name="m", device="cpu", dtype="bfloat16", backend="onnx")


async def test_detect_api_serves_the_onnx_backend(onnx_tiny_dir):
    settings = Settings(
        model=onnx_tiny_dir,
        backend="onnx",
        device="cpu",
        max_batch_size=2,
        default_threshold=0.0,
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        await app.state.runtime.wait_ready()
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            models = (await client.get("/v1/models")).json()
            files = {"file": ("a.jpg", shapes_image(), "image/jpeg")}
            response = await client.post("/v1/detect", files=files, data={"max_detections": "3"})
    assert models["models"][0]["backend"] == "onnx", models
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    assert (result["width"], result["height"]) == (320, 240)
    assert len(result["detections"]) == 3


@pytest.mark.skipif(not (DEFAULT_MODEL / "config.json").is_file(), reason="no default model")
def test_onnx_backend_gives_the_eager_detections_on_the_default_model(tmp_path, onnx_tiny_dir):
    # onnx_tiny_dir first: the exporter's one-off set-up cost is then paid by the tiny export.
    from scripts.export_onnx import export_onnx

    model_dir = tmp_path / DEFAULT_MODEL_NAME
    model_dir.mkdir()
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        shutil.copy2(DEFAULT_MODEL / name, model_dir / name)
    # Without onnxscript's optimizer (~4 s less; the tiny model's test covers the full export).
    export_onnx(model_dir, verify=False, optimize=False, log=lambda *_: None)
    run_both(model_dir, decoded_images()[:3], max_detections=50)


def test_onnx_threads_sleep_between_ops_unless_spinning_is_asked_for(onnx_tiny_dir):
    from app.backends.onnx_backend import OnnxBackend

    for spinning, entry in ((False, "0"), (True, "1")):
        backend = OnnxBackend.load(onnx_tiny_dir, device="cpu", threads=2, spinning=spinning)
        options = backend.session.get_session_options()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == entry
        assert options.intra_op_num_threads == 2


def test_batches_of_tiles_run_on_a_spinning_session_of_their_own(onnx_tiny_dir):
    """On the CPU without --onnx-spinning, tiles run on a second session whose threads spin,
    made at the first batch of them; the answers are the same as the sleeping session's."""
    import torch

    from app.backends.onnx_backend import OnnxBackend

    def spins(session) -> str:
        return session.get_session_options().get_session_config_entry(
            "session.intra_op.allow_spinning"
        )

    backend = OnnxBackend.load(onnx_tiny_dir, device="cpu", threads=2)
    assert backend._tiles_session is None  # nothing made before the first batch of tiles
    pixels = torch.rand((2, 3, 128, 128))
    plain = backend.infer(pixels, None)
    tiles = backend.infer_tiles(pixels, None)
    assert spins(backend.session) == "0" and spins(backend._tiles_session) == "1"
    assert torch.allclose(plain.logits, tiles.logits, atol=1e-5)
    assert torch.allclose(plain.pred_boxes, tiles.pred_boxes, atol=1e-6)
    made = backend._tiles_session
    backend.infer_tiles(pixels, None)
    assert backend._tiles_session is made  # made once
    # Spinning everywhere already: no second session.
    spinning = OnnxBackend.load(onnx_tiny_dir, device="cpu", threads=2, spinning=True)
    spinning.infer_tiles(pixels, None)
    assert spinning._tiles_session is None
