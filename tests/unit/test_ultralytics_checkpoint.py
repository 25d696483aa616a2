"""Ultralytics checkpoints recognised without ultralytics (app/models/ultralytics.py): what the
pickle says, read with stubs (no code of the file runs), and the predictor's older output layout
(best class per query) in the engine's Postprocessor. The real package's checkpoints are tested
in tests/ultralytics (`make test-ultralytics`)."""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from app.config import Settings, model_dir_problem
from app.engine.postprocess import Postprocessor, PostprocessSpec
from app.engine.preprocess_spec import FixedSize
from app.models.ultralytics import UltralyticsCheckpointError, is_checkpoint, probe


class RTDETRDetectionModel:  # pickled under ultralytics.nn.tasks by the fixture
    pass


class DetectionModel:
    pass


@pytest.fixture
def fake_ultralytics() -> Iterator[types.ModuleType]:
    """A module named ultralytics.nn.tasks holding the classes above, while pickling only."""
    module = types.ModuleType("ultralytics.nn.tasks")
    for cls in (RTDETRDetectionModel, DetectionModel):
        module.__dict__[cls.__name__] = cls
    saved = {c: (c.__module__, c.__qualname__) for c in (RTDETRDetectionModel, DetectionModel)}
    for cls in saved:
        cls.__module__ = "ultralytics.nn.tasks"
    names = ("ultralytics", "ultralytics.nn", "ultralytics.nn.tasks")
    for name in names[:2]:
        sys.modules[name] = types.ModuleType(name)
    sys.modules["ultralytics.nn.tasks"] = module
    try:
        yield module
    finally:
        for name in names:
            del sys.modules[name]
        for cls, (mod, _) in saved.items():
            cls.__module__ = mod


def _save(path: Path, model: object, **top: object) -> Path:
    torch.save({"model": model, "ema": None, **top}, path)
    return path


def _rtdetr(names: object = None, args: object = None) -> RTDETRDetectionModel:
    model = RTDETRDetectionModel()
    model.names = {0: "person", 1: "bicycle"} if names is None else names
    model.args = {"imgsz": 640} if args is None else args
    model.stride = torch.tensor([32.0])
    model.weight = torch.zeros(3, dtype=torch.float16)
    return model


def test_probe_reads_input_size_labels_and_version(tmp_path: Path, fake_ultralytics) -> None:
    path = _save(tmp_path / "best.pt", _rtdetr(), train_args={"imgsz": 320}, version="8.4.190")
    checkpoint = probe(path)
    assert checkpoint is not None
    assert checkpoint.input_size == (320, 320)  # the training imgsz wins over the model's args
    assert checkpoint.labels == {0: "person", 1: "bicycle"}
    assert checkpoint.version == "8.4.190"
    assert checkpoint.architecture == (
        "RTDETRDetectionModel (Ultralytics checkpoint, saved by Ultralytics 8.4.190)"
    )
    spec = checkpoint.preprocess_spec()
    assert spec.resize == FixedSize(320, 320)
    assert spec.resize_with == "opencv"
    assert (spec.do_rescale, spec.rescale_factor, spec.do_normalize, spec.do_pad) == (
        True,
        1 / 255,
        False,
        False,
    )


@pytest.mark.parametrize(
    ("imgsz", "size"), [(630, (640, 640)), ([480, 640], (480, 640)), ([500], (512, 512))]
)
def test_probe_rounds_imgsz_up_to_the_stride_as_check_imgsz_does(
    tmp_path: Path, fake_ultralytics, imgsz: object, size: tuple[int, int]
) -> None:
    path = _save(tmp_path / "m.pt", _rtdetr(names=["a", "b", "c"], args={"imgsz": imgsz}))
    checkpoint = probe(path)
    assert checkpoint is not None
    assert checkpoint.input_size == size
    assert checkpoint.labels == {0: "a", 1: "b", 2: "c"}


