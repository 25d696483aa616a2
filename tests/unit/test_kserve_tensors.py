"""The served model's v2 tensors (app/api/kserve/tensors.py): answers as padded output
tensors, the model's metadata, and the 404 of an unknown model or version."""

from __future__ import annotations

import numpy as np
import pytest

from app.api.kserve import tensors
from app.errors import UnknownModelError
from app.service import DetectResult
from tests.unit.kserve_bodies import result


def test_detections_are_padded_to_k_with_zero_scores_and_minus_one_labels() -> None:
    response = DetectResult(
        "m",
        [
            result((2, 0.9, [1, 2, 3, 4]), (0, 0.5, [5, 6, 7, 8])),
            result(),
            result((4, 0.7, [0.5, 0.25, 10.75, 20.0])),
        ],
    )
    t = tensors.v2_tensors(response, max_detections=3)
    assert t["boxes"].shape == (3, 3, 4) and t["boxes"].dtype == np.float32
    assert t["scores"].shape == (3, 3) and t["scores"].dtype == np.float32
    assert t["labels"].shape == (3, 3) and t["labels"].dtype == np.int64
    assert t["num_detections"].tolist() == [2, 0, 1] and t["num_detections"].dtype == np.int32
    assert t["labels"].tolist() == [[2, 0, -1], [-1, -1, -1], [4, -1, -1]]
    expected_scores = np.array([[0.9, 0.5, 0], [0, 0, 0], [0.7, 0, 0]], dtype=np.float32)
    np.testing.assert_array_equal(t["scores"], expected_scores)
    assert t["boxes"][0].tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [0, 0, 0, 0]]
    assert t["boxes"][2, 0].tolist() == [0.5, 0.25, 10.75, 20.0]
    assert not t["boxes"][1].any()


def test_model_metadata_documents_tensors_padding_and_labels() -> None:
    meta = tensors.model_metadata(
        name="m",
        backend="torch",
        labels={0: "circle", 1: "square"},
        default_threshold=0.5,
        default_max_detections=100,
    )
    assert meta["versions"] == ["1"] and meta["platform"] == "pytorch_transformers"
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
        ("images", "BYTES", [-1])
    ]
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["outputs"]] == [
        ("boxes", "FP32", [-1, -1, 4]),
        ("scores", "FP32", [-1, -1]),
        ("labels", "INT64", [-1, -1]),
        ("num_detections", "INT32", [-1]),
    ]
    assert "label -1" in meta["parameters"]["description"]
    assert meta["parameters"]["labels"] == {"0": "circle", "1": "square"}
    assert "default 100" in meta["parameters"]["request_parameters"]["max_detections"]


def test_unknown_model_or_version_is_a_404() -> None:
    tensors.check_model("m", "m", None)
    tensors.check_model("m", "m", "1")
    with pytest.raises(UnknownModelError, match="unknown model 'x'; this server serves 'm'"):
        tensors.check_model("m", "x", None)
    with pytest.raises(UnknownModelError, match="unknown version '2' of model 'm'") as e:
        tensors.check_model("m", "m", "2")
    assert e.value.status_code == 404
