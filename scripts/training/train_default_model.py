"""Train detr-serve's default model: a small RT-DETR, from scratch, on synthetic shapes.

Training images are generated on the fly from (seed, index), so nothing is read from disk and
a run is reproducible from its seed. The run resumes from `--run-dir` (optimizer, EMA, RNG
state) and refreshes the Hugging Face folder `--export-dir` at every checkpoint, so a partly
trained model is always servable.

    python scripts/training/train_default_model.py                    # start or resume the real run
    python scripts/training/train_default_model.py --export-only     # re-export the last checkpoint
    python scripts/training/train_default_model.py --preset tiny --steps 3 \\
        --run-dir /tmp/r --export-dir /tmp/m
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm
from transformers import (
    RTDetrConfig,
    RTDetrForObjectDetection,
    RTDetrImageProcessor,
    RTDetrResNetConfig,
)

if __package__ in (None, ""):  # run as a file: make `scripts` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scripts.training import synthetic_shapes as shapes  # noqa: E402
from scripts.training.evaluate import coco_map, predictions_from_outputs  # noqa: E402

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
STATE_FILE = "state.pt"


@dataclass(frozen=True)
class Preset:
    """Everything that shapes the model and the run; saved with each checkpoint."""

    image_size: int
    backbone_hidden_sizes: tuple[int, ...]
    backbone_depths: tuple[int, ...]
    backbone_embedding_size: int
    d_model: int
    hidden_expansion: float
    ffn_dim: int
    heads: int
    decoder_layers: int
    num_queries: int
    num_denoising: int
    batch_size: int
    steps: int
    lr: float
    warmup_steps: int
    checkpoint_minutes: float
    val_images: int


PRESETS: dict[str, Preset] = {
    "default": Preset(
        image_size=256,
        backbone_hidden_sizes=(32, 64, 128, 256),
        backbone_depths=(1, 1, 1, 1),
        backbone_embedding_size=32,
        d_model=128,
        hidden_expansion=0.5,
        ffn_dim=512,
        heads=8,
        decoder_layers=3,
        num_queries=100,
        num_denoising=60,
        batch_size=16,
        # 5,800 steps (93k images) reach the bar: about 3.4 h on 2 CPU cores at 2.1 s/step.
        steps=5_800,
        lr=3e-4,
        warmup_steps=500,
        checkpoint_minutes=5.0,
        val_images=50,
    ),
    # For tests: a model of a few thousand parameters on 64 px images.
    "tiny": Preset(
        image_size=64,
        backbone_hidden_sizes=(8, 16, 16, 16),
        backbone_depths=(1, 1, 1, 1),
        backbone_embedding_size=8,
        d_model=16,
        hidden_expansion=0.5,
        ffn_dim=32,
        heads=2,
        decoder_layers=1,
        num_queries=20,
        num_denoising=10,
        batch_size=2,
        steps=4,
        lr=1e-4,
        warmup_steps=2,
        checkpoint_minutes=5.0,
        val_images=2,
    ),
}


def build_config(p: Preset) -> RTDetrConfig:
    backbone = RTDetrResNetConfig(
        layer_type="basic",
        embedding_size=p.backbone_embedding_size,
        hidden_sizes=list(p.backbone_hidden_sizes),
        depths=list(p.backbone_depths),
        out_features=["stage2", "stage3", "stage4"],
    )
    return RTDetrConfig(
        backbone_config=backbone,
        # Trained from scratch: batch norm must learn its statistics, not be frozen.
        freeze_backbone_batch_norms=False,
        encoder_in_channels=list(p.backbone_hidden_sizes[1:]),
        encoder_hidden_dim=p.d_model,
        encoder_ffn_dim=p.ffn_dim,
        hidden_expansion=p.hidden_expansion,
        encoder_attention_heads=p.heads,
        d_model=p.d_model,
        decoder_in_channels=[p.d_model] * 3,
        decoder_ffn_dim=p.ffn_dim,
        decoder_attention_heads=p.heads,
        decoder_layers=p.decoder_layers,
        num_queries=p.num_queries,
        num_denoising=p.num_denoising,
        id2label=dict(enumerate(shapes.CLASSES)),
        label2id={name: i for i, name in enumerate(shapes.CLASSES)},
    )


def build_processor(p: Preset) -> RTDetrImageProcessor:
    # Plain squash to a square and scale to 0..1; the processor's own resize is what serving does.
    return RTDetrImageProcessor(
        size={"height": p.image_size, "width": p.image_size}, do_normalize=False, do_pad=False
    )


def to_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """Same numbers as RTDetrImageProcessor(size=size x size, do_normalize=False), faster."""
    resized = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)


def to_target(sample: shapes.Sample) -> dict[str, torch.Tensor]:
    """RT-DETR's loss wants class ids and normalised (cx, cy, w, h) boxes."""
    b = torch.from_numpy(sample.boxes)
    scale = torch.tensor([sample.width, sample.height] * 2, dtype=torch.float32)
    b = b / scale
    cxcywh = torch.stack(
        [(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1
    )
    return {"class_labels": torch.from_numpy(sample.labels), "boxes": cxcywh}


class ShapesStream(Dataset):
    """Item i is training image (seed, i): an endless, reproducible stream."""

    def __init__(self, seed: int, image_size: int) -> None:
        self.seed, self.image_size = seed, image_size

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        sample = shapes.generate_sample(self.seed, index)
        return to_pixels(sample.image, self.image_size), to_target(sample)


def collate(items: list) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    return torch.stack([x for x, _ in items]), [t for _, t in items]


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def lr_factor(step: int, p: Preset) -> float:
    """Linear warm-up, flat, then cosine down to 5% over the last 30% of the run."""
    if step < p.warmup_steps:
        return (step + 1) / p.warmup_steps
    decay_from = int(0.7 * p.steps)
    if step < decay_from:
        return 1.0
    t = min(1.0, (step - decay_from) / max(1, p.steps - decay_from))
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t))


