"""An Ultralytics RT-DETR checkpoint made without downloads, and Ultralytics' own answers on it.

The model is the package's own rtdetr-l.yaml with seeded random weights; its score and box heads
are perturbed (seeded) until the top scores of the test images are distinct (a fresh model
scores every query alike, and a top-k among ties is implementation-defined), then it is saved
the way Ultralytics saves (`model.save`). These tests run in `.venv-ultralytics`
(`make test-ultralytics`).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import shapes_image

# Before ultralytics is imported anywhere: no probe of the internet, settings in a temp folder.
os.environ["YOLO_OFFLINE"] = "true"

SEED = 17
# Small images (rtdetr-l is heavy on 2 CPU cores): one smaller than the input (upscaled), one
# larger and not square (downscaled, another aspect), one at the input size (not resized).
IMAGE_SIZES = [(320, 240), (800, 600), (640, 640)]
# The top scores of each image at least this far apart (two implementations differ by ~1e-6).
MIN_SCORE_GAP = 1e-4


@dataclass(frozen=True)
class Reference:
    """Ultralytics' `model.predict` on one image: xyxy boxes, scores, classes, best first."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray


def png(width: int, height: int, seed: int) -> bytes:
    """A lossless picture: Pillow and OpenCV decode it to the same pixels (a JPEG may not)."""
    image = Image.open(io.BytesIO(shapes_image(width, height, seed=seed))).convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def rgb(data: bytes) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(data)).convert("RGB"))


def predict(model, images: list[np.ndarray], conf: float = 0.25) -> list[Reference]:
    """Ultralytics' own predictor, one image at a time (BGR arrays, as cv2.imread gives)."""
    out = []
    for image in images:
        result = model.predict(image[..., ::-1].copy(), conf=conf, verbose=False, save=False)[0]
        boxes = result.boxes
        # Ultralytics' RT-DETR predictor leaves boxes unclipped; detr-serve clips every box to
        # its image (README): the reference is clipped the same way.
        height, width = image.shape[:2]
        xyxy = boxes.xyxy.cpu().numpy()
        np.clip(xyxy[:, 0::2], 0, width, out=xyxy[:, 0::2])
        np.clip(xyxy[:, 1::2], 0, height, out=xyxy[:, 1::2])
        out.append(
            Reference(
                boxes=xyxy,
                scores=boxes.conf.cpu().numpy(),
                classes=boxes.cls.cpu().numpy().astype(np.int64),
            )
        )
    return out


def _perturb(model, seed: int, images: list[np.ndarray]) -> None:
    """Make a random model see its images: BatchNorm statistics measured on them (with its
    initial running statistics, activations shrink ~1e-7 times through the backbone and every
    query ends up alike), then seeded noise on the score and box heads (encoder and decoder)."""
    import torch

    net = model.model
    head = net.model[-1]
    generator = torch.Generator().manual_seed(seed)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the calibration batches
    batch = torch.cat(
        [
            torch.nn.functional.interpolate(
                torch.from_numpy(im).permute(2, 0, 1)[None].float() / 255,
                size=(320, 320),
                mode="bilinear",
            )
            for im in images
        ]
    )
    net.train()
    with torch.no_grad():
        net.predict(batch)
    net.eval()
    with torch.no_grad():
        for linear in [head.enc_score_head, *head.dec_score_head]:
            linear.weight.normal_(0.0, 0.1, generator=generator)
            linear.bias.normal_(-6.5, 1.0, generator=generator)
        for mlp in [head.enc_bbox_head, *head.dec_bbox_head]:
            last = mlp.layers[-1]
            last.weight.normal_(0.0, 0.01, generator=generator)
            last.bias.normal_(0.0, 0.5, generator=generator)


def _distinct(references: list[Reference]) -> bool:
    for ref in references:
        top = np.sort(ref.scores)[::-1][:5]
        if len(top) == 0 or (len(top) > 1 and np.min(np.diff(-top)) < MIN_SCORE_GAP):
            return False
    return True


@dataclass(frozen=True)
class UltralyticsCase:
    checkpoint: Path
    images: list[bytes]  # PNG
    references: list[Reference]  # Ultralytics' predict on the saved checkpoint


@pytest.fixture(scope="session")
def ultralytics_case(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UltralyticsCase]:
    os.environ.setdefault("YOLO_CONFIG_DIR", str(tmp_path_factory.mktemp("yolo-config")))
    import torch
    from ultralytics import RTDETR

    folder = tmp_path_factory.mktemp("ultralytics")
    images = [png(w, h, seed=i) for i, (w, h) in enumerate(IMAGE_SIZES)]
    arrays = [rgb(data) for data in images]
    for attempt in range(5):
        torch.manual_seed(SEED + attempt)
        model = RTDETR("rtdetr-l.yaml")
        _perturb(model, SEED + attempt, arrays)
        path = folder / "rtdetr-l-random.pt"
        model.save(path)  # as Ultralytics saves: the model in float16 inside a dict
        saved = RTDETR(str(path))
        references = predict(saved, arrays)
        if _distinct(references):
            yield UltralyticsCase(path, images, references)
            return
    pytest.fail("no seed gave distinct top scores in 5 attempts")
