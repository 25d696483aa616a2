"""scripts/evaluate.py: the mAP and recall figures, and HTTP mode against a fake /v1/detect."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from scripts import evaluate
from scripts import synthetic_shapes as shapes


def _truth_as_detections(samples: list[shapes.Sample], score: float = 0.9) -> list[list[dict]]:
    return [
        [
            {
                "label": shapes.CLASSES[int(c)],
                "class_id": int(c),
                "score": score,
                "box": [float(v) for v in b],
            }
            for b, c in zip(s.boxes, s.labels, strict=True)
        ]
        for s in samples
    ]


@pytest.fixture(scope="module")
def dataset() -> tuple[dict, list[shapes.Sample]]:
    return shapes.coco_dataset(seed=77, count=4)


def test_perfect_detections_score_one(dataset):
    coco, samples = dataset
    figures = evaluate.evaluate(samples, coco, _truth_as_detections(samples))
    assert figures["mAP"] == pytest.approx(1.0)
    assert figures["mAP50"] == pytest.approx(1.0)
    assert figures["recall@0.5"] == 1.0 and figures["precision@0.5"] == 1.0


def test_wrong_class_scores_zero(dataset):
    coco, samples = dataset
    detections = _truth_as_detections(samples)
    for dets in detections:
        for d in dets:
            d["class_id"] = (d["class_id"] + 1) % len(shapes.CLASSES)
            d["label"] = shapes.CLASSES[d["class_id"]]
    figures = evaluate.evaluate(samples, coco, detections)
    assert figures["mAP50"] == 0.0
    assert figures["recall@0.5"] == 0.0


def test_no_detections_score_zero(dataset):
    coco, samples = dataset
    figures = evaluate.evaluate(samples, coco, [[] for _ in samples])
    assert figures["mAP"] == 0.0 and figures["recall@0.5"] == 0.0


def test_recall_ignores_detections_below_the_score_cut(dataset):
    _, samples = dataset
    figures = evaluate.recall_precision(
        samples, _truth_as_detections(samples, score=0.4), score=0.5
    )
    assert figures["recall@0.5"] == 0.0


def test_shifted_boxes_lose_strict_iou_but_keep_loose(dataset):
    coco, samples = dataset
    detections = _truth_as_detections(samples)
    for dets in detections:
        for d in dets:
            x1, y1, x2, y2 = d["box"]
            dx = 0.15 * (x2 - x1)  # IoU ~0.74: above 0.5, below 0.8
            d["box"] = [x1 + dx, y1, x2 + dx, y2]
    figures = evaluate.coco_map(coco, detections)
    assert figures["mAP50"] == pytest.approx(1.0)
    assert figures["mAP"] < 0.6


class _FakeDetr(BaseHTTPRequestHandler):
    """Answers /v1/detect per the API contract with the ground truth of the posted images."""

    by_jpeg: dict[bytes, shapes.Sample] = {}
    seen: list[str] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        length = int(self.headers["Content-Length"])
        body = self.rfile.read(length)
        kind = self.headers["Content-Type"]
        if kind.startswith("application/json"):
            request = json.loads(body)
            assert request["threshold"] == 0.01 and request["max_detections"] == 100
            images = [base64.b64decode(i["data"]) for i in request["images"]]
        else:
            boundary = kind.split("boundary=")[1].encode()
            images = [
                part.split(b"\r\n\r\n", 1)[1].rsplit(b"\r\n", 1)[0]
                for part in body.split(b"--" + boundary)
                if b'name="file"' in part
            ]
        self.seen.append(kind.split(";")[0])
        samples = [self.by_jpeg[i] for i in images]
        results = [
            {"width": s.width, "height": s.height, "detections": dets}
            for s, dets in zip(samples, _truth_as_detections(samples), strict=True)
        ]
        payload = json.dumps({"model": "fake", "results": results}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def fake_server(dataset) -> Iterator[str]:
    _, samples = dataset
    _FakeDetr.by_jpeg = {s.jpeg: s for s in samples}
    _FakeDetr.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeDetr)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join(5)


@pytest.mark.parametrize("transport", ["multipart", "json"])
def test_http_mode_posts_every_image_and_reads_the_contract(dataset, fake_server, transport):
    coco, samples = dataset
    name, detections = evaluate.detect_http(
        fake_server, samples, 0.01, 100, batch_size=3, transport=transport
    )
    assert name == "fake"
    assert (
        _FakeDetr.seen
        == ["multipart/form-data" if transport == "multipart" else "application/json"] * 2
    )
    assert evaluate.evaluate(samples, coco, detections)["mAP"] == pytest.approx(1.0)
