"""dtype auto: which detections count as agreeing with float32, and which engine is kept."""

from __future__ import annotations

import logging

import numpy as np

from app.engine.precision import Tolerance, choose_precision, detections_agree
from app.engine.processing import BatchDetections


def detections(seed: int = 0, images: int = 2, k: int = 30) -> BatchDetections:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 0.6, (images, k, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(0.05, 0.4, (images, k, 2))], axis=-1)
    scores = np.sort(rng.uniform(0, 1, (images, k)), axis=1)[:, ::-1]
    return BatchDetections(
        scores.astype(np.float32),
        rng.integers(0, 5, (images, k)),
        boxes.astype(np.float32),
    )


def perturbed(d: BatchDetections, score: float, box: float, seed: int = 1) -> BatchDetections:
    rng = np.random.default_rng(seed)
    order = rng.permutation(d.scores.shape[1])  # half precision may reorder near-ties
    return BatchDetections(
        (d.scores + rng.uniform(-score, score, d.scores.shape))[:, order].astype(np.float32),
        d.labels[:, order],
        (d.boxes + rng.uniform(-box, box, d.boxes.shape))[:, order].astype(np.float32),
    )


def test_small_differences_and_reordering_agree() -> None:
    ref = detections()
    agree, summary = detections_agree(ref, perturbed(ref, score=0.01, box=0.005))
    assert agree, summary
    assert summary.startswith("20/20 detections matched")


def test_moved_boxes_or_changed_scores_disagree() -> None:
    ref = detections()
    assert not detections_agree(ref, perturbed(ref, score=0.0, box=0.1))[0]
    assert not detections_agree(ref, perturbed(ref, score=0.2, box=0.0))[0]
    relabelled = BatchDetections(ref.scores, (ref.labels + 1) % 5, ref.boxes)
    assert not detections_agree(ref, relabelled)[0]


def test_a_few_unmatched_detections_are_tolerated_up_to_the_fraction() -> None:
    ref = detections(images=1, k=10)
    cand = BatchDetections(ref.scores.copy(), ref.labels.copy(), ref.boxes.copy())
    cand.boxes[0, 0] += 0.5  # one of the ten moves away
    assert detections_agree(ref, cand, Tolerance(top=10, min_matched=0.9))[0]
    assert not detections_agree(ref, cand, Tolerance(top=10, min_matched=1.0))[0]


class FakeEngine:
    def __init__(self, dtype: str, dets: BatchDetections) -> None:
        self.dtype, self.dets = dtype, dets

    def normalized_detections(self, tasks) -> BatchDetections:
        return self.dets


def loader(outputs: dict[str, BatchDetections | Exception], loaded: list[str]):
    def load(dtype: str) -> FakeEngine:
        loaded.append(dtype)
        out = outputs[dtype]
        if isinstance(out, Exception):
            raise out
        return FakeEngine(dtype, out)

    return load


def test_float16_is_kept_when_it_agrees_with_float32() -> None:
    ref, loaded = detections(), []
    outputs = {"float32": ref, "float16": perturbed(ref, 0.01, 0.005)}
    engine = choose_precision(loader(outputs, loaded), tasks=[])
    assert engine.dtype == "float16" and loaded == ["float32", "float16"]


def test_a_disagreeing_float16_falls_back_to_bfloat16_then_float32_with_a_log(caplog) -> None:
    ref, loaded = detections(), []
    bad = perturbed(ref, 0.0, 0.2)
    caplog.set_level(logging.INFO, logger="app.engine.precision")
    outputs = {"float32": ref, "float16": bad, "bfloat16": perturbed(ref, 0.02, 0.01)}
    assert choose_precision(loader(outputs, loaded), tasks=[]).dtype == "bfloat16"
    assert "float16 disagrees with float32" in caplog.text
    outputs = {"float32": ref, "float16": bad, "bfloat16": RuntimeError("no bf16 here")}
    assert choose_precision(loader(outputs, []), tasks=[]).dtype == "float32"
    assert "bfloat16 could not be checked" in caplog.text
    assert "serving in float32" in caplog.text
