"""Where a CPU model's resize costs less: CPU time per 640x480 JPEG of the decode worker's job
(decode, or decode + Pillow's resize to the model's input) and of the engine's pre-processing
(full-size pixels resized in torch, or pixels already at the input size), process CPU time, the
best of five repeats, so that a busy machine changes the figures little.

    python scripts/bench/bench_resize_split.py [--model DIR] [--image JPEG] [--threads N]

With a model on the CPU detr-serve resizes in the decode worker (app/service.py): the sum of the
two lines of each path is what one image costs the machine's cores before the forward pass.
"""

from __future__ import annotations

import argparse
import pickle
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from app.config import DEFAULT_MODEL_NAME, REPO_MODELS_DIR  # noqa: E402


def cpu_ms(call: Callable[[], object], repeats: int) -> float:
    """Process CPU milliseconds per call, the best of five runs of `repeats` calls."""
    call()
    best = float("inf")
    for _ in range(5):
        started = time.process_time()
        for _ in range(repeats):
            call()
        best = min(best, (time.process_time() - started) / repeats)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO_MODELS_DIR / DEFAULT_MODEL_NAME)
    parser.add_argument("--image", type=Path, default=ROOT / "examples" / "shapes-640x480.jpg")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()

    import torch

    from app.engine.pipeline import DetectionTask, Engine
    from app.engine.preprocess_spec import PreprocessSpec
    from app.images.pool import _decode_in_worker

    torch.set_num_threads(args.threads)
    jpeg = args.image.read_bytes()
    spec = PreprocessSpec.from_dir(args.model)
    engine = Engine.load(args.model, name=args.model.name, device="cpu")
    full = _decode_in_worker(jpeg, 10**9, 0, None, spec.resample)
    assert not isinstance(full, tuple), full
    height, width = int(full.shape[0]), int(full.shape[1])
    target = spec.output_size(height, width)
    small = _decode_in_worker(jpeg, 10**9, 0, target, spec.resample)
    assert not isinstance(small, tuple), small

    def worker(resize: bool) -> float:
        """The decode and the result's pickling both ways (what crosses pebble's pipe)."""
        t = target if resize else None
        return cpu_ms(
            lambda: pickle.loads(pickle.dumps(_decode_in_worker(jpeg, 10**9, 0, t, spec.resample))),
            20,
        )

    def prepare(pixels: object, source: tuple[int, int] | None) -> float:
        tasks = [DetectionTask(pixels, 0.5, 100, source_size=source)] * args.batch
        return cpu_ms(lambda: engine.prepare(tasks), 3) / args.batch

    rows = [
        ("full size to the engine (GPU path, and CPU before)", worker(False), prepare(full, None)),
        ("resized in the decode worker (CPU path)", worker(True), prepare(small, (height, width))),
    ]
    print(
        f"{args.image.name} {width}x{height} -> model input {target[1]}x{target[0]}, "
        f"torch threads {args.threads}, batch {args.batch}; CPU ms per image:"
    )
    for name, decode, prep in rows:
        print(
            f"  {name:52s} decode worker {decode:6.2f}  engine prepare {prep:6.2f}  "
            f"sum {decode + prep:6.2f}"
        )


if __name__ == "__main__":
    main()
