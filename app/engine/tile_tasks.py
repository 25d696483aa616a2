"""Tiled inference on the engine side: an image's tasks become one task per tile (views of the
decoded uint8 pixels, never a float copy of the whole image) plus an optional full-image pass,
and their detections are merged back in torch, on the engine's device.

Merging is SAHI's: candidates sorted by score; NMS keeps a box unless a kept box of higher score
matches it; greedy NMM keeps the same boxes and folds every box a kept one suppressed into it
(the union box, the kept box's score and class); each suppressed box goes to the highest-scoring
kept box that matches it. A match is IoU (intersection over union) or IoS (intersection over the
smaller box) at or above the threshold, between boxes of one class unless class-agnostic. SAHI
re-checks each match against the growing union box; with IoS the result is the same (the union
only grows the intersection), with IoU we fold every direct match. Written by hand with torch
ops: torchvision (batched_nms) cannot be installed beside the CPU torch this service pins.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from app.engine.tasks import DetectionTask, ImageDetections
from app.images.decode import resize_pixels
from app.tile_geometry import TileSpec

# Candidate pairs are examined this many boxes at a time: memory stays bounded however many
# detections the tiles of an image return (300 tiles x 100 detections is 30,000 boxes).
_PAIR_CHUNK = 2048


def pair_overlaps(
    boxes: torch.Tensor, metric: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(i, j, value) for every pair of boxes (positions in `boxes`, each pair once) that
    intersect with a positive area, with their IoU or IoS.

    A banded sweep finds the candidates, so the work grows with the boxes that are near each
    other, not with the square of the count: the image is cut into horizontal strips as high
    as the highest box, so boxes that meet lie in the same strip or in neighbouring ones; each
    box joins the band of its strip and of the strip above (band k = strips k and k + 1), and
    within a band, boxes sorted by x1 can only meet those whose x1 is before their x2. A pair
    is kept in the band of its upper box's strip only (it may share two bands)."""
    if metric not in ("iou", "ios"):
        raise ValueError(f"match_metric must be iou or ios, got {metric!r}")
    n = boxes.shape[0]
    empty = boxes.new_zeros(0, dtype=torch.long)
    if n < 2:
        return empty, empty, boxes.new_zeros(0)
    device = boxes.device
    x1, y1, x2, y2 = boxes.unbind(1)
    areas = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    strip_height = max(float((y2 - y1).max()), 1.0)
    strip = torch.floor((y1 - y1.min()) / strip_height).long()
    box_of = torch.cat([torch.arange(n, device=device), torch.arange(n, device=device)])
    band = torch.cat([strip, strip - 1])
    # Sort by (band, x1); the sweep's key puts each band in a range of its own.
    x_low = float(x1.min())
    span = float(x2.max()) - x_low + 1.0
    by_x = torch.argsort(x1[box_of], stable=True)
    order = by_x[torch.argsort(band[by_x], stable=True)]
    box_of, band = box_of[order], band[order]
    base = band.double() * span
    starts = (base + (x1[box_of] - x_low).double()).contiguous()
    # For sorted entry a, the candidates are b in (a, end[a]): same band, x1[b] < x2[a].
    ends = torch.searchsorted(starts, (base + (x2[box_of] - x_low).double()).contiguous())
    found_i, found_j, found_v = [], [], []
    total_entries = box_of.shape[0]
    for start in range(0, total_entries, _PAIR_CHUNK):
        a = torch.arange(start, min(start + _PAIR_CHUNK, total_entries), device=device)
        counts = (ends[a] - a - 1).clamp(min=0)
        total = int(counts.sum())
        if total == 0:
            continue
        src = torch.repeat_interleave(a, counts)
        first = torch.cumsum(counts, 0) - counts  # where each a's run begins
        step = torch.arange(total, device=device) - torch.repeat_interleave(first, counts)
        dst = src + 1 + step
        bi, bj = box_of[src], box_of[dst]
        # Along x they overlap by construction; test y and the band rule on the cheap, and
        # compute the measure only for the few pairs that pass.
        keep = (torch.minimum(y2[bi], y2[bj]) > torch.maximum(y1[bi], y1[bj])) & (
            band[src] == torch.minimum(strip[bi], strip[bj])
        )
        bi, bj = bi[keep], bj[keep]
        if bi.numel() == 0:
            continue
        w = (torch.minimum(x2[bi], x2[bj]) - torch.maximum(x1[bi], x1[bj])).clamp(min=0)
        h = torch.minimum(y2[bi], y2[bj]) - torch.maximum(y1[bi], y1[bj])
        inter = w * h
        hit = inter > 0
        bi, bj, inter = bi[hit], bj[hit], inter[hit]
        if metric == "iou":
            denom = areas[bi] + areas[bj] - inter
        else:
            denom = torch.minimum(areas[bi], areas[bj])
        found_i.append(bi)
        found_j.append(bj)
        found_v.append(inter / denom.clamp(min=1e-12))
    if not found_i:
        return empty, empty, boxes.new_zeros(0)
    return torch.cat(found_i), torch.cat(found_j), torch.cat(found_v)


