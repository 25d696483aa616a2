"""COCO mAP of a detector on held-out synthetic shapes, directly and through detr-serve's HTTP API.

Direct mode runs the exported folder with transformers; HTTP mode posts the same JPEG bytes to
a running server. With both, the difference shows what serving changes (it should be ~0).

    python scripts/training/evaluate.py --model models/rtdetr-shapes --count 500
    python scripts/training/evaluate.py --url http://127.0.0.1:8000 --count 500
    python scripts/training/evaluate.py --tiling --url http://127.0.0.1:8000 --count 20

--tiling (issue 14) evaluates on high-resolution scenes (3840x2160, 4000x3000, objects of
16-64 px) through HTTP, tiling off then on: mAP@0.5, recall, images/s both ways, and the tiles/s
of the tiled run against the raw forward pass of the same model, on the backend the server runs
(/v1/models: onnxruntime under --backend auto on the CPU), at the server's batch size and threads.

    python scripts/training/evaluate.py --compare-int8 --count 500  # float32 and INT8 servers, HTTP

--compare-int8 starts detr-serve twice on --model with the onnx backend, --precision float then
int8 (making model.int8.onnx into the server's cache first if there is none: scripts/export_onnx.py
--int8), evaluates both through HTTP and prints them side by side with the INT8 gate: INT8 ships
only while its mAP@0.5 is within 0.01 of float32's (tests/api/test_int8.py enforces it).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a file: make `scripts` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scripts.training import synthetic_shapes as shapes  # noqa: E402

REPO = Path(__file__).resolve().parents[2]

# One detection as the API returns it: {"label", "class_id", "score", "box": [x1, y1, x2, y2]}.
Detection = dict
METRIC_NAMES = (
    "mAP",
    "mAP50",
    "mAP75",
    "mAP_small",
    "mAP_medium",
    "mAP_large",
    "AR1",
    "AR10",
    "AR100",
    "AR_small",
    "AR_medium",
    "AR_large",
)


def predictions_from_outputs(
    processor,
    outputs,
    sizes: Sequence[tuple[int, int]],
    id2label: dict[int, str],
    threshold: float = 0.01,
    max_detections: int = 100,
) -> list[list[Detection]]:
    """Model outputs -> per-image detections in original pixels (sizes are (height, width))."""
    results = processor.post_process_object_detection(
        outputs, threshold=threshold, target_sizes=list(sizes)
    )
    per_image = []
    for result, (h, w) in zip(results, sizes, strict=True):
        order = result["scores"].argsort(descending=True)[:max_detections]
        detections = []
        for i in order.tolist():
            box = result["boxes"][i].tolist()
            box = [min(max(v, 0.0), limit) for v, limit in zip(box, (w, h, w, h), strict=True)]
            class_id = int(result["labels"][i])
            detections.append(
                {
                    "label": id2label.get(class_id, str(class_id)),
                    "class_id": class_id,
                    "score": float(result["scores"][i]),
                    "box": box,
                }
            )
        per_image.append(detections)
    return per_image


def coco_map(coco_gt: dict, detections: Sequence[Sequence[Detection]]) -> dict[str, float]:
    """pycocotools bbox mAP; detections[i] is for coco_gt["images"][i], matched by label name."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    category_of = {c["name"]: c["id"] for c in coco_gt["categories"]}
    results = []
    for info, dets in zip(coco_gt["images"], detections, strict=True):
        for d in dets:
            if d["label"] not in category_of:
                continue
            x1, y1, x2, y2 = d["box"]
            results.append(
                {
                    "image_id": info["id"],
                    "category_id": category_of[d["label"]],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": d["score"],
                }
            )
    if not results:
        return dict.fromkeys(METRIC_NAMES, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints as it goes
        gt = COCO()
        gt.dataset = json.loads(json.dumps(coco_gt))
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(max(v, 0.0)) for name, v in zip(METRIC_NAMES, evaluator.stats, strict=True)}


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes, (N, 4) x (M, 4) -> (N, M)."""
    from pycocotools import mask as mask_utils

    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    to_xywh = np.array([[1, 0, -1, 0], [0, 1, 0, -1], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=np.float64)
    return mask_utils.iou((a @ to_xywh).tolist(), (b @ to_xywh).tolist(), [0] * len(b))


def recall_precision(
    samples: Sequence[shapes.Sample],
    detections: Sequence[Sequence[Detection]],
    score: float = 0.5,
    iou: float = 0.5,
) -> dict[str, float]:
    """Share of objects found (right class, IoU >= iou) and of detections that are right.

    Only detections scoring >= `score` count. Greedy matching, best score first, one detection
    per object: COCO's rule at one threshold.
    """
    found = total = correct = kept = 0
    for sample, dets in zip(samples, detections, strict=True):
        dets = sorted((d for d in dets if d["score"] >= score), key=lambda d: -d["score"])
        kept += len(dets)
        total += len(sample.labels)
        ious = _iou(
            np.array([d["box"] for d in dets], dtype=np.float64).reshape(-1, 4),
            sample.boxes.astype(np.float64),
        )
        taken = np.zeros(len(sample.labels), dtype=bool)
        for i, d in enumerate(dets):
            candidates = np.where(~taken & (sample.labels == d["class_id"]) & (ious[i] >= iou))[0]
            if len(candidates):
                taken[candidates[np.argmax(ious[i][candidates])]] = True
                correct += 1
        found += int(taken.sum())
    return {
        f"recall@{score:g}": found / total if total else 1.0,
        # Nothing claimed: vacuously precise only if there was nothing to find.
        f"precision@{score:g}": correct / kept if kept else float(total == 0),
    }


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def detect_direct(
    model_dir: Path,
    samples: Sequence[shapes.Sample],
    threshold: float,
    max_detections: int,
    batch_size: int,
) -> list[list[Detection]]:
    """Run the exported folder the way any transformers user would."""
    import torch
    from transformers import AutoImageProcessor, AutoModelForObjectDetection

    processor = AutoImageProcessor.from_pretrained(model_dir)
    model = AutoModelForObjectDetection.from_pretrained(model_dir).eval()
    out: list[list[Detection]] = []
    with torch.inference_mode():
        for chunk in _batches(samples, batch_size):
            inputs = processor(images=[s.image for s in chunk], return_tensors="pt")
            outputs = model(pixel_values=inputs["pixel_values"])
            sizes = [(s.height, s.width) for s in chunk]
            out += predictions_from_outputs(
                processor, outputs, sizes, model.config.id2label, threshold, max_detections
            )
    return out


def detect_http(
    url: str,
    samples: Sequence[shapes.Sample],
    threshold: float,
    max_detections: int,
    batch_size: int,
    transport: str = "multipart",
    timeout: float = 120.0,
    tiling: object = None,
    concurrency: int = 1,
    tiles: list[int] | None = None,
) -> tuple[str, list[list[Detection]]]:
    """POST the JPEG bytes to /v1/detect; return the model's name and per-image detections.
    `tiling`: the request's tiling option; `concurrency` requests in flight; `tiles` receives
    each image's tile count (timings.tiles)."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    endpoint = url.rstrip("/") + "/v1/detect"
    name = ""

    def post(client: httpx.Client, chunk: Sequence[shapes.Sample]) -> dict:
        if transport == "multipart":
            data = {"threshold": str(threshold), "max_detections": str(max_detections)}
            if tiling is not None:
                data["tiling"] = json.dumps(tiling)
            response = client.post(
                endpoint,
                files=[("file", (f"{i}.jpg", s.jpeg, "image/jpeg")) for i, s in enumerate(chunk)],
                data=data,
            )
        else:
            body: dict = {
                "images": [{"data": base64.b64encode(s.jpeg).decode()} for s in chunk],
                "threshold": threshold,
                "max_detections": max_detections,
            }
            if tiling is not None:
                body["tiling"] = tiling
            response = client.post(endpoint, json=body)
        if response.status_code != 200:
            raise RuntimeError(f"{endpoint} answered {response.status_code}: {response.text[:500]}")
        return response.json()

    out: list[list[Detection]] = []
    with httpx.Client(timeout=timeout) as client, ThreadPoolExecutor(concurrency) as pool:
        chunks = list(_batches(samples, batch_size))
        for chunk, body in zip(chunks, pool.map(lambda c: post(client, c), chunks), strict=True):
            name = body.get("model", name)
            results = body["results"]
            if len(results) != len(chunk):
                raise RuntimeError(f"sent {len(chunk)} images, got {len(results)} results")
            for sample, result in zip(chunk, results, strict=True):
                if (result["width"], result["height"]) != (sample.width, sample.height):
                    raise RuntimeError(
                        f"server saw {result['width']}x{result['height']}, "
                        f"image is {sample.width}x{sample.height}"
                    )
                out.append(result["detections"])
                if tiles is not None:
                    tiles.append(int(result["timings"].get("tiles", 0)))
    return name, out


