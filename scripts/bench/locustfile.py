"""Locust load for POST /v1/detect: each user sends one real JPEG (base64 JSON) back to back.

    locust -f scripts/bench/locustfile.py --headless -u 32 -r 32 -t 20s --host http://127.0.0.1:8000

The image is DETR_BENCH_IMAGE (default: examples/shapes-640x480.jpg, or a generated one).
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

from locust import FastHttpUser, constant, task

_IMAGE = Path(os.environ.get("DETR_BENCH_IMAGE", "examples/shapes-640x480.jpg"))
_BODY = json.dumps(
    {"images": [{"data": base64.b64encode(_IMAGE.read_bytes()).decode()}], "threshold": 0.5}
)


class DetectUser(FastHttpUser):
    wait_time = constant(0)
    network_timeout = 120.0
    connection_timeout = 10.0

    @task
    def detect(self) -> None:
        self.client.post(
            "/v1/detect",
            data=_BODY,
            headers={"Content-Type": "application/json"},
            name="/v1/detect",
        )
