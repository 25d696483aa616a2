"""The bare FastAPI endpoint of the serving-overhead benchmark (scripts/bench/bench.py --overhead):
it reads the same upload as /v1/detect (multipart `file` parts or base64 JSON, parsed the same
way), decodes nothing, runs nothing, and answers the same JSON as detr-serve's null engine (one
fixed detection per image). Run with the same number of uvicorn workers as detr-serve's.

    python scripts/bench/bare_server.py --port 8300 --workers 1
"""

from __future__ import annotations

import argparse
import base64
import sys
from pathlib import Path

import orjson
import uvicorn
from fastapi import FastAPI, Request, Response
from starlette.datastructures import UploadFile

app = FastAPI(title="bare endpoint")


@app.get("/readyz")
async def ready() -> dict[str, str]:
    return {"status": "ready"}


@app.post("/v1/detect")
async def detect(request: Request) -> Response:
    if request.headers.get("content-type", "").startswith("multipart/"):
        form = await request.form()
        images = [await p.read() for p in form.getlist("file") if isinstance(p, UploadFile)]
    else:
        body = orjson.loads(await request.body())
        images = [base64.b64decode(i["data"]) for i in body["images"]]
    # 640x480 assumed, as the benchmark sends: reading the size would mean parsing the JPEG.
    result = {
        "width": 640,
        "height": 480,
        "detections": [
            {"label": "circle", "class_id": 0, "score": 0.9, "box": [64.0, 48.0, 320.0, 240.0]}
        ],
        "timings": {"fetch_ms": 0.0, "decode_ms": 0.0, "queue_ms": 0.0, "inference_ms": 0.0,
                    "postprocess_ms": 0.0, "batch_size": 1},
    }  # fmt: skip
    body_out = {"model": "bare", "results": [result] * len(images)}
    return Response(orjson.dumps(body_out), media_type="application/json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8300)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # workers import scripts.*
    uvicorn.run(
        "scripts.bench.bare_server:app",
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
