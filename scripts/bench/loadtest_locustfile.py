"""Locust users for scripts/bench/loadtest.py: open-loop overload that records every status, and,
with --hostile, users sending the hostile requests of issue 20 beside it.

OverloadUser sends POST /v1/detect (one real JPEG, base64 JSON) at DETR_LOAD_RATE_PER_USER
requests/s. HostileUser (DETR_LOAD_HOSTILE_USERS of them, each at
DETR_LOAD_HOSTILE_RATE_PER_USER requests/s) takes the classes of DETR_LOAD_HOSTILE_MANIFEST in
turn: each entry a method, path, headers, the file holding its body (built once by
loadtest.py), the statuses that refuse it and a word the refusal must name. At the end the
counts go to DETR_LOAD_RESULTS as JSON.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from locust import FastHttpUser, constant_throughput, events, task

_IMAGE = Path(os.environ.get("DETR_BENCH_IMAGE", "examples/shapes-640x480.jpg"))
_BODY = json.dumps({"images": [{"data": base64.b64encode(_IMAGE.read_bytes()).decode()}]})
_RATE = float(os.environ.get("DETR_LOAD_RATE_PER_USER", "1"))
_HOSTILE_RATE = float(os.environ.get("DETR_LOAD_HOSTILE_RATE_PER_USER", "1"))


def _load_manifest() -> list[dict[str, Any]]:
    path = os.environ.get("DETR_LOAD_HOSTILE_MANIFEST")
    if not path:
        return []
    classes = json.loads(Path(path).read_text())
    for entry in classes:
        entry["data"] = Path(entry["body_file"]).read_bytes() if entry["body_file"] else None
    return list(classes)


_HOSTILE = _load_manifest()
# One turn for all hostile users together: every class gets the same share of the sends.
_turns = itertools.cycle(_HOSTILE) if _HOSTILE else None

statuses: Counter[int] = Counter()
accepted_latencies_ms: list[float] = []
retry_after_missing = 0

hostile_statuses: defaultdict[str, Counter[int]] = defaultdict(Counter)
hostile_latencies_ms: defaultdict[str, list[float]] = defaultdict(list)
hostile_unnamed: Counter[str] = Counter()  # a refusal whose message does not name the problem
hostile_retry_after_missing: Counter[str] = Counter()


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


class HostileUser(FastHttpUser):
    """Started only where loadtest.py names it (the mixed phase), as a fixed number of users."""

    fixed_count = int(os.environ.get("DETR_LOAD_HOSTILE_USERS", "0"))
    wait_time = constant_throughput(_HOSTILE_RATE)
    network_timeout = 120.0
    connection_timeout = 10.0

    @task
    def attack(self) -> None:
        assert _turns is not None, "HostileUser needs DETR_LOAD_HOSTILE_MANIFEST"
        entry = next(_turns)
        name = entry["name"]
        with self.client.request(
            entry["method"],
            entry["path"],
            data=entry["data"],
            headers=entry["headers"],
            name=f"hostile:{name}",
            catch_response=True,
        ) as response:
            status = response.status_code
            hostile_statuses[name][status] += 1
            hostile_latencies_ms[name].append(float(response.request_meta["response_time"]))
            if status == 429 and not response.headers.get("Retry-After"):
                hostile_retry_after_missing[name] += 1
            if status in entry["statuses"]:
                text = (response.text or "").lower()
                if entry["word"].lower() not in text:
                    hostile_unnamed[name] += 1
            response.success()  # judged by loadtest.py from the counts


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _hostile_report() -> dict[str, Any]:
    report = {}
    for entry in _HOSTILE:
        name = entry["name"]
        counts = hostile_statuses[name]
        sent = sum(counts.values())
        report[name] = {
            "sent": sent,
            "statuses": {str(k): v for k, v in sorted(counts.items())},
            "expected": entry["statuses"],
            "refused_4xx": sum(v for k, v in counts.items() if 400 <= k < 500),
            "unexpected": sum(
                v for k, v in counts.items() if k not in entry["statuses"] and k != 429
            ),
            "unnamed": hostile_unnamed[name],
            "rejected_without_retry_after": hostile_retry_after_missing[name],
            "accepted_2xx": sum(v for k, v in counts.items() if 200 <= k < 300),
            "server_errors": sum(v for k, v in counts.items() if k >= 500),
            "unanswered": counts[0],
            "p50_ms": _percentile(hostile_latencies_ms[name], 0.50),
            "max_ms": max(hostile_latencies_ms[name], default=float("nan")),
        }
    return report


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
    if _HOSTILE:
        report["hostile"] = _hostile_report()
    Path(os.environ.get("DETR_LOAD_RESULTS", "loadtest.json")).write_text(json.dumps(report))