def evaluate(
    samples: Sequence[shapes.Sample], coco_gt: dict, detections: Sequence[Sequence[Detection]]
) -> dict[str, float]:
    return coco_map(coco_gt, detections) | recall_precision(samples, detections)


# INT8 ships as an option only while its mAP@0.5 stays this close to float32's.
INT8_MAP50_TOLERANCE = 0.01


def int8_gate(float32: dict[str, float], int8: dict[str, float]) -> tuple[bool, float]:
    """(passes, float32 mAP@0.5 - INT8 mAP@0.5)."""
    drop = float32["mAP50"] - int8["mAP50"]
    return drop <= INT8_MAP50_TOLERANCE, drop


def compare_int8(
    model: Path, samples: Sequence[shapes.Sample], coco_gt: dict, args: argparse.Namespace
) -> dict[str, dict[str, float]]:
    """Both precisions through HTTP, each on a server of its own, one after the other."""
    import httpx

    from scripts.bench.serverproc import RunningServer
    from scripts.export_onnx import ensure_int8

    ensure_int8(model)
    columns = {}
    for precision, column in (("float", "http-float32"), ("int8", "http-int8")):
        server = RunningServer(
            ["--model", str(model), "--backend", "onnx", "--precision", precision],
            ready_timeout_s=600,
        )
        try:
            card = httpx.get(server.url + "/v1/models").json()["models"][0]
            want = "int8" if precision == "int8" else "float32"
            if card["dtype"] != want:
                raise RuntimeError(f"asked for {want}, the server serves {card}")
            t0 = time.perf_counter()
            _, dets = detect_http(
                server.url, samples, args.threshold, args.max_detections, args.batch_size
            )
            print(f"{column}: {time.perf_counter() - t0:.1f} s through HTTP", flush=True)
        finally:
            server.stop()
        columns[column] = evaluate(samples, coco_gt, dets)
    return columns


