"""Export a checkpoint to ONNX by hand: MODEL_DIR -> MODEL_DIR/model.onnx (and model.int8.onnx).

    python scripts/export_onnx.py models/rtdetr-shapes
    python scripts/export_onnx.py models/rtdetr-shapes --int8          # + model.int8.onnx
    python scripts/export_onnx.py MODEL_DIR --cache-dir ~/.cache/detr-serve/onnx --int8
    python scripts/export_onnx.py MODEL_DIR --output /tmp/model.onnx --opset 20 --no-verify

The server does not need this: `--backend auto` (the default) and `--backend onnx` export into
their cache at start-up when no up-to-date export exists (app/export/). The files written here
carry the same key in their metadata, so the server serves them as they are: in the model folder
(the Docker image does this at build time) or, with --cache-dir, in the server's cache (the model
folder may be read-only). --int8 also writes a statically quantized copy (app/export/quantize.py:
convolutions and matrix products in INT8, deformable attention in float32), calibrated on
generated shapes images (scripts/training/synthetic_shapes.py); `--precision int8` serves it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from app.export.cache import (  # noqa: E402
    FILE_NAMES,
    META_EXPORT_KEY,
    cache_path,
    export_key,
    local_export,
    recorded_key,
)
from app.export.onnx_export import (  # noqa: E402, F401 (re-exported for scripts and tests)
    DEFAULT_OPSET,
    ExportSummary,
    export_onnx,
    input_size,
    symbolic_len,
)

# Calibration: images of the held-out-free calibration stream (neither training nor evaluation).
CALIBRATION_SEED = 7919
CALIBRATION_IMAGES = 32


def calibration_feeds(
    model_dir: Path, count: int = CALIBRATION_IMAGES, seed: int = CALIBRATION_SEED
) -> Iterator[dict[str, np.ndarray]]:
    """``{"pixel_values"}`` batches of one generated shapes image each, pre-processed exactly as
    the server does (app/engine/processing.py)."""
    import torch

    from app.engine.processing import Preprocessor, PreprocessSpec
    from scripts.training import synthetic_shapes as shapes

    spec = PreprocessSpec.for_model(model_dir)
    preprocess = Preprocessor(spec, torch.device("cpu"), torch.float32)
    for index in range(count):
        sample = shapes.generate_sample(seed, index)
        image = torch.from_numpy(np.array(sample.image)).permute(2, 0, 1)
        pixels, mask = preprocess([image])
        feed = {"pixel_values": pixels.numpy()}
        if mask is not None:
            feed["pixel_mask"] = mask.numpy()
        yield feed


def write_int8(model_dir: Path, float_path: Path, output: Path, count: int, opset: int) -> Path:
    from app.export.quantize import quantize_int8

    key = export_key(model_dir, "int8", opset)
    return quantize_int8(
        float_path,
        output,
        calibration_feeds(model_dir, count),
        metadata={META_EXPORT_KEY: key},
    )


def ensure_int8(model: Path) -> None:
    """The INT8 model of ``model`` where a server started now looks for it (the model folder or
    its cache: --onnx-cache-dir / DETR_SERVE_ONNX_CACHE_DIR), made into the cache if missing."""
    from app.config import Settings
    from app.engine.backend_choice import onnx_cache_dir
    from app.export.cache import find_export

    cache = onnx_cache_dir(Settings(model=model))
    if find_export(model.resolve(), cache, "int8") is None:
        print(f"no INT8 model of {model}: exporting and quantizing into {cache}", flush=True)
        main([str(model), "--cache-dir", str(cache), "--int8"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "model_dir",
        type=Path,
        help="Hugging Face checkpoint folder, or an Ultralytics RT-DETR checkpoint (.pt)",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--output", type=Path, default=None, help="default: MODEL_DIR/model.onnx (x.pt: x.onnx)"
    )
    where.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="write into this cache folder (the server's --onnx-cache-dir) instead",
    )
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    parser.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check")
    parser.add_argument(
        "--no-optimize",
        action="store_true",
        help="skip onnxscript's graph optimizer (faster export; onnxruntime optimizes anyway)",
    )
    parser.add_argument(
        "--force", action="store_true", help="export even when the output is up to date"
    )
    parser.add_argument(
        "--int8", action="store_true", help="also write the statically quantized INT8 model"
    )
    parser.add_argument(
        "--calibration-images",
        type=int,
        default=CALIBRATION_IMAGES,
        help="generated images the INT8 activation ranges are calibrated on",
    )
    args = parser.parse_args(argv)
    model_dir = args.model_dir.resolve()
    key = export_key(model_dir, "float32", args.opset)
    if args.cache_dir is not None:
        output = cache_path(args.cache_dir.expanduser(), model_dir, key, "float32")
    else:
        output = args.output or local_export(model_dir)
    if not args.force and output.is_file() and recorded_key(output) == key:
        print(f"{output} is up to date (export key {key[:16]}): kept (--force exports again)")
    else:
        summary = export_onnx(
            model_dir,
            output,
            opset=args.opset,
            verify=not args.no_verify,
            optimize=not args.no_optimize,
            metadata={META_EXPORT_KEY: key},
        )
        print("\n".join(summary.lines()))
    if args.int8:
        if args.cache_dir is not None:
            int8_key = export_key(model_dir, "int8", args.opset)
            int8_out = cache_path(args.cache_dir.expanduser(), model_dir, int8_key, "int8")
        else:
            int8_out = output.with_name(FILE_NAMES["int8"])
        write_int8(model_dir, output, int8_out, args.calibration_images, args.opset)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