def test_a_yolo_checkpoint_is_refused_by_name(tmp_path: Path, fake_ultralytics) -> None:
    model = DetectionModel()
    model.names = {0: "x"}
    path = _save(tmp_path / "yolo.pt", model)
    with pytest.raises(UltralyticsCheckpointError, match="holds an Ultralytics DetectionModel"):
        probe(path)
    assert is_checkpoint(path)
    problem = model_dir_problem(path)
    assert problem is not None and "RT-DETR checkpoints (RTDETRDetectionModel) only" in problem
    with pytest.raises(ValueError, match="RTDETRDetectionModel"):
        Settings(model=path)


def test_settings_take_a_checkpoint_file_and_name_it_by_its_stem(
    tmp_path: Path, fake_ultralytics
) -> None:
    path = _save(tmp_path / "my-detector.pt", _rtdetr())
    settings = Settings(model=path)
    assert settings.model == path.resolve()
    assert settings.served_model_name == "my-detector"


def test_other_files_are_not_ultralytics_checkpoints(tmp_path: Path) -> None:
    plain = tmp_path / "weights.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, plain)
    assert probe(plain) is None
    assert probe(tmp_path) is None  # a folder
    problem = model_dir_problem(plain)
    assert problem is not None and "not an Ultralytics RT-DETR checkpoint" in problem
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a zip at all")
    with pytest.raises(UltralyticsCheckpointError, match="not a readable torch checkpoint"):
        probe(broken)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # what a hostile pickle does: call a function while loading
        return (os.mkdir, (str(self.marker),))


def test_probe_runs_no_code_of_the_file(tmp_path: Path, fake_ultralytics) -> None:
    marker = tmp_path / "ran"
    model = _rtdetr()
    model.payload = _Payload(marker)
    path = _save(tmp_path / "hostile.pt", model)
    assert probe(path) is not None
    assert not marker.exists()


def _ultralytics_840_postprocess(preds: torch.Tensor, conf: float, max_det: int, size):
    """RTDETRPredictor.postprocess of Ultralytics 8.3.x-8.4.0, as written there, on [B, Q, 4 + C]
    (sigmoid scores), for one image."""
    nd = preds.shape[-1]
    bboxes, scores = preds.split((4, nd - 4), dim=-1)
    bbox, score = bboxes[0], scores[0]
    x, y, w, h = bbox.unbind(-1)
    bbox = torch.stack([x - w / 2, y - h / 2, x + w / 2, y + h / 2], -1)  # ops.xywh2xyxy
    max_score, cls = score.max(-1, keepdim=True)
    idx = max_score.squeeze(-1) > conf
    pred = torch.cat([bbox, max_score, cls], dim=-1)[idx]
    pred = pred[pred[:, 4].argsort(descending=True)][:max_det]
    oh, ow = size
    pred[..., [0, 2]] *= ow
    pred[..., [1, 3]] *= oh
    return pred


def test_best_class_per_query_is_the_older_predictor() -> None:
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 30, 7, generator=generator) * 2 - 2
    boxes = torch.rand(1, 30, 4, generator=generator) * 0.5 + 0.2
    size = (480, 640)
    spec = PostprocessSpec("sigmoid", 30, best_class_per_query=True)
    dets = Postprocessor(spec)(logits, boxes, torch.tensor([size]))
    keep = dets.scores[0] > 0.25
    want = _ultralytics_840_postprocess(
        torch.cat([boxes, logits.sigmoid()], -1), 0.25, 300, size
    ).numpy()
    assert keep.sum() == len(want) > 3
    np.testing.assert_allclose(dets.scores[0][keep], want[:, 4], atol=1e-6)
    np.testing.assert_array_equal(dets.labels[0][keep], want[:, 5].astype(np.int64))
    np.testing.assert_allclose(dets.boxes[0][keep], want[:, :4], atol=1e-3)
    # The flat top-k (transformers, newer Ultralytics) can give one query several classes.
    flat = Postprocessor(PostprocessSpec("sigmoid", 30))(logits, boxes, torch.tensor([size]))
    assert (flat.scores[0] > 0.25).sum() > keep.sum()