# The default model's acceptance bar (issue 3): through HTTP, on 500 held-out images.
BAR_MAP50, BAR_MAP, BAR_SERVING_DIFFERENCE = 0.90, 0.65, 0.005
CARD_BEGIN, CARD_END = "<!-- evaluate.py: begin -->", "<!-- evaluate.py: end -->"


def bar_verdicts(columns: dict[str, dict[str, float]]) -> list[tuple[str, bool]]:
    """Each part of the bar that these columns can judge, with whether it is met."""
    served = columns.get("http") or columns.get("direct") or {}
    verdicts = []
    if served:
        verdicts.append((f"mAP50 >= {BAR_MAP50:.2f}", served["mAP50"] >= BAR_MAP50))
        verdicts.append((f"mAP >= {BAR_MAP:.2f}", served["mAP"] >= BAR_MAP))
    if "http" in columns and "direct" in columns:
        worst = max(abs(columns["http"][k] - columns["direct"][k]) for k in METRIC_NAMES)
        verdicts.append(
            (
                f"|http - direct| <= {BAR_SERVING_DIFFERENCE} on every COCO metric "
                f"(largest {worst:.4f})",
                worst <= BAR_SERVING_DIFFERENCE,
            )
        )
    return verdicts


def bar_lines(columns: dict[str, dict[str, float]]) -> list[str]:
    return [f"{what}: {'met' if ok else 'NOT met'}" for what, ok in bar_verdicts(columns)]


def _table(
    columns: dict[str, dict[str, float]],
) -> tuple[list[str], list[tuple[str, list[float], float | None]]]:
    """Header and rows (metric, one value per column, second minus first where there are two)."""
    header = ["metric", *columns] + (["difference"] if len(columns) == 2 else [])
    rows = []
    for name in next(iter(columns.values())):
        values = [c[name] for c in columns.values()]
        rows.append((name, values, values[1] - values[0] if len(values) == 2 else None))
    return header, rows


def card_section(report: dict, columns: dict[str, dict[str, float]], command: str) -> str:
    """The model card's evaluation section: figures, the command, the bar."""
    header, rows = _table(columns)
    lines = [
        CARD_BEGIN,
        "## Evaluation",
        "",
        f"`{command}` ({report['date']}): {report['count']} held-out images "
        f"(seed {report['seed']}, {report['objects']} objects), threshold {report['threshold']:g}, "
        f"{report['max_detections']} detections per image; `direct` runs the folder with "
        "transformers' own processor and model, `http` posts the same JPEG bytes to detr-serve"
        + (f" ({report['transport']})." if "http" in columns else "."),
        "",
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" for _ in header) + " |",
    ]
    for name, values, difference in rows:
        cells = [f"{v:.4f}" for v in values]
        if difference is not None:
            cells.append(f"{difference:+.4f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Bar for the default model:", ""]
    lines += [f"- {line}" for line in bar_lines(columns)]
    lines.append(CARD_END)
    return "\n".join(lines) + "\n"


