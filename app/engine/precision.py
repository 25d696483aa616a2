"""dtype auto on CUDA: the fastest precision whose detections agree with float32's.

At start-up the model runs in float32 on real example images (examples/ in the repository); each
faster candidate (float16, then bfloat16) runs on the same images and is kept if its detections
match, else the next is tried, with a log line saying why. The comparison is on detections, not
raw outputs: half precision may swap two near-tied queries, which changes no answer but every
per-query difference. Detections are matched one to one (scipy's linear_sum_assignment), in both
directions, on the confident ones only, with box tolerances in pixels at the model's input
size: what a client would see.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment

from app.engine.pipeline import DetectionTask, Engine
from app.engine.processing import BatchDetections

logger = logging.getLogger(__name__)

CANDIDATES = ("float16", "bfloat16")
# The repository's held-out example photos (examples/README.md); absent from an installed wheel.
EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"
_INFEASIBLE = 1e9


@dataclass(frozen=True)
class Tolerance:
    min_score: float = 0.3  # detections that must agree: those scoring at least this in a run
    score: float = 0.05  # largest score difference of a matched pair
    box_px: float = 4.0  # largest box coordinate difference, in pixels at the model's input size
    min_matched: float = 0.95  # fraction of the confident detections (of both runs) matched
    fallback_top: int = 10  # an image with no confident detection compares its best this many


def _match_image(
    ref: BatchDetections, cand: BatchDetections, i: int, scale: np.ndarray, tol: Tolerance
) -> tuple[int, int, float, float, bool]:
    """(confident detections of both runs, those left without a partner, largest score and box
    differences of the matched pairs, whether the top-k fallback was used) for image i."""
    rs, cs = ref.scores[i], cand.scores[i]
    r_conf, c_conf = rs >= tol.min_score, cs >= tol.min_score
    fallback = not r_conf.any() and not c_conf.any()
    if fallback:  # e.g. random weights: compare what the model ranks first instead
        r_conf = np.zeros_like(r_conf)
        c_conf = np.zeros_like(c_conf)
        r_conf[np.argsort(-rs, kind="stable")[: tol.fallback_top]] = True
        c_conf[np.argsort(-cs, kind="stable")[: tol.fallback_top]] = True
        r_pool, c_pool = r_conf, c_conf
    else:
        # A detection just under the threshold in one run may partner one just over it in the
        # other: both pools reach down by the score tolerance.
        r_pool = rs >= tol.min_score - tol.score
        c_pool = cs >= tol.min_score - tol.score
    r_idx, c_idx = np.flatnonzero(r_pool), np.flatnonzero(c_pool)
    required = int(r_conf.sum() + c_conf.sum())
    if required == 0:
        return 0, 0, 0.0, 0.0, fallback
    worst_score = worst_box = 0.0
    matched_required = 0
    if len(r_idx) and len(c_idx):
        score_diff = np.abs(rs[r_idx][:, None] - cs[c_idx][None, :])
        box_diff = (
            np.abs(ref.boxes[i][r_idx][:, None, :] - cand.boxes[i][c_idx][None, :, :]) * scale
        ).max(axis=-1)
        same = ref.labels[i][r_idx][:, None] == cand.labels[i][c_idx][None, :]
        ok = same & (score_diff <= tol.score) & (box_diff <= tol.box_px)
        # Closest boxes first; a pair out of tolerance costs more than any set of good pairs.
        cost = np.where(ok, box_diff + score_diff, _INFEASIBLE)
        rows, cols = linear_sum_assignment(cost)
        for r, c in zip(rows, cols, strict=True):
            if not ok[r, c]:
                continue
            matched_required += int(r_conf[r_idx[r]]) + int(c_conf[c_idx[c]])
            worst_score = max(worst_score, float(score_diff[r, c]))
            worst_box = max(worst_box, float(box_diff[r, c]))
    return required, required - matched_required, worst_score, worst_box, fallback


def detections_agree(
    reference: BatchDetections,
    candidate: BatchDetections,
    input_size: tuple[int, int],
    tol: Tolerance = Tolerance(),
) -> tuple[bool, str]:
    """Whether the candidate run finds the reference's objects: each confident detection (score
    >= tol.min_score) of either run paired, one to one, with one of the other run of the same
    class, score within tol.score and every box coordinate within tol.box_px pixels at
    `input_size` (height, width); boxes are normalised to [0, 1]. (verdict, the figures)."""
    if reference.scores.shape[0] != candidate.scores.shape[0]:
        return False, "the two runs returned different numbers of images"
    height, width = input_size
    scale = np.array([width, height, width, height], dtype=np.float64)
    required = unmatched = fallbacks = 0
    worst_score = worst_box = 0.0
    for i in range(reference.scores.shape[0]):
        n, u, s, b, fallback = _match_image(reference, candidate, i, scale, tol)
        required, unmatched = required + n, unmatched + u
        worst_score, worst_box = max(worst_score, s), max(worst_box, b)
        fallbacks += fallback
    fraction = 1 - unmatched / required if required else 1.0
    summary = (
        f"{required - unmatched}/{required} confident detections matched one to one "
        f"(largest score difference {worst_score:.4f}, largest box difference "
        f"{worst_box:.2f} px at {height}x{width})"
    )
    if fallbacks:
        summary += (
            f"; {fallbacks} image(s) had no detection scoring >= {tol.min_score}: their best "
            f"{tol.fallback_top} were compared instead"
        )
    return required > 0 and fraction >= tol.min_matched, summary


def check_images() -> list[np.ndarray]:
    """The images dtype auto checks on: the repository's example photos, uint8 [H, W, 3]."""
    from app.images.decode import decode_image

    paths = sorted(EXAMPLES_DIR.glob("*.jpg"))
    if not paths:
        raise FileNotFoundError(
            f"no example images in {EXAMPLES_DIR} for the dtype check: set --dtype explicitly"
        )
    return [
        decode_image(p.read_bytes(), max_pixels=10**8, index=i).pixels for i, p in enumerate(paths)
    ]


def check_tasks(n: int | None = None) -> list[DetectionTask]:
    """The batch the precision check runs: each example image once (n: at most n of them)."""
    images = check_images()
    return [DetectionTask(pixels, 0.0, 100) for pixels in images[:n]]


def choose_precision(
    load: Callable[[str], Engine],
    tasks: Sequence[DetectionTask],
    input_size: tuple[int, int],
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
            agree, summary = detections_agree(
                reference, engine.normalized_detections(tasks), input_size, tol
            )
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