class Ema:
    """Exponential moving average of weights and buffers (as RT-DETR trains), with warm-up."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.9995, warmup: int = 1000) -> None:
        self.decay, self.warmup, self.updates = decay, warmup, 0
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.warmup))
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.state[k].lerp_(v.detach(), 1 - d)
            else:
                self.state[k].copy_(v)


def atomic_write(path: Path, write) -> None:
    """Write through a temp file in the same folder and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def hardware() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu}, {torch.get_num_threads()} thread(s)"


def describe_hardware(seconds_by_hardware: dict[str, float]) -> str:
    """'1.20 h on A, 2.00 h on B': a resumed run may have moved between machines."""
    parts = sorted(seconds_by_hardware.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{s / 3600:.2f} h on {hw}" for hw, s in parts if s > 0) or "none yet"


def model_card(preset_name: str, p: Preset, config: RTDetrConfig, meta: dict) -> str:
    params = meta["params"]
    images_seen = meta["step"] * p.batch_size
    metrics = meta.get("metrics") or {}
    metric_lines = (
        "\n".join(f"| {k} | {v:.4f} |" for k, v in metrics.items())
        if metrics
        else "| (none yet) | |"
    )
    command = f"--preset {preset_name} --seed {meta['seed']} --steps {p.steps}"
    return f"""---
library_name: transformers
pipeline_tag: object-detection
tags: [rt-detr, synthetic, detr-serve]
---

# rtdetr-shapes

detr-serve's embedded default model: a small RT-DETR (transformers `RTDetrForObjectDetection`)
trained from scratch to find five shape classes ({", ".join(shapes.CLASSES)}) in synthetic
images. It exists so the service has something real to serve and test against, not for
natural images.

## Status

- training steps: {meta["step"]} of {p.steps} (batch {p.batch_size}, {images_seen} images seen)
- training wall time: {meta["train_seconds"] / 3600:.2f} h
  ({describe_hardware(meta["hardware_seconds"])})
- updated: {meta["updated"]}
- weights: exponential moving average (decay {meta["ema_decay"]})

## Data

`scripts/training/synthetic_shapes.py`, generated on the fly: image i of the run is
`generate_sample({meta["seed"]}, i)`. Images {shapes.MIN_SIDE}-{shapes.MAX_SIDE} px per side,
aspect ratio up to {shapes.MAX_ASPECT:g}:1,
{shapes.MIN_OBJECTS}-{shapes.MAX_OBJECTS} shapes each, random colours and rotations, overlaps
(each shape keeps >= {shapes.MIN_VISIBLE_FRACTION:.0%} of its pixels visible; boxes are tight
around the visible pixels, as in COCO), flat / gradient / cloudy / striped / checkered
backgrounds, clutter
(lines, scribbles, dots, rings, arcs, blobs), noise, blur and JPEG quality 30-95.
Shape diameters are log-uniform from max({shapes.MIN_OBJECT_PX} px,
{shapes.MIN_OBJECT_FRACTION:.0%} of the long side) to {shapes.MAX_OBJECT_FRACTION:.0%} of the short
side: the lower bound keeps the smallest shape at >= ~13 px once the image is squashed to
{p.image_size}x{p.image_size}.

## Model

- {params / 1e6:.2f} M parameters; input {p.image_size}x{p.image_size} (plain resize, no aspect
  preservation), pixels scaled to 0..1, no mean/std normalisation
- backbone RT-DETR ResNet, basic blocks, widths {list(p.backbone_hidden_sizes)}, depths
  {list(p.backbone_depths)}; hybrid encoder dim {config.encoder_hidden_dim}
- decoder: {config.decoder_layers} layers, d_model {config.d_model},
  {config.decoder_attention_heads} heads, {config.num_queries} queries,
  {config.num_denoising} denoising queries
- loss: RT-DETR's own (varifocal + L1 + GIoU, Hungarian matching, auxiliary and denoising terms)
- optimiser: AdamW lr {p.lr:g}, weight decay 1e-4, {p.warmup_steps} warm-up steps, cosine
  decay over the last 30% of steps, gradient clip 0.1; preset `{preset_name}`, seed {meta["seed"]}

## Metrics

Quick check at the last checkpoint, COCO mAP (pycocotools) on {p.val_images} images of the
validation stream (seed {shapes.VALIDATION_SEED}, never trained on), threshold 0.01, 100 detections:

| metric | value |
| --- | --- |
{metric_lines}

The figures that count come from `scripts/training/evaluate.py --card` on 500 held-out images (seed
{shapes.HELDOUT_SEED}) sent through the HTTP API: its section below. Each export drops that
section, since new weights need a new evaluation.

## Reproduce

```
python scripts/training/train_default_model.py {command}
```

Add `--device cuda` on a GPU. The run resumes from `runs/rtdetr-shapes/` when interrupted;
data, model initialisation, learning-rate schedule and the order of batches depend only on the
seed and the preset, so a rerun gives the same model up to floating-point summation order
(which differs with the number of threads and the device).
"""


def export(
    model: RTDetrForObjectDetection,
    ema: Ema,
    processor: RTDetrImageProcessor,
    export_dir: Path,
    card: str,
) -> None:
    """Refresh the servable folder file by file, each file replaced atomically."""
    export_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=export_dir.parent, prefix=f".{export_dir.name}.") as tmp:
        staging = Path(tmp)
        live = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(ema.state)
        try:
            model.save_pretrained(staging)
        finally:
            model.load_state_dict(live)
        processor.save_pretrained(staging)
        (staging / "README.md").write_text(card)
        for name in ("model.safetensors", "config.json", "preprocessor_config.json", "README.md"):
            os.chmod(staging / name, 0o644)
            os.replace(staging / name, export_dir / name)


