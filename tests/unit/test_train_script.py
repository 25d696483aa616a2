"""The default model's training script (tiny preset, end to end) and the committed model itself."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from scripts.training import synthetic_shapes as shapes
from scripts.training import train_default_model as train

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = REPO / "models" / "rtdetr-shapes"


def _run(run_dir: Path, export_dir: Path, *extra: str) -> None:
    args = ["--preset", "tiny", "--run-dir", str(run_dir), "--export-dir", str(export_dir)]
    assert train.main([*args, "--threads", "1", "--workers", "0", "--no-progress", *extra]) == 0


def test_tiny_run_exports_a_model_transformers_can_load(tmp_path):
    from transformers import AutoImageProcessor, AutoModelForObjectDetection

    export = tmp_path / "model"
    _run(tmp_path / "run", export, "--steps", "2")

    assert {p.name for p in export.iterdir()} == {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "README.md",
    }
    config = json.loads((export / "config.json").read_text())
    assert config["id2label"] == {str(i): n for i, n in enumerate(shapes.CLASSES)}
    model = AutoModelForObjectDetection.from_pretrained(export).eval()
    processor = AutoImageProcessor.from_pretrained(export)
    assert processor.size["height"] == processor.size["width"] == train.PRESETS["tiny"].image_size
    inputs = processor(images=[shapes.generate_sample(1, 0).image], return_tensors="pt")
    with torch.inference_mode():
        logits = model(pixel_values=inputs["pixel_values"]).logits
    assert logits.shape == (1, train.PRESETS["tiny"].num_queries, len(shapes.CLASSES))
    card = (export / "README.md").read_text()
    assert "training steps: 2 of 2" in card
    history = [
        json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()
    ]
    assert history[-1]["step"] == 2 and "mAP50" in history[-1]


def test_export_only_rewrites_the_folder_from_the_checkpoint(tmp_path):
    _run(tmp_path / "run", tmp_path / "model", "--steps", "2")
    weights = (tmp_path / "model" / "model.safetensors").read_bytes()
    for name in ("model.safetensors", "README.md"):
        (tmp_path / "model" / name).unlink()

    _run(tmp_path / "run", tmp_path / "model", "--export-only")

    assert (tmp_path / "model" / "model.safetensors").read_bytes() == weights
    card = (tmp_path / "model" / "README.md").read_text()
    assert "training steps: 2 of 2" in card
    # The card says where the time went, per machine the run has used.
    assert "h on CPU" in card and "1 thread(s), 0 data worker(s)" in card
    history = (tmp_path / "run" / "history.jsonl").read_text().splitlines()
    assert len(history) == 1, "exporting is not a checkpoint"


def test_export_only_without_a_checkpoint_is_an_error(tmp_path):
    with pytest.raises(SystemExit) as exc:
        _run(tmp_path / "empty", tmp_path / "model", "--export-only")
    assert exc.value.code == 2
    assert not (tmp_path / "model").exists()


def test_resumed_run_ends_where_an_uninterrupted_run_ends(tmp_path):
    _run(tmp_path / "a", tmp_path / "ma", "--steps", "3")
    # --max-minutes 0 stops after the first step's checkpoint, as if the run had been killed.
    _run(tmp_path / "b", tmp_path / "mb", "--steps", "3", "--max-minutes", "0")
    interrupted = torch.load(tmp_path / "b" / train.STATE_FILE, weights_only=False)
    assert interrupted["step"] == 1
    # The resumed half generates its images in a worker process: same images, same run.
    _run(tmp_path / "b", tmp_path / "mb", "--steps", "3", "--workers", "1")

    a = torch.load(tmp_path / "a" / train.STATE_FILE, weights_only=False)
    b = torch.load(tmp_path / "b" / train.STATE_FILE, weights_only=False)
    assert a["step"] == b["step"] == 3
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=1e-6, msg=key)
    for key in a["ema"]:
        torch.testing.assert_close(a["ema"][key], b["ema"][key], rtol=0, atol=1e-6, msg=key)


def test_resume_refuses_to_mix_recipes(tmp_path):
    _run(tmp_path / "r", tmp_path / "m", "--steps", "1")
    # A different learning rate on the command line must not leak into the resumed run.
    _run(tmp_path / "r", tmp_path / "m", "--steps", "2", "--lr", "0.5")
    state = torch.load(tmp_path / "r" / train.STATE_FILE, weights_only=False)
    assert state["step"] == 2
    assert state["preset"]["lr"] == train.PRESETS["tiny"].lr


def test_training_pixels_match_the_saved_image_processor(tmp_path):
    """Training feeds the model what serving's AutoImageProcessor will feed it."""
    from transformers import AutoImageProcessor

    preset = train.PRESETS["default"]
    train.build_processor(preset).save_pretrained(tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    for index in range(3):
        image = shapes.generate_sample(9, index).image
        served = processor(images=[image], return_tensors="pt")["pixel_values"][0]
        trained = train.to_pixels(image, preset.image_size)
        assert served.shape == trained.shape == (3, preset.image_size, preset.image_size)
        # Identical with Pillow's backend; torchvision's (when installed) resamples a hair apart.
        assert (served - trained).abs().mean() < 2 / 255
        assert (served - trained).abs().max() < 0.25


def test_targets_are_normalised_cxcywh():
    sample = shapes.generate_sample(3, 0)
    target = train.to_target(sample)
    boxes = target["boxes"]
    assert boxes.shape == (len(sample.labels), 4)
    assert ((boxes >= 0) & (boxes <= 1)).all()
    x1, y1, x2, y2 = (float(v) for v in sample.boxes[0])
    expected = [
        (x1 + x2) / 2 / sample.width,
        (y1 + y2) / 2 / sample.height,
        (x2 - x1) / sample.width,
        (y2 - y1) / sample.height,
    ]
    torch.testing.assert_close(boxes[0], torch.tensor(expected), rtol=0, atol=1e-6)
    assert target["class_labels"].tolist() == sample.labels.tolist()


def test_default_preset_exports_under_30_mb():
    model = train.RTDetrForObjectDetection(train.build_config(train.PRESETS["default"]))
    assert sum(p.numel() for p in model.parameters()) * 4 < 30e6


def test_learning_rate_warms_up_holds_then_decays():
    p = train.PRESETS["default"]
    assert train.lr_factor(0, p) < 0.01
    assert train.lr_factor(p.warmup_steps, p) == 1.0
    assert train.lr_factor(int(0.6 * p.steps), p) == 1.0
    assert train.lr_factor(p.steps, p) == pytest.approx(0.05)


def test_committed_default_model_finds_the_shapes():
    """The issue's bar: recall >= 0.9 at IoU 0.5 with the right class on held-out images.

    Counted over detections scoring >= 0.4. (On 200 held-out images the committed model finds
    0.92 of the objects at that cut with 0.73 precision, and 0.89 with 0.83 precision at the
    server's default of 0.5; its COCO figures are in models/rtdetr-shapes/README.md.)
    """
    from scripts.training.evaluate import detect_direct, recall_precision

    assert (DEFAULT_MODEL / "model.safetensors").exists(), "models/rtdetr-shapes/ is missing"
    card = (DEFAULT_MODEL / "README.md").read_text()
    done, total = map(int, re.search(r"training steps: (\d+) of (\d+)", card).groups())
    assert done == total, "the committed model is a snapshot of an unfinished run"
    samples = [shapes.generate_sample(shapes.HELDOUT_SEED, 10_000 + i) for i in range(32)]
    detections = detect_direct(
        DEFAULT_MODEL, samples, threshold=0.3, max_detections=100, batch_size=8
    )
    figures = recall_precision(samples, detections, score=0.4, iou=0.5)
    assert figures["recall@0.4"] >= 0.9, figures
    assert figures["precision@0.4"] >= 0.7, figures
