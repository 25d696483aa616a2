"""What bench.py and the runs it dispatches to (bench_compare.py, bench_cuda.py) share, in a
module of its own so that none of them imports another: bench.py runs as `__main__`, and a
module importing `scripts.bench.bench` would run a second copy of it."""

from __future__ import annotations

import io
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# The policy whoever runs the benchmark set, read before bench.py sets PASSIVE for the peers (it
# imports this module first): detr-serve runs without PASSIVE unless the user chose a policy.
USER_OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")


def sample_jpeg(path: Path | None) -> bytes:
    if path is not None:
        return path.read_bytes()
    default = ROOT / "examples" / "shapes-640x480.jpg"
    if default.exists():
        return default.read_bytes()
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (640, 480), (90, 120, 150))
    draw = ImageDraw.Draw(img)
    draw.ellipse([100, 100, 260, 260], fill=(230, 40, 40))
    draw.rectangle([360, 200, 560, 400], fill=(40, 200, 60))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def batch_sizes(max_batch: int) -> list[int]:
    """1, 2, 4 ... below max_batch, then max_batch."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return [*sizes, max_batch]
