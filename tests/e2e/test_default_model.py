"""The embedded default model through the real server: serving loses nothing against transformers.

scripts/training/evaluate.py scores held-out images twice, once with transformers' own processor and
model, once posted to `detr-serve` started with no --model (so serving the committed default).
The 500-image figures live in models/rtdetr-shapes/README.md; here the same two paths are
compared detection by detection on a CI-sized slice (on a few images a single box crossing
IoU 0.75 moves mAP75 by a few points, so the slice compares boxes, not mAP).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from scripts.bench.serverproc import RunningServer
from scripts.training import evaluate
from scripts.training import synthetic_shapes as shapes

pytestmark = pytest.mark.e2e

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "models" / "rtdetr-shapes"


@pytest.fixture(scope="module")
def default_server() -> Iterator[RunningServer]:
    server = RunningServer([], env={"DETR_SERVE_TORCH_THREADS": "1"})
    yield server
    server.stop()


def _iou(a: list[float], b: list[float]) -> float:
    return float(evaluate._iou(np.array([a]), np.array([b]))[0, 0])


def test_served_detections_are_the_models_own(default_server: RunningServer) -> None:
    samples = [shapes.generate_sample(shapes.HELDOUT_SEED, 20_000 + i) for i in range(12)]
    direct = evaluate.detect_direct(
        DEFAULT_MODEL, samples, threshold=0.3, max_detections=100, batch_size=4
    )
    name, served = evaluate.detect_http(
        default_server.url, samples, 0.3, 100, batch_size=4, transport="multipart"
    )
    assert name == "rtdetr-shapes"
    compared = 0
    # Each side's confident detections must be on the other side (which keeps down to 0.3, so
    # a score a hair away from the cut cannot make a false alarm).
    for mine, theirs in ((direct, served), (served, direct)):
        for i, (dets, others) in enumerate(zip(mine, theirs, strict=True)):
            for d in (d for d in dets if d["score"] >= 0.4):
                twins = [
                    o
                    for o in others
                    if o["label"] == d["label"] and _iou(o["box"], d["box"]) >= 0.97
                ]
                assert twins, f"image {i}: {d} has no counterpart in {others}"
                assert min(abs(o["score"] - d["score"]) for o in twins) <= 0.03, (i, d, twins)
                compared += 1
    assert compared >= 2 * len(samples), "too few detections to say anything"


def test_evaluate_scores_the_server_and_the_folder(default_server, tmp_path) -> None:
    out = tmp_path / "figures.json"
    args = ["--url", default_server.url, "--count", "8", "--threads", "1", "--json-out", str(out)]
    assert evaluate.main(args) == 0
    report = json.loads(out.read_text())
    assert report["http_model"] == "rtdetr-shapes" and report["count"] == 8
    assert set(report["http"]) == set(report["direct"]) >= set(evaluate.METRIC_NAMES)
    assert report["http"]["recall@0.5"] == pytest.approx(report["direct"]["recall@0.5"], abs=0.05)