def write_card_section(card: Path, section: str) -> None:
    """Replace the card's evaluation section, or put it before "## Reproduce" (else at the end)."""
    text = card.read_text()
    if CARD_BEGIN in text and CARD_END in text:
        head, rest = text.split(CARD_BEGIN, 1)
        text = head + section.rstrip("\n") + rest.split(CARD_END, 1)[1]
    elif "\n## Reproduce" in text:
        head, tail = text.split("\n## Reproduce", 1)
        text = head + "\n" + section + "\n## Reproduce" + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    card.write_text(text)


def _print_table(columns: dict[str, dict[str, float]]) -> None:
    header, rows = _table(columns)
    print(" | ".join(f"{h:>14}" for h in header))
    for name, values, difference in rows:
        row = [f"{name:>14}", *(f"{v:>14.4f}" for v in values)]
        if difference is not None:
            row.append(f"{difference:>+14.4f}")
        print(" | ".join(row))


# Issue 14's targets for the default model on the high-resolution scenes.
TILING_BAR_MAP50, PLAIN_CEILING_MAP50, TILES_OVER_RAW = 0.85, 0.3, 0.85


def served_raw_pass(card: dict) -> tuple[str, str]:
    """(backend, precision) of the raw pass that matches the model a server describes at
    /v1/models: the backend it runs (onnx for --backend auto on the CPU), INT8 when it serves
    the INT8 model."""
    backend = str(card["backend"])
    if backend not in ("torch", "onnx"):
        raise ValueError(f"the server runs backend {backend!r}: no raw forward pass to compare")
    return backend, "int8" if card.get("dtype") == "int8" else "float"


