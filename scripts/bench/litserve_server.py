"""The peer scripts/bench/bench.py --compare measures detr-serve against: LitServe on the same
checkpoint, the way its docs write a detector: transformers' own image processor and model,
LitServe's batching (max_batch_size and batch_timeout given equal to detr-serve's), decoding in
LitServe's inference worker process.

    python scripts/bench/litserve_server.py --model DIR --port 8200 --max-batch-size 8 \
        --batch-timeout 0.005

It takes what /v1/detect takes from the benchmark's client, at /v1/detect: a multipart `file`
part, or JSON {"images": [{"data": base64}], "threshold": t} (one image per request).
"""

from __future__ import annotations

import argparse
import base64
import io
from typing import Any

import litserve as ls
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForObjectDetection


class DetectAPI(ls.LitAPI):
    def __init__(self, model_dir: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model_dir = model_dir

    def setup(self, device: str) -> None:
        self.device = device
        self.processor = AutoImageProcessor.from_pretrained(self.model_dir)
        model = AutoModelForObjectDetection.from_pretrained(self.model_dir)
        self.model = model.to(device).eval()

    # No annotation on `request`: LitServe reads it to pick how the body is parsed.
    def decode_request(self, request) -> tuple[Image.Image, float]:  # noqa: ANN001
        if "file" in request:  # multipart form
            upload = request["file"]
            data = upload.file.read() if hasattr(upload, "file") else bytes(upload)
            threshold = float(request.get("threshold") or 0.5)
        else:
            data = base64.b64decode(request["images"][0]["data"])
            threshold = float(request.get("threshold", 0.5))
        return Image.open(io.BytesIO(data)).convert("RGB"), threshold

    def batch(self, inputs: list[tuple[Image.Image, float]]) -> list[tuple[Image.Image, float]]:
        return inputs

    def predict(self, batch: list[tuple[Image.Image, float]]) -> list[dict[str, Any]]:
        images = [image for image, _ in batch]
        inputs = self.processor(images=images, return_tensors="pt").to(self.device)
        with torch.no_grad():
            outputs = self.model(**inputs)
        results = self.processor.post_process_object_detection(
            outputs,
            threshold=min(t for _, t in batch),
            target_sizes=[(im.height, im.width) for im in images],
        )
        answers = []
        for (image, threshold), result in zip(batch, results, strict=True):
            keep = result["scores"] >= threshold
            answers.append(
                {
                    "width": image.width,
                    "height": image.height,
                    "detections": [
                        {"label": int(c), "score": float(s), "box": b.tolist()}
                        for s, c, b in zip(
                            result["scores"][keep],
                            result["labels"][keep],
                            result["boxes"][keep],
                            strict=True,
                        )
                    ],
                }
            )
        return answers

    def unbatch(self, output: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return output

    def encode_response(self, output: dict[str, Any]) -> dict[str, Any]:
        return {"results": [output]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8200)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-timeout", type=float, default=0.005, help="seconds")
    parser.add_argument("--accelerator", default="auto")
    args = parser.parse_args()
    api = DetectAPI(
        args.model,
        max_batch_size=args.max_batch_size,
        batch_timeout=args.batch_timeout,
        api_path="/v1/detect",
    )
    server = ls.LitServer(api, accelerator=args.accelerator, healthcheck_path="/readyz")
    server.run(host=args.host, port=args.port, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
