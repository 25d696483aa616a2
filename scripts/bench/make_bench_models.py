"""RT-DETR-R18- and R50-sized checkpoints with random weights, for benchmarks.

    python scripts/bench/make_bench_models.py OUT_DIR [--presets r18,r50] [--size 640]

Each goes to OUT_DIR/rtdetr-<preset> through save_pretrained (model and image processor), in
the Hugging Face layout the server loads. The architectures follow the published rtdetr_r18vd
and rtdetr_r50vd configurations (ResNet-vd backbone, hybrid encoder, 300 queries, 80 classes);
random weights time the same as trained ones.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # ResNet-18-vd: basic blocks [2, 2, 2, 2]; 3 decoder layers; encoder expansion 0.5.
    "r18": {
        "backbone": {
            "layer_type": "basic",
            "depths": [2, 2, 2, 2],
            "hidden_sizes": [64, 128, 256, 512],
        },
        "encoder_in_channels": [128, 256, 512],
        "decoder_layers": 3,
        "hidden_expansion": 0.5,
    },
    # ResNet-50-vd: bottleneck blocks [3, 4, 6, 3]; 6 decoder layers; encoder expansion 1.0.
    "r50": {
        "backbone": {
            "layer_type": "bottleneck",
            "depths": [3, 4, 6, 3],
            "hidden_sizes": [256, 512, 1024, 2048],
        },
        "encoder_in_channels": [512, 1024, 2048],
        "decoder_layers": 6,
        "hidden_expansion": 1.0,
    },
}


def build(out_dir: Path, preset: str, size: int = 640, seed: int = 0) -> Path:
    """Write OUT_DIR/rtdetr-<preset> (skipped when it is already there); returns its path."""
    import torch
    from transformers import (
        RTDetrConfig,
        RTDetrForObjectDetection,
        RTDetrImageProcessor,
        RTDetrResNetConfig,
    )

    path = Path(out_dir) / f"rtdetr-{preset}"
    if (path / "config.json").is_file() and (path / "preprocessor_config.json").is_file():
        return path
    spec = PRESETS[preset]
    torch.manual_seed(seed)
    backbone = RTDetrResNetConfig(
        embedding_size=64, out_features=["stage2", "stage3", "stage4"], **spec["backbone"]
    )
    labels = {i: f"class_{i}" for i in range(80)}
    config = RTDetrConfig(
        backbone_config=backbone,
        encoder_in_channels=spec["encoder_in_channels"],
        decoder_layers=spec["decoder_layers"],
        hidden_expansion=spec["hidden_expansion"],
        num_queries=300,
        num_labels=len(labels),
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
    )
    model = RTDetrForObjectDetection(config).eval()
    model.save_pretrained(path)
    RTDetrImageProcessor(size={"height": size, "width": size}).save_pretrained(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--presets", default="r18,r50")
    parser.add_argument("--size", type=int, default=640)
    args = parser.parse_args()
    for preset in args.presets.split(","):
        path = build(args.out_dir, preset.strip(), args.size)
        print(path, flush=True)


if __name__ == "__main__":
    main()
