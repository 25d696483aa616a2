"""The baseline scripts/bench/bench.py compares detr-serve against: the endpoint most people write
first. Per request: Pillow decode, the transformers image processor, the eager model, then
post_process_object_detection; the work runs in FastAPI's thread pool with no batching.

    python scripts/bench/naive_server.py --model DIR --device cuda --port 8100
    curl -F file=@examples/shapes-640x480.jpg http://127.0.0.1:8100/detect

It takes what /v1/detect takes from the benchmark's client: multipart `file` parts, or JSON
{"images": [{"data": base64}], "threshold": t}, at /detect and /v1/detect.
"""

from __future__ import annotations

import argparse
import base64
import io
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from PIL import Image
from starlette.datastructures import UploadFile
from transformers import AutoImageProcessor, AutoModelForObjectDetection

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def create_app(model_dir: str, device: str, dtype: str) -> FastAPI:
    processor = AutoImageProcessor.from_pretrained(model_dir)
    model = AutoModelForObjectDetection.from_pretrained(model_dir, dtype=_DTYPES[dtype])
    model = model.to(device).eval()
    app = FastAPI(title="naive detector")

    def infer(data: bytes, threshold: float) -> dict[str, Any]:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        inputs = processor(images=image, return_tensors="pt").to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        with torch.no_grad():
            outputs = model(**inputs)
        result = processor.post_process_object_detection(
            outputs, threshold=threshold, target_sizes=[(image.height, image.width)]
        )[0]
        return {
            "width": image.width,
            "height": image.height,
            "detections": [
                {"label": int(label), "score": float(score), "box": box.tolist()}
                for score, label, box in zip(
                    result["scores"], result["labels"], result["boxes"], strict=True
                )
            ],
        }

    @app.get("/readyz")
    def ready() -> dict[str, str]:
        return {"status": "ready"}

    async def detect(request: Request) -> dict[str, Any]:
        if request.headers.get("content-type", "").startswith("multipart/"):
            form = await request.form()
            files = [p for p in form.getlist("file") if isinstance(p, UploadFile)]
            images = [await f.read() for f in files]
            threshold = float(str(form.get("threshold") or 0.5))
        else:
            body = await request.json()
            images = [base64.b64decode(i["data"]) for i in body["images"]]
            threshold = float(body.get("threshold", 0.5))
        results = [await run_in_threadpool(infer, data, threshold) for data in images]
        return {"results": results}

    app.add_api_route("/detect", detect, methods=["POST"])
    app.add_api_route("/v1/detect", detect, methods=["POST"])
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args()
    app = create_app(args.model, args.device, args.dtype)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
