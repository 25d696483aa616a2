"""scripts/training/evaluate.py: the mAP and recall figures, and HTTP mode against a fake
/v1/detect."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from scripts.training import evaluate
from scripts.training import synthetic_shapes as shapes


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


def _columns(http_map50: float, http_map: float, shift: float = 0.0) -> dict[str, dict]:
    direct = dict.fromkeys(evaluate.METRIC_NAMES, 0.7) | {"mAP50": http_map50, "mAP": http_map}
    http = {k: v + shift for k, v in direct.items()}
    return {"direct": direct, "http": http}


def test_bar_verdicts_judge_the_served_figures_and_the_serving_difference():
    met = dict(evaluate.bar_verdicts(_columns(0.93, 0.70)))
    assert list(met.values()) == [True, True, True]
    assert any("largest 0.0000" in what for what in met)
    assert [ok for _, ok in evaluate.bar_verdicts(_columns(0.89, 0.70))] == [False, True, True]
    assert [ok for _, ok in evaluate.bar_verdicts(_columns(0.93, 0.64))] == [True, False, True]
    # The served model beating the direct one by more than the tolerance also fails the bar.
    assert [ok for _, ok in evaluate.bar_verdicts(_columns(0.93, 0.70, shift=0.01))][2] is False
    # Direct mode alone is judged on its own figures, with no serving difference to check.
    only_direct = {"direct": _columns(0.95, 0.7)["direct"]}
    assert [ok for _, ok in evaluate.bar_verdicts(only_direct)] == [True, True]


def _report() -> dict:
    return {
        "count": 4,
        "seed": 5,
        "objects": 9,
        "threshold": 0.01,
        "max_detections": 100,
        "date": "2026-01-01",
        "transport": "multipart",
    }


def test_card_section_goes_before_reproduce_and_is_replaced_in_place(tmp_path):
    card = tmp_path / "README.md"
    card.write_text("# m\n\n## Metrics\n\nx\n\n## Reproduce\n\n```\ntrain\n```\n")
    first = evaluate.card_section(
        _report(), _columns(0.80, 0.60), "python scripts/training/evaluate.py a"
    )
    evaluate.write_card_section(card, first)
    text = card.read_text()
    assert text.index("## Evaluation") < text.index("## Reproduce")
    assert "| mAP50 | 0.8000 | 0.8000 | +0.0000 |" in text
    assert "- mAP50 >= 0.90: NOT met" in text and "4 held-out images" in text

    second = evaluate.card_section(
        _report(), _columns(0.95, 0.70), "python scripts/training/evaluate.py b"
    )
    evaluate.write_card_section(card, second)
    text = card.read_text()
    assert text.count("## Evaluation") == 1 and text.count("## Reproduce") == 1
    assert "evaluate.py b" in text and "evaluate.py a" not in text
    assert "NOT met" not in text and "- mAP >= 0.65: met" in text
    assert text.endswith("```\ntrain\n```\n")


def test_card_section_is_appended_to_a_card_without_reproduce(tmp_path):
    card = tmp_path / "README.md"
    card.write_text("# someone else's model\n")
    evaluate.write_card_section(
        card, evaluate.card_section(_report(), {"direct": _columns(1, 1)["direct"]}, "cmd")
    )
    text = card.read_text()
    assert text.startswith("# someone else's model\n\n" + evaluate.CARD_BEGIN)
    assert "| metric | direct |" in text


def test_tiling_table_reports_both_modes_and_the_ratio_to_the_raw_pass():
    run = {"mAP50": 0.0, "mAP": 0.0, "recall@0.5": 0.0, "images_per_s": 5.0}
    report = {
        "runs": {
            "plain": run,
            "tiled": {
                **run,
                "mAP50": 0.95,
                "mAP": 0.8,
                "recall@0.5": 0.97,
                "images_per_s": 0.05,
                "tiles_per_s": 12.0,
            },
        },
        "tiles_per_image": 254.5,
        "max_batch_size": 8,
        "raw_forward_img_s": 15.0,
        "tiles_over_raw": 0.8,
    }
    table = evaluate.tiling_table(report)
    assert "| mAP@0.5 | 0.000 | 0.950 |" in table
    assert "| recall (score >= 0.5, IoU >= 0.5) | 0.000 | 0.970 |" in table
    assert "| tiles per image | 1 | 254.5 |" in table
    assert "12.0 (0.80x raw)" in table and "batch 8: 15.0" in table


def _onnx_tiling_report(raw_img_s: float, **raw: float) -> dict:
    """A tiled run of 51.0 tiles/s against an onnxruntime raw pass of `raw_img_s`."""
    run = {"mAP50": 0.0, "mAP": 0.0, "recall@0.5": 0.0, "images_per_s": 5.0}
    return {
        "runs": {"plain": run, "tiled": {**run, "tiles_per_s": 51.0}},
        "tiles_per_image": 254.5,
        "max_batch_size": 8,
        "raw_backend": "onnx",
        "raw_forward_img_s": raw_img_s,
        "tiles_over_raw": 51.0 / raw_img_s,
        **raw,
    }


def test_tiling_table_names_the_backend_of_the_raw_pass():
    assert "raw onnx forward pass at batch 8: 60.0) | | 51.0 (0.85x raw)" in (
        evaluate.tiling_table(_onnx_tiling_report(60.0))
    )


def test_tiling_table_says_the_raw_pass_is_the_mean_of_before_and_after():
    report = _onnx_tiling_report(55.0, raw_before_img_s=50.0, raw_after_img_s=60.0)
    assert "at batch 8: 55.0, mean of 50.0 before and 60.0 after) | | 51.0 (0.93x raw)" in (
        evaluate.tiling_table(report)
    )


@pytest.mark.parametrize(
    ("card", "expected"),
    [
        ({"backend": "onnx", "dtype": "float32"}, ("onnx", "float")),
        ({"backend": "onnx", "dtype": "int8"}, ("onnx", "int8")),
        ({"backend": "torch", "dtype": "float32"}, ("torch", "float")),
    ],
)
def test_the_raw_pass_runs_the_backend_the_server_describes(card, expected):
    assert evaluate.served_raw_pass(card) == expected


def test_no_raw_pass_matches_the_null_engine():
    with pytest.raises(ValueError, match="backend 'null'"):
        evaluate.served_raw_pass({"backend": "null", "dtype": "float32"})


def test_the_raw_pass_reports_each_variant_and_takes_the_faster(monkeypatch, tmp_path):
    """onnxruntime's raw pass runs without and with spinning threads (a server runs one of
    them): both figures are kept, the comparison takes the faster."""
    import subprocess

    from scripts.bench import bench_compare

    speeds = {False: [20.0, 70.0], True: [25.0, 80.5]}  # batch 1, batch 8

    def fake_run(cmd, **kwargs):  # what scripts/bench.py --skip-http writes
        spinning = "--onnx-spinning" in cmd
        out = cmd[cmd.index("--out") + 1]
        rows = [
            {
                "backend": "onnx",
                "batch": batch,
                "threads": 2,
                "forward_img_s": speed,
                "engine_img_s": speed * 0.9,
                "forward_cpu_ms_per_image": 2000.0 / speed,
            }
            for batch, speed in zip((1, 8), speeds[spinning], strict=True)
        ]
        with open(out, "w") as fh:
            json.dump({"raw": rows}, fh)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(bench_compare.subprocess, "run", fake_run)
    raw = bench_compare.raw_forward(tmp_path, 8, 1.0, backend="onnx")
    assert raw["variants"] == {"no spinning": 70.0, "spinning": 80.5}
    assert raw["forward_img_s"] == 80.5 and raw["variant"] == "spinning" and raw["batch"] == 8
    assert raw["forward_cpu_ms_per_image"] == 2000.0 / 80.5  # the faster row's own
