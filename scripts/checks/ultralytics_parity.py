"""Parity and CPU cost of an Ultralytics RT-DETR checkpoint served by detr-serve's engine against
Ultralytics' own `model.predict`, on the checkpoint and images tests/ultralytics makes (rtdetr-l,
seeded random weights, no download). Run in the environment `make test-ultralytics` builds:

    .venv-ultralytics/bin/python scripts/checks/ultralytics_parity.py

Prints, per image and overall: detections (both), the worst score and box differences of
matched detections (same class, nearest box), and CPU seconds per image (process time, all
threads) of Ultralytics' predict (one image at a time, as it runs) and of the engine (one batch).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("YOLO_OFFLINE", "true")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--msda-kernel", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("YOLO_CONFIG_DIR", tmp)
        from ultralytics import RTDETR

        from app.engine.pipeline import Engine
        from app.engine.tasks import DetectionTask, ImageDetections
        from tests.ultralytics.conftest import IMAGE_SIZES, make_case, predict, rgb

        case = make_case(Path(tmp))  # the checkpoint and images tests/ultralytics use
        arrays = [rgb(data) for data in case.images]
        path = case.checkpoint
        saved = RTDETR(str(path))
        predict(saved, arrays[:1])  # warm
        started = time.process_time()
        references = predict(saved, arrays)
        theirs = (time.process_time() - started) / len(arrays)
        engine = Engine.load(
            path, name="parity", device="cpu", backend="torch", msda_kernel=args.msda_kernel
        )
        tasks = [DetectionTask(a, 0.25, 300) for a in arrays]
        engine.run_batch(tasks[:1])  # warm
        started = time.process_time()
        results = engine.run_batch(tasks)
        ours = (time.process_time() - started) / len(arrays)
        worst_score = worst_box = 0.0
        for (w, h), got, want in zip(IMAGE_SIZES, results, references, strict=True):
            assert isinstance(got, ImageDetections)
            d_score = d_box = 0.0
            free = set(range(len(got.scores)))
            for score, label, box in zip(want.scores, want.classes, want.boxes, strict=True):
                same = [j for j in free if got.labels[j] == label]
                if not same:
                    d_score = d_box = float("inf")
                    break
                j = min(same, key=lambda j: float(np.abs(got.boxes[j] - box).max()))
                free.remove(j)
                d_score = max(d_score, abs(float(got.scores[j]) - float(score)))
                d_box = max(d_box, float(np.abs(got.boxes[j] - box).max()))
            print(
                f"{w}x{h}: detections {len(got.scores)} (Ultralytics {len(want.scores)}), "
                f"worst |score diff| {d_score:.2e}, worst box diff {d_box:.3f} px"
            )
            worst_score, worst_box = max(worst_score, d_score), max(worst_box, d_box)
        print(f"overall: scores within {worst_score:.2e}, boxes within {worst_box:.3f} px")
        print(
            f"CPU s per image: Ultralytics predict {theirs:.2f}, detr-serve engine (batch "
            f"{len(arrays)}, op {'on' if args.msda_kernel else 'off'}) {ours:.2f}, "
            f"ratio {ours / theirs:.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