def tiling_evaluation(args: argparse.Namespace) -> dict:
    """--tiling: the high-resolution scenes through HTTP, tiling off then on, and the raw
    forward pass of the backend the server runs (as /v1/models says), at the server's batch
    size, with the server's threads (in a process of its own, before the HTTP runs, so that
    the two never share the cores)."""
    import tempfile

    import httpx

    seed = args.seed if args.seed != shapes.HELDOUT_SEED else shapes.HIGHRES_SEED
    started = time.perf_counter()
    coco_gt, samples = shapes.coco_dataset(seed, args.count, highres=True)
    print(
        f"{len(samples)} high-resolution scenes, {len(coco_gt['annotations'])} objects "
        f"(seed {seed}; generated in {time.perf_counter() - started:.0f} s)",
        flush=True,
    )
    card = httpx.get(args.url.rstrip("/") + "/v1/models", timeout=30).json()["models"][0]
    max_batch = int(card["max_batch_size"])
    backend, precision = served_raw_pass(card)
    from scripts.bench.bench_compare import raw_forward

    # A tile of the first scene at the model's input size: what each tiled batch item is.
    tile_dir = tempfile.TemporaryDirectory()  # removed at the end, or when collected
    tile = Path(tile_dir.name) / "tile.jpg"
    samples[0].image.crop((0, 0, 256, 256)).save(tile, format="JPEG", quality=90)

    def raw_pass(when: str) -> dict:
        raw = raw_forward(
            args.model,
            max_batch,
            args.raw_seconds,
            backend=backend,
            precision=precision,
            image=tile,
            sizes=[max_batch],
        )
        print(
            f"raw forward pass {when} ({raw['backend']}, {precision}, {raw['threads']} threads, "
            f"OMP {raw['omp']}) at batch {max_batch}: {raw['forward_img_s']:.1f} img/s (the "
            "faster of "
            + ", ".join(f"{name} {v:.1f}" for name, v in raw["variants"].items())
            + ")",
            flush=True,
        )
        return raw

    # Measured before and after the HTTP runs (never beside them: the cores are shared), and
    # their mean is the reference: this machine's speed drifts by 10-20% within minutes, and a
    # reference taken on one side only measures the drift as much as the server.
    raw_before = raw_pass("before")
    tiling = json.loads(args.tiling_options) if args.tiling_options else True
    runs: dict[str, dict[str, float]] = {}
    tile_counts: list[int] = []
    for mode, option in (("plain", None), ("tiled", tiling)):
        counts: list[int] = []
        t0 = time.perf_counter()
        _, dets = detect_http(
            args.url,
            samples,
            args.threshold,
            args.max_detections,
            1,
            args.transport,
            timeout=600.0,
            tiling=option,
            concurrency=args.concurrency,
            tiles=counts,
        )
        seconds = time.perf_counter() - t0
        figures = evaluate(samples, coco_gt, dets)
        figures["images_per_s"] = len(samples) / seconds
        figures["seconds"] = seconds
        if option is not None:
            tile_counts = counts
            figures["tiles"] = float(sum(counts))
            figures["tiles_per_s"] = sum(counts) / seconds
        runs[mode] = figures
        print(
            f"{mode}: mAP50 {figures['mAP50']:.4f}, recall@0.5 {figures['recall@0.5']:.4f}, "
            f"{figures['images_per_s']:.3f} images/s",
            flush=True,
        )
    tiled, plain = runs["tiled"], runs["plain"]
    raw_after = raw_pass("after")
    tile_dir.cleanup()
    raw = {
        **raw_before,
        "forward_img_s": (raw_before["forward_img_s"] + raw_after["forward_img_s"]) / 2,
    }
    verdicts = {
        f"tiled mAP50 >= {TILING_BAR_MAP50}": tiled["mAP50"] >= TILING_BAR_MAP50,
        f"plain mAP50 < {PLAIN_CEILING_MAP50}": plain["mAP50"] < PLAIN_CEILING_MAP50,
        f"tiles/s >= {TILES_OVER_RAW} x raw forward": tiled["tiles_per_s"]
        >= TILES_OVER_RAW * raw["forward_img_s"],
    }
    return {
        "seed": seed,
        "count": len(samples),
        "objects": len(coco_gt["annotations"]),
        "sizes": sorted({f"{s.width}x{s.height}" for s in samples}),
        "tiling": tiling,
        "concurrency": args.concurrency,
        "threshold": args.threshold,
        "max_detections": args.max_detections,
        "max_batch_size": max_batch,
        "tiles_per_image": sum(tile_counts) / max(1, len(tile_counts)),
        "raw_backend": raw["backend"],
        "raw_precision": precision,
        "raw_threads": raw["threads"],
        "raw_omp_wait_policy": raw["omp"],
        "raw_forward_img_s": raw["forward_img_s"],
        "raw_variants_img_s": raw["variants"],
        "raw_before_img_s": raw_before["forward_img_s"],
        "raw_after_img_s": raw_after["forward_img_s"],
        "raw_after_variants_img_s": raw_after["variants"],
        "tiles_over_raw": tiled["tiles_per_s"] / raw["forward_img_s"],
        "runs": runs,
        "verdicts": verdicts,
    }


def tiling_table(report: dict) -> str:
    """The README's measured table (markdown)."""
    plain, tiled = report["runs"]["plain"], report["runs"]["tiled"]
    lines = [
        "| | tiling off | tiling on |",
        "| --- | --- | --- |",
        f"| mAP@0.5 | {plain['mAP50']:.3f} | {tiled['mAP50']:.3f} |",
        f"| mAP@0.5:0.95 | {plain['mAP']:.3f} | {tiled['mAP']:.3f} |",
        f"| recall (score >= 0.5, IoU >= 0.5) | {plain['recall@0.5']:.3f} | "
        f"{tiled['recall@0.5']:.3f} |",
        f"| images/s | {plain['images_per_s']:.3f} | {tiled['images_per_s']:.3f} |",
        f"| tiles per image | 1 | {report['tiles_per_image']:.1f} |",
        f"| tiles/s (raw {report.get('raw_backend', 'torch')} forward pass at batch "
        f"{report['max_batch_size']}: {report['raw_forward_img_s']:.1f}{_bracket(report)}) | | "
        f"{tiled['tiles_per_s']:.1f} "
        f"({report['tiles_over_raw']:.2f}x raw) |",
    ]
    return "\n".join(lines)