@torch.no_grad()
def quick_eval(
    model: RTDetrForObjectDetection, ema: Ema, p: Preset, device: torch.device
) -> dict[str, float]:
    coco_gt, samples = shapes.coco_dataset(shapes.VALIDATION_SEED, p.val_images)
    live = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(ema.state)
    model.eval()
    processor, config = build_processor(p), model.config
    detections = []
    try:
        for start in range(0, len(samples), 8):
            chunk = samples[start : start + 8]
            pixels = torch.stack([to_pixels(s.image, p.image_size) for s in chunk]).to(device)
            outputs = model(pixel_values=pixels)
            sizes = [(s.height, s.width) for s in chunk]
            detections += predictions_from_outputs(processor, outputs, sizes, config.id2label)
    finally:
        model.load_state_dict(live)
        model.train()
    return coco_map(coco_gt, detections)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument(
        "--seed", type=int, default=shapes.TRAIN_SEED, help="data and initialisation seed"
    )
    parser.add_argument("--steps", type=int, help="total optimiser steps (default: the preset's)")
    parser.add_argument("--batch-size", type=int, help="default: the preset's")
    parser.add_argument("--lr", type=float, help="default: the preset's")
    parser.add_argument("--checkpoint-minutes", type=float, help="minutes between checkpoints")
    parser.add_argument(
        "--val-images", type=int, help="validation images scored at each checkpoint"
    )
    parser.add_argument(
        "--max-minutes", type=float, help="stop (after a checkpoint) once this long has passed"
    )
    parser.add_argument("--run-dir", type=Path, default=REPO / "runs" / "rtdetr-shapes")
    parser.add_argument("--export-dir", type=Path, default=REPO / "models" / "rtdetr-shapes")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads (default: all)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="DataLoader worker processes generating images beside the training (0: inline)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--fresh", action="store_true", help="ignore an existing checkpoint in --run-dir"
    )
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar (logs instead)")
    parser.add_argument(
        "--export-only",
        action="store_true",
        help="write --export-dir from the checkpoint in --run-dir (weights and card), no training",
    )
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    overrides = {
        k: v
        for k, v in {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "checkpoint_minutes": args.checkpoint_minutes,
            "val_images": args.val_images,
        }.items()
        if v is not None
    }
    p = dataclasses.replace(PRESETS[args.preset], **overrides)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )

    state_path = args.run_dir / STATE_FILE
    state = None
    if state_path.exists() and not args.fresh:
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        saved = Preset(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in state["preset"].items()}
        )
        if args.steps is not None:  # the one setting a resumed run may change: how long it goes on
            saved = dataclasses.replace(saved, steps=args.steps)
        if saved != p or state["seed"] != args.seed:
            # Keep the saved recipe rather than silently mixing two runs.
            logger.warning(
                "resuming with the checkpoint's settings and seed, not the command line's"
            )
        p, args.seed = saved, state["seed"]
        args.preset = state.get("preset_name", args.preset)

    torch.manual_seed(args.seed)
    config = build_config(p)
    model = RTDetrForObjectDetection(config).to(device)
    processor = build_processor(p)
    # No weight decay on norms and biases, as in RT-DETR's recipe.
    decay = [t for n, t in model.named_parameters() if t.ndim > 1]
    no_decay = [t for n, t in model.named_parameters() if t.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 1e-4}, {"params": no_decay, "weight_decay": 0.0}],
        lr=p.lr,
    )
    ema = Ema(model)
    step, train_seconds, metrics = 0, 0.0, {}
    hardware_seconds: dict[str, float] = {}
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        ema.state = state["ema"]
        ema.updates = state["ema_updates"]
        step, train_seconds, metrics = (
            state["step"],
            state["train_seconds"],
            state.get("metrics", {}),
        )
        hardware_seconds = dict(
            state.get("hardware_seconds") or {"hardware not recorded": train_seconds}
        )
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        logger.info("resumed from %s at step %d", state_path, step)
    params = sum(t.numel() for t in model.parameters())
    logger.info(
        "model: %.2f M parameters, %dx%d input, device %s",
        params / 1e6,
        p.image_size,
        p.image_size,
        device,
    )

    def meta() -> dict:
        return {
            "step": step,
            "seed": args.seed,
            "params": params,
            "train_seconds": train_seconds,
            "hardware_seconds": hardware_seconds,
            "metrics": metrics,
            "ema_decay": ema.decay,
            "updated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }

    def checkpoint() -> None:
        nonlocal metrics
        if p.val_images > 0:
            metrics = quick_eval(model, ema, p, device)
            logger.info(
                "step %d: %s", step, json.dumps({k: round(v, 4) for k, v in metrics.items()})
            )
        blob = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "ema": ema.state,
            "ema_updates": ema.updates,
            "step": step,
            "train_seconds": train_seconds,
            "hardware_seconds": hardware_seconds,
            "metrics": metrics,
            "seed": args.seed,
            "preset": dataclasses.asdict(p),
            "preset_name": args.preset,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
        }
        atomic_write(state_path, lambda tmp: torch.save(blob, tmp))
        export(model, ema, processor, args.export_dir, model_card(args.preset, p, config, meta()))
        with (args.run_dir / "history.jsonl").open("a") as history:
            history.write(
                json.dumps({"step": step, "train_seconds": round(train_seconds, 1), **metrics})
                + "\n"
            )
        logger.info("checkpoint at step %d -> %s, %s", step, state_path, args.export_dir)

    if args.export_only:
        if state is None:
            parser.error(f"--export-only: no checkpoint at {state_path}")
        export(model, ema, processor, args.export_dir, model_card(args.preset, p, config, meta()))
        logger.info("exported step %d -> %s", step, args.export_dir)
        return 0
    if step >= p.steps:
        logger.info("already trained for %d steps", step)
        if not args.export_dir.joinpath("model.safetensors").exists():
            checkpoint()
        return 0

    # Step k always sees images k*B .. k*B+B-1, so a resumed run sees the same batches.
    loader = DataLoader(
        ShapesStream(args.seed, p.image_size),
        batch_size=p.batch_size,
        sampler=range(step * p.batch_size, p.steps * p.batch_size),
        num_workers=args.workers,
        collate_fn=collate,
        worker_init_fn=_worker_init,
        # Its own generator: starting an iterator would otherwise draw from the global RNG and
        # make a resumed run diverge from an uninterrupted one.
        generator=torch.Generator().manual_seed(args.seed),
    )
    model.train()
    started = time.monotonic()
    last_checkpoint = started
    bar = tqdm(
        total=p.steps,
        initial=step,
        desc="train",
        unit="step",
        disable=args.no_progress,
        # A log file wants a line a minute, not a stream of carriage returns.
        mininterval=1 if sys.stderr.isatty() else 60,
    )
    loss_avg = None
    this_hardware = f"{hardware()}, {args.workers} data worker(s)"
    tick = window = time.monotonic()
    for pixels, targets in loader:
        for group in optimizer.param_groups:
            group["lr"] = p.lr * lr_factor(step, p)
        pixels = pixels.to(device, non_blocking=True)
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        loss = model(pixel_values=pixels, labels=targets).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        ema.update(model)
        step += 1
        now = time.monotonic()
        train_seconds += now - tick
        hardware_seconds[this_hardware] = hardware_seconds.get(this_hardware, 0.0) + now - tick
        tick = now
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_avg:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        if args.no_progress and step % 50 == 0:
            logger.info(
                "step %d/%d loss %.3f lr %.2e, %.2f s/step",
                step,
                p.steps,
                loss_avg,
                optimizer.param_groups[0]["lr"],
                (now - window) / 50,
            )
            window = now
        done = step >= p.steps
        out_of_time = args.max_minutes is not None and now - started >= args.max_minutes * 60
        if done or out_of_time or now - last_checkpoint >= p.checkpoint_minutes * 60:
            checkpoint()
            last_checkpoint = tick = time.monotonic()  # evaluation is not training time
        if done or out_of_time:
            break
    bar.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
