"""Tiling geometry (SAHI's slicing) and the merge of tiles' detections (NMS, greedy NMM),
against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.engine.tasks import DetectionTask, ImageDetections
from app.engine.tile_tasks import collect, expand, merge_detections, pair_overlaps
from app.options import tiling_value
from app.tile_geometry import TileSpec, axis_starts, wants_tiles

# -- geometry ---------------------------------------------------------------------------------


def test_axis_starts_step_by_size_minus_overlap_and_shift_the_last_tile_inside() -> None:
    # 1000 px, tiles of 256 at overlap 0.2: step 256 - int(51.2) = 205.
    assert axis_starts(1000, 256, 205) == [0, 205, 410, 615, 744]


def test_axis_starts_exact_fit_has_no_shifted_duplicate() -> None:
    assert axis_starts(512, 256, 256) == [0, 256]
    assert axis_starts(256, 256, 205) == [0]


def test_image_smaller_than_a_tile_is_one_tile_of_its_own_size() -> None:
    spec = TileSpec(tile_size=256, full_image=True)
    assert spec.tiles(100, 50) == [(0, 0, 50, 100)]
    assert spec.count(100, 50) == 1  # no full-image pass: the one tile is the image
    # Smaller along one axis only: tiles span that axis whole.
    assert spec.tiles(100, 600) == [(0, 0, 256, 100), (205, 0, 461, 100), (344, 0, 600, 100)]


def test_every_tile_is_full_size_and_inside_and_the_image_is_covered() -> None:
    spec = TileSpec(tile_size=256, overlap=0.2, full_image=True)
    height, width = 2160, 3840
    tiles = spec.tiles(height, width)
    covered = np.zeros((height, width), dtype=bool)
    for x1, y1, x2, y2 in tiles:
        assert (x2 - x1, y2 - y1) == (256, 256)
        assert 0 <= x1 and x2 <= width and 0 <= y1 and y2 <= height
        covered[y1:y2, x1:x2] = True
    assert covered.all()
    # 19 columns (18 stepped + the shifted one), 11 rows; plus the full-image pass.
    assert len(tiles) == 19 * 11
    assert spec.count(height, width) == 19 * 11 + 1
    assert TileSpec(tile_size=256, full_image=False).count(height, width) == 19 * 11


def test_neighbours_overlap_by_at_least_the_requested_share() -> None:
    spec = TileSpec(tile_size=320, overlap=0.25)
    xs = sorted({t[0] for t in spec.tiles(1000, 3000)})
    gaps = np.diff(xs)
    assert gaps.max() == 320 - 80  # the stepped ones
    assert (gaps <= 240).all()  # the shifted last one overlaps more, never less


def test_huge_image_tile_count_is_computed_without_materialising_anything() -> None:
    spec = TileSpec(tile_size=640, overlap=0.2, full_image=True)
    # 40000 x 40000: 1.6 gigapixels; the count comes from the axes alone.
    per_axis = len(axis_starts(40_000, 640, 640 - 128))
    assert spec.count(40_000, 40_000) == per_axis * per_axis + 1


@pytest.mark.parametrize(
    ("kwargs", "field"), [({"tile_size": 32}, "tile_size"), ({"overlap": 0.95}, "overlap")]
)
def test_tile_spec_refuses_a_tiny_tile_or_overlap_past_0_9(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        TileSpec(**{"tile_size": 256, **kwargs})


def test_auto_tiles_only_images_over_the_factor() -> None:
    assert not wants_tiles(512, 512, 256, 2.0)
    assert wants_tiles(513, 300, 256, 2.0)


# -- merge --------------------------------------------------------------------------------------


def _t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_pair_overlaps_iou_and_ios_by_hand() -> None:
    boxes = _t([[0, 0, 10, 10], [5, 0, 15, 10], [100, 100, 110, 110], [2, 2, 4, 4]])
    i, j, v = pair_overlaps(boxes, "iou")
    got = {
        (min(a, b), max(a, b)): round(float(x), 4)
        for a, b, x in zip(i.tolist(), j.tolist(), v, strict=True)
    }
    # 0-1: inter 50, union 150; 0-3: inter 4, union 100; 1-3: none (x 5..15 vs 2..4).
    assert got == {(0, 1): round(50 / 150, 4), (0, 3): 0.04}
    i, j, v = pair_overlaps(boxes, "ios")
    got = {
        (min(a, b), max(a, b)): round(float(x), 4)
        for a, b, x in zip(i.tolist(), j.tolist(), v, strict=True)
    }
    assert got == {(0, 1): 0.5, (0, 3): 1.0}


def test_pair_overlaps_touching_edges_do_not_count() -> None:
    i, _, _ = pair_overlaps(_t([[0, 0, 10, 10], [10, 0, 20, 10]]), "iou")
    assert i.numel() == 0


def test_pair_overlaps_matches_brute_force_on_random_boxes() -> None:
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(3000, 2, generator=g) * 1000
    wh = torch.rand(3000, 2, generator=g) * 60 + 1
    boxes = torch.cat([xy, xy + wh], 1)
    i, j, v = pair_overlaps(boxes, "iou")
    lt = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
    rb = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = (boxes[:, 2:] - boxes[:, :2]).prod(-1)
    iou = inter / (area[:, None] + area[None] - inter)
    upper = torch.triu(inter > 0, diagonal=1)
    assert i.numel() == int(upper.sum())
    a, b = torch.minimum(i, j), torch.maximum(i, j)
    assert upper[a, b].all()
    torch.testing.assert_close(v, iou[a, b])


def test_nms_keeps_the_best_of_a_chain_and_what_it_does_not_suppress() -> None:
    # A (0.9) overlaps B (0.8) at IoU 0.6; B overlaps C (0.7) at 0.6; A and C do not meet.
    # Greedy NMS at 0.5: A kept, B suppressed by A, C kept (its only match, B, was suppressed).
    boxes = _t([[0, 0, 10, 10], [2.5, 0, 12.5, 10], [5.1, 0, 15.1, 10]])
    ious = pair_overlaps(boxes, "iou")[2]
    assert ious.min() < 0.5 < ious.max()  # sanity of the fixture: A-C is under 0.5
    boxes = _t([[0, 0, 10, 10], [2.5, 0, 12.5, 10], [12, 0, 22, 10]])
    b, s, lab = merge_detections(
        torch.cat([boxes, _t([[14, 0, 24, 10]])]),
        torch.tensor([0.9, 0.8, 0.7, 0.6]),
        torch.tensor([0, 0, 0, 0]),
        method="nms",
        metric="iou",
        threshold=0.5,
    )
    # A-B IoU 75/125 = 0.6 (B out); B-C IoU 5/195 (no match); C-D IoU 80/120 = 0.67 (D out).
    assert s.tolist() == pytest.approx([0.9, 0.7])
    assert b.tolist() == [[0, 0, 10, 10], [12, 0, 22, 10]]
    assert lab.tolist() == [0, 0]


def test_nms_chain_where_the_middle_box_falls_keeps_the_third() -> None:
    # A-B match, B-C match, A-C do not: C survives because B was suppressed (greedy, not
    # transitive).
    boxes = _t([[0, 0, 10, 10], [3, 0, 13, 10], [6, 0, 16, 10]])
    _, s, _ = merge_detections(
        boxes,
        torch.tensor([0.9, 0.8, 0.7]),
        torch.zeros(3, dtype=torch.long),
        method="nms",
        metric="iou",
        threshold=0.5,
    )
    # A-B: 70/130 = 0.54; B-C: 0.54; A-C: 40/160 = 0.25.
    assert s.tolist() == pytest.approx([0.9, 0.7])


def test_merge_is_class_aware_unless_class_agnostic() -> None:
    boxes = _t([[0, 0, 10, 10], [1, 0, 11, 10]])
    scores, labels = torch.tensor([0.9, 0.8]), torch.tensor([0, 1])
    _, s, _ = merge_detections(boxes, scores, labels, method="nms", metric="iou", threshold=0.5)
    assert s.tolist() == pytest.approx([0.9, 0.8])
    _, s, lab = merge_detections(
        boxes, scores, labels, method="nms", metric="iou", threshold=0.5, class_agnostic=True
    )
    assert s.tolist() == pytest.approx([0.9]) and lab.tolist() == [0]


def test_greedy_nmm_folds_matches_into_the_union_box_with_the_best_score_and_class() -> None:
    # An object cut by a tile border: left part L and right part R from two tiles, and the
    # whole box W from the full-image pass; O elsewhere. IoS: L and R each lie inside W; L-R
    # meet on 2 px of 30 (IoS 0.067, no match).
    left, right, whole, other = (
        [100, 50, 130, 80],
        [128, 50, 160, 80],
        [100, 50, 160, 80],
        [400, 400, 420, 420],
    )
    boxes = _t([left, right, whole, other])
    labels = torch.tensor([2, 2, 2, 2])
    # W best: it keeps, L and R fold into it (their union is W).
    b, s, lab = merge_detections(
        boxes, torch.tensor([0.7, 0.6, 0.95, 0.5]), labels, method="greedy_nmm", metric="ios"
    )
    assert s.tolist() == pytest.approx([0.95, 0.5])
    assert b.tolist() == [whole, other] and lab.tolist() == [2, 2]
    # L best: W folds into L (L grows to W); R's only match was W, suppressed: R stays
    # (greedy merges direct matches only, as SAHI's GREEDYNMM).
    b, s, _ = merge_detections(
        boxes, torch.tensor([0.9, 0.6, 0.7, 0.5]), labels, method="greedy_nmm", metric="ios"
    )
    assert s.tolist() == pytest.approx([0.9, 0.6, 0.5])
    assert b.tolist() == [whole, right, other]
    # NMS with the same matches keeps the best box as it was.
    b, s, _ = merge_detections(
        boxes, torch.tensor([0.9, 0.6, 0.7, 0.5]), labels, method="nms", metric="ios"
    )
    assert b.tolist() == [left, right, other]


def test_greedy_nmm_gives_a_suppressed_box_to_the_best_kept_box_that_matches_it() -> None:
    # K1 (0.9) and K2 (0.8) do not match each other; S (0.5) matches both: it folds into K1.
    k1, k2, sb = [0, 0, 10, 10], [20, 0, 30, 10], [8, 0, 22, 10]
    b, s, _ = merge_detections(
        _t([k1, k2, sb]),
        torch.tensor([0.9, 0.8, 0.5]),
        torch.zeros(3, dtype=torch.long),
        method="greedy_nmm",
        metric="ios",
        threshold=0.1,
    )
    assert s.tolist() == pytest.approx([0.9, 0.8])
    assert b.tolist() == [[0, 0, 22, 10], k2]


def test_merge_of_nothing_and_of_one_box() -> None:
    empty = torch.zeros((0, 4))
    b, s, lab = merge_detections(empty, torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert b.shape == (0, 4) and s.numel() == 0 and lab.numel() == 0
    b, _, _ = merge_detections(_t([[1, 2, 3, 4]]), torch.tensor([0.5]), torch.tensor([1]))
    assert b.tolist() == [[1, 2, 3, 4]]


# -- expand and collect -------------------------------------------------------------------------


def test_expand_cuts_views_and_collect_puts_boxes_back_in_image_pixels() -> None:
    pixels = np.zeros((300, 500, 3), dtype=np.uint8)
    spec = TileSpec(tile_size=256, overlap=0.0, full_image=True)
    plain = DetectionTask(np.zeros((10, 10, 3), np.uint8), 0.5, 10)
    tiled = DetectionTask(pixels, 0.5, 10, tiling=spec)
    items, parts = expand([plain, tiled], lambda h, w: (64, 64), 2)
    # plain, then 2 x 2 tiles (x 0, 244; y 0, 44), then the full image reduced to 64x64.
    assert len(items) == 1 + 4 + 1
    assert items[0] is plain
    for item in items[1:5]:
        assert item.pixels is not None and item.pixels.shape == (256, 256, 3)
        assert np.shares_memory(item.pixels, pixels)  # a view: nothing copied
        assert item.tiling is None and item.size == (256, 256)
        assert item.tile  # no decoding of its own (a batch of them may spin: onnx_backend)
    assert not items[0].tile
    full = items[5]
    assert full.pixels is not None and full.pixels.shape == (64, 64, 3)
    assert full.tile
    assert full.size == (300, 500)  # its boxes come back in the original's pixels

    def out(boxes: list[list[float]], scores: list[float]) -> ImageDetections:
        return ImageDetections(
            np.array(scores, np.float32),
            np.zeros(len(scores), np.int64),
            np.array(boxes, np.float32).reshape(-1, 4),
            4,
            0.01,
            0.001,
        )

    outputs = [
        out([[1, 1, 2, 2]], [0.3]),
        out([[10, 10, 20, 20]], [0.9]),  # tile (0, 0)
        out([], []),  # tile (244, 0)
        out([], []),  # tile (0, 44)
        out([[6, 6, 16, 16]], [0.8]),  # tile (244, 44): image box (250, 50, 260, 60)
        out([[9, 9, 21, 21]], [0.5]),  # full image: overlaps the first tile's box
    ]
    answers = collect([plain, tiled], parts, outputs)
    assert answers[0] is outputs[0]
    merged = answers[1]
    assert merged.tiles == 5
    assert merged.scores.tolist() == pytest.approx([0.9, 0.8])
    # greedy NMM (IoS): the full-image box folds into the tile's (union 9..21).
    assert merged.boxes.tolist() == [[9, 9, 21, 21], [250, 50, 260, 60]]


def test_collect_caps_at_max_detections_best_first() -> None:
    pixels = np.zeros((256, 600, 3), dtype=np.uint8)
    task = DetectionTask(pixels, 0.0, 2, tiling=TileSpec(tile_size=256, full_image=False))
    items, parts = expand([task], lambda h, w: (64, 64), 2)
    outputs = [
        ImageDetections(
            np.array([0.1 * (i + 1)], np.float32),
            np.zeros(1, np.int64),
            np.array([[i * 3, 0, i * 3 + 2, 2]], np.float32),
            len(items),
            0.0,
            0.0,
        )
        for i in range(len(items))
    ]
    merged = collect([task], parts, outputs)[0]
    assert len(merged.scores) == 2
    assert merged.scores.tolist() == pytest.approx([0.1 * len(items), 0.1 * (len(items) - 1)])


@pytest.mark.parametrize(
    "options",
    [{"class_agnostic": "true"}, {"class_agnostic": 1}, {"tile_size": "640"}, {"overlap": "0.2"}],
)
def test_tiling_object_takes_json_types_only(options: dict) -> None:
    """As the OpenAPI schema says: a string or number where a boolean goes is refused (422 by
    the routes), not coerced."""
    with pytest.raises(ValueError, match=r"tiling\."):
        tiling_value(options)