def merge_detections(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    *,
    method: str = "greedy_nmm",
    metric: str = "ios",
    threshold: float = 0.5,
    class_agnostic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge overlapping detections (xyxy boxes [N, 4], scores [N], labels [N]); returns the
    kept boxes, scores and labels, best score first."""
    if method not in ("nms", "greedy_nmm"):
        raise ValueError(f"merge must be nms or greedy_nmm, got {method!r}")
    n = boxes.shape[0]
    if n == 0:
        return boxes, scores, labels
    # Rank by score, ties by input order: rank 0 is the best box.
    order = torch.argsort(-scores, stable=True)
    boxes, scores, labels = boxes[order], scores[order], labels[order]
    i, j, value = pair_overlaps(boxes, metric)
    match = value >= threshold
    if not class_agnostic:
        match &= labels[i] == labels[j]
    i, j = i[match], j[match]
    # Orient each pair from the better box (lower rank) to the worse one.
    hi, lo = torch.minimum(i, j), torch.maximum(i, j)
    # Greedy suppression as a fixed point: kept[b] = no kept box ranked above b matches b.
    # Iterating from "all kept" settles rank by rank (a box's state is final once every box
    # above it is), so at most n rounds, in practice the length of the longest chain.
    kept = torch.ones(n, dtype=torch.bool, device=boxes.device)
    while True:
        suppressed = torch.zeros(n, dtype=torch.bool, device=boxes.device)
        suppressed[lo[kept[hi]]] = True
        new_kept = ~suppressed
        if torch.equal(new_kept, kept):
            break
        kept = new_kept
    if method == "greedy_nmm" and hi.numel():
        # Each suppressed box folds into the best kept box that matches it.
        into = torch.full((n,), n, dtype=torch.long, device=boxes.device)
        feeds = kept[hi] & ~kept[lo]
        into.scatter_reduce_(0, lo[feeds], hi[feeds], reduce="amin")
        folded = torch.nonzero(into < n).flatten()
        if folded.numel():
            target = into[folded]
            boxes = boxes.clone()
            for col, reduce in ((0, "amin"), (1, "amin"), (2, "amax"), (3, "amax")):
                boxes[:, col].scatter_reduce_(0, target, boxes[folded, col], reduce=reduce)
    return boxes[kept], scores[kept], labels[kept]


@dataclass(frozen=True)
class _Part:
    """Which image of the request a task belongs to, and where its boxes go in it."""

    image: int
    offset: tuple[int, int]  # (x, y) of the tile in the image; (0, 0) for a full-image pass


def expand(
    tasks: Sequence[DetectionTask],
    output_size: Callable[[int, int], tuple[int, int]],
    resample: int,
) -> tuple[list[DetectionTask], list[_Part]]:
    """Every task with a TileSpec becomes its tiles (views of its pixels: nothing copied) and,
    when asked, one full-image pass reduced to the model's input (`output_size(height, width)`)
    with Pillow from the uint8 pixels, as a plain request's large image is reduced at decode.
    Tasks without one pass through unchanged."""
    out: list[DetectionTask] = []
    parts: list[_Part] = []
    for index, task in enumerate(tasks):
        spec = task.tiling
        if spec is None or task.pixels is None:
            out.append(task)
            parts.append(_Part(index, (0, 0)))
            continue
        pixels = task.pixels
        height, width = int(pixels.shape[0]), int(pixels.shape[1])
        for x1, y1, x2, y2 in spec.tiles(height, width):
            out.append(
                replace(task, pixels=pixels[y1:y2, x1:x2], tiling=None, source_size=None, tile=True)
            )
            parts.append(_Part(index, (x1, y1)))
        if spec.runs_full_image(height, width):
            out_height, out_width = output_size(height, width)
            out.append(
                replace(
                    task,
                    pixels=resize_pixels(pixels, out_height, out_width, resample),
                    tiling=None,
                    source_size=(height, width),
                    tile=True,
                )
            )
            parts.append(_Part(index, (0, 0)))
    return out, parts


def collect(
    tasks: Sequence[DetectionTask],
    parts: Sequence[_Part],
    outputs: Sequence[ImageDetections],
    device: torch.device | str = "cpu",
) -> list[ImageDetections]:
    """The answer of each original task: its tiles' detections moved into its pixels and
    merged (tiled tasks), or its own output (the others)."""
    by_image: dict[int, list[tuple[_Part, ImageDetections]]] = {}
    for part, output in zip(parts, outputs, strict=True):
        by_image.setdefault(part.image, []).append((part, output))
    answers = []
    for index, task in enumerate(tasks):
        pieces = by_image[index]
        spec = task.tiling
        if spec is None or task.pixels is None:
            answers.append(pieces[0][1])
            continue
        answers.append(_merge_image(task, spec, pieces, device))
    return answers


def _merge_image(
    task: DetectionTask,
    spec: TileSpec,
    pieces: list[tuple[_Part, ImageDetections]],
    device: torch.device | str,
) -> ImageDetections:
    import time

    started = time.perf_counter()
    boxes = np.concatenate(
        [o.boxes + np.array([*p.offset, *p.offset], dtype=np.float32) for p, o in pieces]
    ).reshape(-1, 4)
    scores = np.concatenate([o.scores for _, o in pieces]).astype(np.float32, copy=False)
    labels = np.concatenate([o.labels for _, o in pieces]).astype(np.int64, copy=False)
    b, s, lab = merge_detections(
        torch.from_numpy(boxes).to(device),
        torch.from_numpy(scores).to(device),
        torch.from_numpy(labels).to(device),
        method=spec.merge,
        metric=spec.match_metric,
        threshold=spec.match_threshold,
        class_agnostic=spec.class_agnostic,
    )
    k = task.max_detections
    merged_s = time.perf_counter() - started
    outs = [o for _, o in pieces]
    return ImageDetections(
        s[:k].cpu().numpy(),
        lab[:k].cpu().numpy(),
        b[:k].cpu().numpy(),
        max(o.batch_size for o in outs),
        max(o.inference_s for o in outs),
        max(o.postprocess_s for o in outs) + merged_s,
        tiles=len(pieces),
    )
