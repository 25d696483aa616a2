"""dtype auto on CUDA: the fastest precision whose detections agree with float32's.

At start-up the model runs in float32 on the warm-up batch; each faster candidate (float16, then
bfloat16) runs on the same batch and is kept if its detections match, else the next is tried,
with a log line saying why. The comparison is on detections, not raw outputs: half precision may
swap two near-tied queries, which changes no answer but every per-query difference.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from app.engine.pipeline import DetectionTask, Engine
from app.engine.processing import BatchDetections

logger = logging.getLogger(__name__)

CANDIDATES = ("float16", "bfloat16")


@dataclass(frozen=True)
class Tolerance:
    top: int = 10  # the best detections of each image that must be matched
    score: float = 0.05  # absolute score difference
    box: float = 0.02  # absolute box coordinate difference, as a fraction of the image side
    min_matched: float = 0.9  # fraction of those detections that must find their match


def detections_agree(
    reference: BatchDetections, candidate: BatchDetections, tol: Tolerance = Tolerance()
) -> tuple[bool, str]:
    """Whether each of the reference's best `tol.top` detections per image (boxes normalised to
    [0, 1]) has a detection of the same class in the candidate's list with score and box
    within tolerance; (verdict, a sentence with the figures)."""
    if reference.scores.shape[0] != candidate.scores.shape[0]:
        return False, "the two runs returned different numbers of images"
    matched = total = 0
    worst_score = worst_box = 0.0
    for i in range(reference.scores.shape[0]):
        order = np.argsort(-reference.scores[i], kind="stable")[: tol.top]
        for j in order:
            if not np.isfinite(reference.scores[i, j]):
                continue
            total += 1
            same = candidate.labels[i] == reference.labels[i, j]
            if not same.any():
                continue
            score_diff = np.abs(candidate.scores[i][same] - reference.scores[i, j])
            box_diff = np.abs(candidate.boxes[i][same] - reference.boxes[i, j]).max(axis=1)
            ok = (score_diff <= tol.score) & (box_diff <= tol.box)
            if ok.any():
                matched += 1
                best = int(np.argmin(np.where(ok, box_diff, np.inf)))
                worst_score = max(worst_score, float(score_diff[best]))
                worst_box = max(worst_box, float(box_diff[best]))
    fraction = matched / total if total else 1.0
    summary = (
        f"{matched}/{total} detections matched (largest score difference {worst_score:.4f}, "
        f"largest box difference {worst_box:.4f})"
    )
    return fraction >= tol.min_matched, summary


def choose_precision(
    load: Callable[[str], Engine],
    tasks: Sequence[DetectionTask],
    candidates: Sequence[str] = CANDIDATES,
    tol: Tolerance = Tolerance(),
) -> Engine:
    """`load(dtype)` builds an engine in that dtype; returns the first candidate's engine that
    agrees with float32 on `tasks`, else the float32 engine."""
    reference_engine = load("float32")
    reference = reference_engine.normalized_detections(tasks)
    for dtype in candidates:
        try:
            engine = load(dtype)
            agree, summary = detections_agree(reference, engine.normalized_detections(tasks), tol)
        except Exception as exc:  # e.g. bfloat16 on a GPU without it
            logger.warning("dtype %s could not be checked (%s); trying the next", dtype, exc)
            continue
        if agree:
            logger.info("dtype auto: %s agrees with float32: %s", dtype, summary)
            return engine
        logger.warning("dtype auto: %s disagrees with float32: %s; trying the next", dtype, summary)
        del engine
    logger.warning("dtype auto: serving in float32 (no faster precision kept the detections)")
    return reference_engine
