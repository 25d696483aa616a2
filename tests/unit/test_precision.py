"""dtype auto: which detections count as agreeing with float32, and which engine is kept."""

from __future__ import annotations

import logging

import numpy as np

from app.engine.postprocess import BatchDetections
from app.engine.precision import Tolerance, choose_precision, detections_agree


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


SIZE = (640, 640)  # the model's input size the pixel tolerances refer to
PX = 1 / 640  # one pixel, in normalised box coordinates


def one_image(*dets: tuple[float, int, tuple[float, float, float, float]]) -> BatchDetections:
    """An image's candidates (score, label, normalised xyxy box), plus low-score padding."""
    rows = list(dets) + [(0.01, 4, (0.0, 0.0, 0.1, 0.1))] * 3
    return BatchDetections(
        np.array([[r[0] for r in rows]], dtype=np.float32),
        np.array([[r[1] for r in rows]]),
        np.array([[r[2] for r in rows]], dtype=np.float32),
    )


BOX = (0.2, 0.2, 0.5, 0.6)


def moved(box: tuple[float, ...], px: float) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = box
    return (x1 + px * PX, y1, x2, y2)


def test_small_differences_and_reordering_agree() -> None:
    ref = detections()
    agree, summary = detections_agree(ref, perturbed(ref, score=0.01, box=1 * PX), SIZE)
    assert agree, summary
    confident = int((ref.scores >= 0.3).sum())
    assert summary.startswith(f"{2 * confident}/{2 * confident} confident detections matched")


def test_moved_boxes_or_changed_scores_disagree() -> None:
    ref = detections()
    assert not detections_agree(ref, perturbed(ref, score=0.0, box=0.1), SIZE)[0]
    assert not detections_agree(ref, perturbed(ref, score=0.2, box=0.0), SIZE)[0]
    relabelled = BatchDetections(ref.scores, (ref.labels + 1) % 5, ref.boxes)
    assert not detections_agree(ref, relabelled, SIZE)[0]


def test_box_tolerance_is_in_pixels_at_the_input_size() -> None:
    ref = one_image((0.9, 1, BOX))
    assert detections_agree(ref, one_image((0.9, 1, moved(BOX, 3))), SIZE)[0]
    assert not detections_agree(ref, one_image((0.9, 1, moved(BOX, 6))), SIZE)[0]
    # The same normalised shifts at other input sizes: 6/640 of the side is 3 px at 320...
    assert detections_agree(ref, one_image((0.9, 1, moved(BOX, 6))), (320, 320))[0]
    # ... and 3/640 of the side is 6 px at 1280.
    assert not detections_agree(ref, one_image((0.9, 1, moved(BOX, 3))), (1280, 1280))[0]


def test_two_reference_objects_cannot_share_one_candidate_detection() -> None:
    twin = moved(BOX, 1)
    ref = one_image((0.9, 1, BOX), (0.8, 1, twin))
    cand = one_image((0.88, 1, BOX))
    agree, summary = detections_agree(ref, cand, SIZE)
    assert not agree and summary.startswith("2/3 confident detections matched"), summary


def test_a_confident_detection_only_the_candidate_finds_disagrees() -> None:
    ref = one_image((0.9, 1, BOX))
    cand = one_image((0.9, 1, BOX), (0.7, 2, (0.6, 0.6, 0.9, 0.9)))
    assert not detections_agree(ref, cand, SIZE)[0]


def test_low_score_candidates_do_not_count_and_the_threshold_edge_is_soft() -> None:
    ref = one_image((0.9, 1, BOX), (0.31, 0, (0.6, 0.1, 0.7, 0.2)), (0.2, 3, (0, 0, 1, 1)))
    cand = one_image((0.9, 1, BOX), (0.29, 0, (0.6, 0.1, 0.7, 0.2)), (0.1, 2, (0.3, 0, 1, 1)))
    agree, summary = detections_agree(ref, cand, SIZE)
    assert agree and summary.startswith("3/3"), summary


def test_without_confident_detections_the_best_ten_are_compared_and_it_says_so() -> None:
    ref = detections(images=1, k=20)
    ref = BatchDetections(ref.scores * 0.2, ref.labels, ref.boxes)  # random weights: all < 0.3
    agree, summary = detections_agree(ref, perturbed(ref, score=0.001, box=0.5 * PX), SIZE)
    assert agree and "best 10 were compared instead" in summary, summary
    assert summary.startswith("20/20")
    assert not detections_agree(ref, perturbed(ref, score=0.0, box=0.05), SIZE)[0]


def test_a_few_unmatched_detections_are_tolerated_up_to_the_fraction() -> None:
    ref = detections(images=1, k=40)
    ref = BatchDetections(np.maximum(ref.scores, 0.5), ref.labels, ref.boxes)  # 40 confident
    cand = BatchDetections(ref.scores.copy(), ref.labels.copy(), ref.boxes.copy())
    cand.boxes[0, 0] += 0.5  # one of the forty moves away: 2 of 80 unmatched
    assert detections_agree(ref, cand, SIZE, Tolerance(min_matched=0.95))[0]
    assert not detections_agree(ref, cand, SIZE, Tolerance(min_matched=1.0))[0]


def test_the_check_runs_on_the_repository_example_images() -> None:
    from app.engine.precision import EXAMPLES_DIR, check_tasks

    tasks = check_tasks()
    sizes = sorted(t.size for t in tasks)
    assert sizes == [(450, 800), (480, 640), (640, 480)]
    assert len(list(EXAMPLES_DIR.glob("*.jpg"))) == len(tasks)


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
    outputs = {"float32": ref, "float16": perturbed(ref, 0.01, 1 * PX)}
    engine = choose_precision(loader(outputs, loaded), tasks=[], input_size=SIZE)
    assert engine.dtype == "float16" and loaded == ["float32", "float16"]


def test_a_disagreeing_float16_falls_back_to_bfloat16_then_float32_with_a_log(caplog) -> None:
    ref, loaded = detections(), []
    bad = perturbed(ref, 0.0, 0.2)
    caplog.set_level(logging.INFO, logger="app.engine.precision")
    outputs = {"float32": ref, "float16": bad, "bfloat16": perturbed(ref, 0.02, 2 * PX)}
    assert choose_precision(loader(outputs, loaded), tasks=[], input_size=SIZE).dtype == "bfloat16"
    assert "float16 disagrees with float32" in caplog.text
    outputs = {"float32": ref, "float16": bad, "bfloat16": RuntimeError("no bf16 here")}
    assert choose_precision(loader(outputs, []), tasks=[], input_size=SIZE).dtype == "float32"
    assert "bfloat16 could not be checked" in caplog.text
    assert "serving in float32" in caplog.text
