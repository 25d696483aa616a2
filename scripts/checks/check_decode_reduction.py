"""How much decode-time reduction moves detections: the examples/ pictures scaled up to camera
sizes, detected once from the full-size decode (what the server did before) and once from the
reduced decode (JPEG draft + Pillow resize to the model's input); boxes in original pixels.

    python scripts/checks/check_decode_reduction.py [--model models/rtdetr-shapes]
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image

from app.engine.pipeline import DetectionTask, Engine
from app.images.decode import Fit, decode_image

ROOT = Path(__file__).resolve().parents[2]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "rtdetr-shapes")
    parser.add_argument("--threshold", type=float, default=0.5)
    args = parser.parse_args()
    engine = Engine.load(args.model, name="check", device="cpu")
    spec = engine.preprocessor.spec
    fit = Fit(spec.output_size, spec.resample)
    print(
        "image | format | size | dets full / reduced | matched | worst IoU | max |dbox| px "
        "(% of width) | max |dscore|"
    )
    for path in sorted((ROOT / "examples").glob("*.jpg")):
        base = Image.open(path).convert("RGB")
        for factor in (4, 8):
            size = (base.width * factor, base.height * factor)
            big = base.resize(size, Image.Resampling.BICUBIC)
            for fmt, options in (("JPEG", {"quality": 92}), ("PNG", {})):
                buf = io.BytesIO()
                big.save(buf, format=fmt, **options)
                data = buf.getvalue()
                full = decode_image(data, max_pixels=10**9, index=0)
                small = decode_image(data, max_pixels=10**9, index=0, fit=fit)
                old, new = engine.run_batch(
                    [
                        DetectionTask(full.pixels, args.threshold, 100),
                        DetectionTask(
                            small.pixels, args.threshold, 100, source_size=small.source_size
                        ),
                    ]
                )
                matched, worst, dbox, dscore = 0, 1.0, 0.0, 0.0
                for box, score, label in zip(old.boxes, old.scores, old.labels, strict=True):
                    same = [j for j in range(len(new.boxes)) if new.labels[j] == label]
                    if not same:
                        continue
                    j = max(same, key=lambda k: iou(box, new.boxes[k]))
                    matched += 1
                    worst = min(worst, iou(box, new.boxes[j]))
                    dbox = max(dbox, float(np.abs(box - new.boxes[j]).max()))
                    dscore = max(dscore, abs(float(score - new.scores[j])))
                print(
                    f"{path.name} | {fmt} | {size[0]}x{size[1]} | {len(old.boxes)} / "
                    f"{len(new.boxes)} | {matched} | {worst:.4f} | {dbox:.2f} "
                    f"({100 * dbox / size[0]:.3f} %) | {dscore:.4f}"
                )


if __name__ == "__main__":
    main()
