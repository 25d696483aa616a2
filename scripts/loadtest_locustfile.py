"""Locust users for scripts/loadtest.py: open-loop overload that records every status.

Each user sends POST /v1/detect (one real JPEG, base64 JSON) at DETR_LOAD_RATE_PER_USER
requests/s; at the end the counts go to DETR_LOAD_RESULTS as JSON.
"""

from __future__ import annotations

import base64
import json
import os
from collections import Counter
from pathlib import Path

from locust import FastHttpUser, constant_throughput, events, task

_IMAGE = Path(os.environ.get("DETR_BENCH_IMAGE", "examples/shapes-640x480.jpg"))
_BODY = json.dumps({"images": [{"data": base64.b64encode(_IMAGE.read_bytes()).decode()}]})
_RATE = float(os.environ.get("DETR_LOAD_RATE_PER_USER", "1"))

statuses: Counter[int] = Counter()
accepted_latencies_ms: list[float] = []
retry_after_missing = 0


class OverloadUser(FastHttpUser):
    wait_time = constant_throughput(_RATE)
    network_timeout = 120.0
    connection_timeout = 10.0

    @task
    def detect(self) -> None:
        global retry_after_missing
        with self.client.post(
            "/v1/detect",
            data=_BODY,
            headers={"Content-Type": "application/json"},
            name="/v1/detect",
            catch_response=True,
        ) as response:
            status = response.status_code
            statuses[status] += 1
            if status == 429:
                if not response.headers.get("Retry-After"):
                    retry_after_missing += 1
                response.success()  # expected under overload: counted, not a failure
            elif status == 200:
                elapsed = response.request_meta["response_time"]
                accepted_latencies_ms.append(float(elapsed))


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@events.test_stop.add_listener
def _write_results(**_: object) -> None:
    sent = sum(statuses.values())
    rejected = statuses[429] + statuses[503]
    accepted = sent - rejected - statuses[0]
    report = {
        "sent": sent,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "accepted": accepted,
        "answered": statuses[200],
        "rejected_429": statuses[429],
        "share_429": statuses[429] / sent if sent else 0.0,
        "rejected_without_retry_after": retry_after_missing,
        "server_errors": sum(v for k, v in statuses.items() if k >= 500),
        "lost": statuses[0],
        "p50_accepted_ms": _percentile(accepted_latencies_ms, 0.50),
        "p99_accepted_ms": _percentile(accepted_latencies_ms, 0.99),
    }
    Path(os.environ.get("DETR_LOAD_RESULTS", "loadtest.json")).write_text(json.dumps(report))