def _bracket(report: dict) -> str:
    """How the raw reference was made: the mean of the passes before and after the runs."""
    if "raw_before_img_s" not in report:
        return ""
    before, after = report["raw_before_img_s"], report["raw_after_img_s"]
    return f", mean of {before:.1f} before and {after:.1f} after"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        type=Path,
        default=REPO / "models" / "rtdetr-shapes",
        help="folder for direct mode",
    )
    parser.add_argument(
        "--url", help="base URL of a running detr-serve, e.g. http://127.0.0.1:8000"
    )
    parser.add_argument("--no-direct", action="store_true", help="only the HTTP mode")
    parser.add_argument("--transport", choices=("multipart", "json"), default="multipart")
    parser.add_argument(
        "--seed", type=int, default=shapes.HELDOUT_SEED, help="held-out stream, never trained on"
    )
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--threshold", type=float, default=0.01)
    parser.add_argument("--max-detections", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads in direct mode")
    parser.add_argument(
        "--compare-int8",
        action="store_true",
        help="serve --model in float32 and INT8 (onnx backend) and evaluate both through HTTP",
    )
    parser.add_argument("--json-out", type=Path, help="also write the figures here")
    parser.add_argument(
        "--card",
        type=Path,
        help="write the figures into this model card's evaluation section "
        "(e.g. models/rtdetr-shapes/README.md)",
    )
    parser.add_argument(
        "--tiling",
        action="store_true",
        help="high-resolution scenes through HTTP (needs --url), tiling off vs on",
    )
    parser.add_argument(
        "--tiling-options",
        default="",
        help="the tiling option as JSON (default: true, the server's defaults), e.g. "
        '\'{"tile_size": 256, "overlap": 0.2}\'',
    )
    parser.add_argument("--concurrency", type=int, default=2, help="requests in flight (--tiling)")
    parser.add_argument(
        "--raw-seconds", type=float, default=10.0, help="time per raw forward measure (--tiling)"
    )
    args = parser.parse_args(argv)
    if args.tiling:
        if not args.url:
            parser.error("--tiling needs --url")
        report = tiling_evaluation(args)
        print(tiling_table(report))
        for what, ok in report["verdicts"].items():
            print(f"target: {what}: {'met' if ok else 'NOT met'}")
        if args.json_out:
            args.json_out.write_text(json.dumps(report, indent=2))
        return 0
    if args.no_direct and not args.url:
        parser.error("--no-direct needs --url")
    if args.seed in (shapes.TRAIN_SEED,):
        parser.error(f"seed {args.seed} is the training stream; pick one never trained on")

    coco_gt, samples = shapes.coco_dataset(args.seed, args.count)
    print(f"{len(samples)} images, {len(coco_gt['annotations'])} objects (seed {args.seed})")
    columns: dict[str, dict[str, float]] = {}
    report: dict = {
        "seed": args.seed,
        "count": args.count,
        "objects": len(coco_gt["annotations"]),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "transport": args.transport,
        "threshold": args.threshold,
        "max_detections": args.max_detections,
    }
    if args.compare_int8:
        columns |= compare_int8(args.model, samples, coco_gt, args)
        ok, drop = int8_gate(columns["http-float32"], columns["http-int8"])
        report["int8_gate"] = {"passes": ok, "map50_drop": drop}
    elif not args.no_direct:
        import torch
        import transformers  # noqa: F401 (imported here so the timing below is inference only)

        torch.set_num_threads(args.threads)
        t0 = time.perf_counter()
        dets = detect_direct(
            args.model, samples, args.threshold, args.max_detections, args.batch_size
        )
        report["direct_seconds"] = time.perf_counter() - t0
        columns["direct"] = evaluate(samples, coco_gt, dets)
    if args.url:
        t0 = time.perf_counter()
        name, dets = detect_http(
            args.url, samples, args.threshold, args.max_detections, args.batch_size, args.transport
        )
        report["http_seconds"] = time.perf_counter() - t0
        report["http_model"] = name
        columns["http"] = evaluate(samples, coco_gt, dets)
    _print_table(columns)
    for k in ("direct_seconds", "http_seconds"):
        if k in report:
            print(f"{k}: {report[k]:.1f} s ({report[k] / len(samples) * 1000:.0f} ms/image)")
    for line in bar_lines(columns):
        print(f"bar: {line}")
    if "int8_gate" in report:
        gate = report["int8_gate"]
        print(
            f"INT8 gate: mAP@0.5 drop {gate['map50_drop']:+.4f} (allowed <= "
            f"{INT8_MAP50_TOLERANCE}): {'PASS' if gate['passes'] else 'FAIL'}"
        )
    if args.json_out:
        args.json_out.write_text(json.dumps(report | columns, indent=2))
    if args.card:
        command = "python scripts/training/evaluate.py " + " ".join(
            a for a in (argv if argv is not None else sys.argv[1:]) if a
        )
        write_card_section(args.card, card_section(report, columns, command))
        print(f"wrote the evaluation section of {args.card}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
