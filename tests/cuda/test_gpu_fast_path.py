"""The GPU fast path on a real GPU: CUDA graphs against eager, nvjpeg against Pillow, float16
against float32, and pipelined batches against sequential ones. Skipped without CUDA;
scripts/gpu_check.sh runs them on a GPU machine."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.backends.cuda_graphs import CudaGraphBackend
from app.config import DEFAULT_MODEL_NAME, REPO_MODELS_DIR, Settings
from app.engine.buckets import BatchBuckets
from app.engine.build import build_engine
from app.engine.device_jpeg import DeviceJpegDecoder, nvjpeg_unavailable_reason
from app.engine.pipeline import DetectionTask, Engine, ImageDetections
from app.engine.precision import detections_agree
from app.images import decode_image, probe_plain_jpeg

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = REPO_MODELS_DIR / DEFAULT_MODEL_NAME
EXAMPLES = sorted((ROOT / "examples").glob("*.jpg"))


def example_tasks(n: int) -> list[DetectionTask]:
    images = [decode_image(p.read_bytes(), max_pixels=10**8, index=0) for p in EXAMPLES]
    return [DetectionTask(images[i % len(images)].pixels, 0.3, 100) for i in range(n)]


def assert_same_detections(
    got: object, want: object, *, score_atol: float, box_atol: float, min_score: float = 0.0
) -> None:
    """Every detection of `want` scoring >= min_score has one in `got` of its class with score
    and box within tolerance (order-free: near-tied scores may swap places)."""
    assert isinstance(got, ImageDetections) and isinstance(want, ImageDetections)
    for score, label, box in zip(want.scores, want.labels, want.boxes, strict=True):
        if score < min_score:
            continue
        close = (
            (got.labels == label)
            & (np.abs(got.scores - score) <= score_atol)
            & (np.abs(got.boxes - box).max(axis=1) <= box_atol)
        )
        assert close.any(), (score, label, box, got.scores, got.boxes[got.labels == label])


def test_replayed_graphs_match_the_eager_model_for_every_bucket(tiny_model_dir: Path) -> None:
    engine = Engine.load(tiny_model_dir, name="tiny", device="cuda", dtype="float32")
    graphs = CudaGraphBackend(engine.backend)
    assert graphs.capture([1, 2, 4], 128, 128, with_mask=False)
    assert graphs.captured_batch_sizes == [1, 2, 4]
    for batch in (1, 2, 4):
        x = torch.randn((batch, 3, 128, 128), device="cuda")
        eager, replayed = engine.backend.infer(x, None), graphs.infer(x, None)
        torch.testing.assert_close(replayed.logits, eager.logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(replayed.pred_boxes, eager.pred_boxes, atol=1e-4, rtol=1e-4)


def test_padded_graph_batches_give_the_eager_detections(tiny_model_dir: Path) -> None:
    eager = Engine.load(tiny_model_dir, name="tiny", device="cuda", dtype="float32")
    graphed = Engine.load(tiny_model_dir, name="tiny", device="cuda", dtype="float32")
    graphs = CudaGraphBackend(graphed.backend)
    assert graphs.capture([1, 2, 4], 128, 128, with_mask=False)
    graphed.backend, graphed.buckets = graphs, BatchBuckets((1, 2, 4), pad=True)
    tasks = example_tasks(3)  # runs as the bucket of 4
    for a, b in zip(graphed.run_batch(tasks), eager.run_batch(tasks), strict=True):
        assert isinstance(a, ImageDetections) and a.batch_size == 3
        # Batch 4 and batch 3 may pick other cuDNN algorithms (TF32): close, not equal.
        assert_same_detections(a, b, score_atol=5e-3, box_atol=0.5)


def test_nvjpeg_decodes_within_a_few_grey_levels_of_pillow() -> None:
    reason = nvjpeg_unavailable_reason(torch.device("cuda"))
    if reason is not None:
        pytest.skip(reason)
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8))
    buf = io.BytesIO()
    noisy.save(buf, format="JPEG", quality=85)
    datas = [p.read_bytes() for p in EXAMPLES] + [buf.getvalue()]
    jpegs = [probe_plain_jpeg(d, max_pixels=10**8, index=i) for i, d in enumerate(datas)]
    assert all(j is not None for j in jpegs)
    decoded = DeviceJpegDecoder(torch.device("cuda")).decode(jpegs)  # type: ignore[arg-type]
    for data, image in zip(datas, decoded, strict=True):
        assert isinstance(image, torch.Tensor) and image.is_cuda
        expected = torch.from_numpy(decode_image(data, max_pixels=10**8, index=0).pixels)
        diff = (image.permute(1, 2, 0).cpu().int() - expected.int()).abs().float()
        assert diff.mean() <= 1.5 and diff.quantile(0.99) <= 6, (diff.mean(), diff.max())


def test_float16_detections_match_float32_on_the_default_model() -> None:
    fp32 = Engine.load(DEFAULT_MODEL, name="m", device="cuda", dtype="float32")
    fp16 = Engine.load(DEFAULT_MODEL, name="m", device="cuda", dtype="float16")
    tasks = example_tasks(len(EXAMPLES))
    agree, summary = detections_agree(
        fp32.normalized_detections(tasks), fp16.normalized_detections(tasks)
    )
    assert agree, summary


def test_the_full_fast_path_starts_and_answers_like_eager_float32(caplog) -> None:
    caplog.set_level("INFO")
    settings = Settings(model=DEFAULT_MODEL, device="cuda", max_batch_size=8)
    fast = build_engine(settings, "cuda")
    assert fast.buckets is not None and fast.buckets.pad, caplog.text  # graphs captured
    assert isinstance(fast.backend, CudaGraphBackend)
    assert fast.backend.captured_batch_sizes == [1, 2, 4, 8]
    reference = Engine.load(DEFAULT_MODEL, name="m", device="cuda", dtype="float32")
    tasks = example_tasks(5)
    if fast.jpeg_decoder is not None:  # half the images through nvjpeg
        for i in range(0, 5, 2):
            data = EXAMPLES[i % len(EXAMPLES)].read_bytes()
            jpeg = probe_plain_jpeg(data, max_pixels=10**8, index=i)
            tasks[i] = DetectionTask(None, 0.3, 100, jpeg=jpeg)
    got = fast.run_batch(tasks)
    want = reference.run_batch(example_tasks(5))
    for a, b in zip(got, want, strict=True):
        assert isinstance(a, ImageDetections) and a.batch_size == 5
        # Same objects found: every confident float32 detection has a close one of its class.
        assert_same_detections(a, b, score_atol=0.1, box_atol=6, min_score=0.5)


def test_pipelined_batches_on_streams_give_the_sequential_answers() -> None:
    settings = Settings(model=DEFAULT_MODEL, device="cuda", max_batch_size=8)
    engine = build_engine(settings, "cuda")
    batches = [example_tasks(n) for n in (8, 3, 5, 1, 8, 2)]
    sequential = [engine.run_batch(b) for b in batches]
    with ThreadPoolExecutor(2) as pool:
        pipelined = list(pool.map(engine.run_batch, batches))
    for seq, pipe in zip(sequential, pipelined, strict=True):
        for a, b in zip(seq, pipe, strict=True):
            assert_same_detections(b, a, score_atol=1e-3, box_atol=0.5)
