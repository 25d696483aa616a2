"""The synthetic shapes generator: deterministic, varied, and annotated consistently."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from scripts.training import synthetic_shapes as shapes

N = 40


@pytest.fixture(scope="module")
def samples() -> list[shapes.Sample]:
    return [shapes.generate_sample(123, i) for i in range(N)]


def test_same_seed_and_index_give_identical_samples():
    a, b = shapes.generate_sample(7, 3), shapes.generate_sample(7, 3)
    assert a.jpeg == b.jpeg
    np.testing.assert_array_equal(a.boxes, b.boxes)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.areas, b.areas)


def test_other_index_or_seed_gives_another_image():
    base = shapes.generate_sample(7, 3).jpeg
    assert shapes.generate_sample(7, 4).jpeg != base
    assert shapes.generate_sample(8, 3).jpeg != base


def test_the_three_streams_are_distinct():
    assert len({shapes.TRAIN_SEED, shapes.VALIDATION_SEED, shapes.HELDOUT_SEED}) == 3
    assert (
        shapes.generate_sample(shapes.TRAIN_SEED, 0).jpeg
        != shapes.generate_sample(shapes.HELDOUT_SEED, 0).jpeg
    )


def test_jpeg_bytes_decode_to_the_sample_image(samples):
    for s in samples[:5]:
        decoded = Image.open(io.BytesIO(s.jpeg))
        assert decoded.format == "JPEG"
        np.testing.assert_array_equal(np.asarray(decoded.convert("RGB")), np.asarray(s.image))


def test_image_sizes_vary_within_bounds_and_are_not_all_square(samples):
    sizes = [(s.width, s.height) for s in samples]
    for w, h in sizes:
        assert shapes.MIN_SIDE <= w <= shapes.MAX_SIDE
        assert shapes.MIN_SIDE <= h <= shapes.MAX_SIDE
        assert max(w, h) / min(w, h) <= shapes.MAX_ASPECT + 0.01
    assert len(set(sizes)) > N // 2
    assert sum(w > h for w, h in sizes) >= 3 and sum(h > w for w, h in sizes) >= 3
    assert max(max(sz) for sz in sizes) > 600 and min(min(sz) for sz in sizes) < 400


def test_boxes_lie_inside_the_image_with_positive_size(samples):
    for s in samples:
        assert s.boxes.shape == (len(s.labels), 4)
        x1, y1, x2, y2 = s.boxes.T
        assert (x1 >= 0).all() and (y1 >= 0).all()
        assert (x2 <= s.width).all() and (y2 <= s.height).all()
        assert (x2 > x1).all() and (y2 > y1).all()


def test_areas_are_visible_pixels_within_their_box(samples):
    for s in samples:
        box_area = (s.boxes[:, 2] - s.boxes[:, 0]) * (s.boxes[:, 3] - s.boxes[:, 1])
        assert (s.areas > 0).all()
        assert (s.areas <= box_area).all()
        # Even a circle fills pi/4 of its box; occlusion keeps >= 60% of a shape: none is a sliver.
        assert (s.areas >= 0.15 * box_area).all()


def test_object_counts_and_classes_cover_the_range(samples):
    counts = [len(s.labels) for s in samples]
    assert min(counts) >= shapes.MIN_OBJECTS and max(counts) <= shapes.MAX_OBJECTS
    assert max(counts) >= 8 and min(counts) <= 4
    labels = np.concatenate([s.labels for s in samples])
    assert set(labels.tolist()) == set(range(len(shapes.CLASSES)))
    assert len(shapes.CLASSES) >= 5


def test_object_sizes_span_small_to_large(samples):
    sides = np.concatenate(
        [np.maximum(s.boxes[:, 2] - s.boxes[:, 0], s.boxes[:, 3] - s.boxes[:, 1]) for s in samples]
    )
    assert sides.min() < 30
    assert sides.max() > 200


def test_some_objects_overlap(samples):
    overlapping = 0
    for s in samples:
        b = s.boxes
        for i in range(len(b)):
            for j in range(i + 1, len(b)):
                if min(b[i, 2], b[j, 2]) > max(b[i, 0], b[j, 0]) and min(b[i, 3], b[j, 3]) > max(
                    b[i, 1], b[j, 1]
                ):
                    overlapping += 1
    assert overlapping >= 5


def test_coco_dataset_is_consistent_and_loads_in_pycocotools():
    from pycocotools.coco import COCO

    coco, samples = shapes.coco_dataset(seed=11, count=6)
    assert [c["name"] for c in coco["categories"]] == list(shapes.CLASSES)
    assert len(coco["images"]) == 6 and len(samples) == 6
    assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
    assert len(coco["annotations"]) == sum(len(s.labels) for s in samples)
    by_image = {img["id"]: (img, s) for img, s in zip(coco["images"], samples, strict=True)}
    for ann in coco["annotations"]:
        img, s = by_image[ann["image_id"]]
        assert (img["width"], img["height"]) == (s.width, s.height)
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and x + w <= img["width"] and y + h <= img["height"]
        assert 1 <= ann["category_id"] <= len(shapes.CLASSES)
        assert 0 < ann["area"] <= w * h
    api = COCO()
    api.dataset = coco
    api.createIndex()
    assert len(api.getAnnIds()) == len(coco["annotations"])


def test_write_dataset_stores_the_exact_jpeg_bytes(tmp_path):
    path = shapes.write_dataset(tmp_path, seed=5, count=3)
    coco = json.loads(path.read_text())
    for info, index in zip(coco["images"], range(3), strict=True):
        assert (tmp_path / info["file_name"]).read_bytes() == shapes.generate_sample(5, index).jpeg


def test_highres_scenes_are_4k_and_12mp_with_small_objects():
    """Issue 14's scenes: 3840x2160 and 4000x3000 in turn, objects 16-64 px across (boxes are
    tight around the visible, anti-aliased pixels: a little under the drawn diameter)."""
    first = shapes.generate_highres(shapes.HIGHRES_SEED, 0)
    assert (first.width, first.height) == (3840, 2160)
    assert shapes.HIGHRES_SIZES[1] == (4000, 3000)
    assert shapes.HIGHRES_OBJECTS[0] <= len(first.labels) <= shapes.HIGHRES_OBJECTS[1]
    sides = np.maximum(first.boxes[:, 2] - first.boxes[:, 0], first.boxes[:, 3] - first.boxes[:, 1])
    assert sides.min() >= 10 and sides.max() <= 66
    assert (first.boxes[:, 2] <= 3840).all() and (first.boxes[:, 3] <= 2160).all()
    again = shapes.generate_highres(shapes.HIGHRES_SEED, 0)
    assert again.jpeg == first.jpeg
