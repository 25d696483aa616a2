"""Soak test: overload a real detr-serve on loopback and check that it stays correct.

    python scripts/bench/loadtest.py --minutes 3            # default model, 2x measured capacity
    python scripts/bench/loadtest.py --minutes 1 --hostile  # then the same load, hostile requests

1. Boots `detr-serve` (or uses --url, which must be on loopback) with a small queue.
2. Measures capacity: closed-loop Locust load for --calibrate-s seconds -> requests/s.
3. Soaks at --overload x that rate (open-loop arrivals from many Locust users, each with a
   constant throughput) for --minutes, recording every response's status.
4. With --hostile, a second phase of the same length and the same ordinary load, plus
   --hostile-rate requests/s of the hostile classes of issue 20 taken in turn (a compressed
   image URL from a hostile origin this script serves on 127.0.0.1, sixteen 40-megapixel 1-bit
   PNGs, a gzip v2 body bomb, a progressive-JPEG scan bomb, a dense JSON body, a malformed v2
   JSON, an oversized header), each payload built once here.
5. Reports: requests sent, accepted (not 429/503) and answered with 200, the 429 share and
   whether each 429 carried Retry-After, 5xx count, lost requests (no response), RSS of the
   server's process tree at start, peak and end, p50/p99 latency of accepted requests; per
   hostile class: sent, the statuses it was refused with, 2xx, 5xx, unanswered. Exits 1 when a
   rule breaks: accepted != answered, any 5xx, a 429 without Retry-After, a peak RSS over
   --max-rss-growth x the start; with --hostile also a hostile-phase RSS peak over
   --max-hostile-rss-mb above the ordinary phase's peak, a hostile request answered 2xx, 5xx, with
   a status other than its refusal (or a refusal that does not name the problem), or not at
   all, a hostile class never sent, or the accepted p99 under hostile load over
   --max-p99-factor x the p99 of the ordinary phase.
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from app.config import DEFAULT_MODEL_NAME, REPO_MODELS_DIR  # noqa: E402
from scripts.bench.bench import run_locust, run_locust_headless  # noqa: E402
from scripts.bench.common import sample_jpeg  # noqa: E402
from scripts.bench.serverproc import RunningServer  # noqa: E402
from scripts.checks import hostile_payloads  # noqa: E402

LOCUSTFILE = ROOT / "scripts" / "bench" / "loadtest_locustfile.py"
HOSTILE_USERS = 14  # two per class: a slow refusal does not hold its class's turn
BOMB_BYTES = 1 << 30  # what each compressed URL inflates to (refused on its headers anyway)
OVERSIZED_HEADER = 48 * 1024  # over max_header_bytes (32 KiB), within one read of the server


def tree_rss_mb(pid: int) -> dict[int, float]:
    """RSS in MB of each process of `pid`'s tree (supervisor, engine, front ends, decode
    workers)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    sizes = {}
    for proc in procs:
        try:
            sizes[proc.pid] = proc.memory_info().rss / 2**20
        except psutil.NoSuchProcess:
            pass
    return sizes


class RssWatch:
    """Samples the RSS of the server's process tree every `interval_s` on a thread: the sum at
    the start, its peak in each phase and at each phase's end (`mark`); plus each process's own
    start, peak and end, to tell which one grew."""

    def __init__(self, pid: int, interval_s: float = 0.25) -> None:
        self.pid = pid
        first = tree_rss_mb(pid)
        self.start = sum(first.values())
        self.marks: dict[str, dict[str, float]] = {}
        self._phase_peak = self.start
        self.processes = {p: {"start": mb, "peak": mb, "end": mb} for p, mb in first.items()}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)
        self._thread.start()

    def _sample(self) -> float:
        sizes = tree_rss_mb(self.pid)
        with self._lock:
            for p, mb in sizes.items():
                row = self.processes.setdefault(p, {"start": mb, "peak": mb, "end": mb})
                row["peak"], row["end"] = max(row["peak"], mb), mb
            total = sum(sizes.values())
            self._phase_peak = max(self._phase_peak, total)
        return total

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self._sample()

    def mark(self, phase: str) -> None:
        total = self._sample()
        with self._lock:
            self.marks[phase] = {"peak": self._phase_peak, "end": total}
            self._phase_peak = total

    @property
    def peak(self) -> float:
        return max([self.start, *(m["peak"] for m in self.marks.values())])

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.marks[list(self.marks)[-1]]["end"] if self.marks else float("nan")


def hostile_manifest(url: str, origin: hostile_payloads.HostileOrigin, workdir: Path) -> Path:
    """Builds each hostile payload once, writes its body to `workdir`, and returns the manifest
    the Locust users read: per class the request and what must refuse it (statuses, and a word
    the refusal's message names)."""
    hp = hostile_payloads
    json_ct = {"Content-Type": "application/json"}
    gzip_url = origin.serve(
        "/bomb.jpg",
        hp.gzip_bomb(BOMB_BYTES),
        {"Content-Type": "image/jpeg", "Content-Encoding": "gzip"},
    )
    br_url = origin.serve(
        "/bomb-br.jpg",
        hp.brotli_bomb(BOMB_BYTES),
        {"Content-Type": "image/jpeg", "Content-Encoding": "br"},
    )
    pixels = httpx.Request(
        "POST",
        url + "/v1/detect",
        files=[
            ("file", (f"{i}.png", hp.PIXEL_FLOODS["1-bit-png"](), "image/png")) for i in range(16)
        ],
    )
    scan = httpx.Request(
        "POST",
        url + "/v1/detect",
        files=[("file", ("scans.jpg", hp.scan_bomb(6000, 6000, 20_000, 1), "image/jpeg"))],
    )
    gzip_body, gzip_headers = hp.gzip_binary_elements()
    model = httpx.get(url + "/v1/models", timeout=10).json()["models"][0]["name"]
    infer = f"/v2/models/{model}/infer"
    classes: list[dict[str, Any]] = [
        # finding 1: two 1 GiB bombs (gzip, br) by URL, refused on their Content-Encoding
        {
            "name": "compressed-url",
            "method": "POST",
            "path": "/v1/detect",
            "headers": json_ct,
            "body": json.dumps({"images": [{"url": gzip_url}, {"url": br_url}]}).encode(),
            "statuses": [400],
            "word": "compressed",
        },
        # finding 2: sixteen 40-megapixel 1-bit PNGs of 14 KB each in one request
        {
            "name": "pixel-flood",
            "method": "POST",
            "path": "/v1/detect",
            "headers": {"Content-Type": pixels.headers["Content-Type"]},
            "body": pixels.read(),
            "statuses": [413],
            "word": "decode to",
        },
        # finding 3: 31 KB of gzip that inflates to 8 million binary elements (32 MB)
        {
            "name": "gzip-v2-bomb",
            "method": "POST",
            "path": infer,
            "headers": gzip_headers,
            "body": gzip_body,
            "statuses": [413],
            "word": "inflat",
        },
        # finding 4: a 6000x6000 progressive JPEG with 20,000 empty scans
        {
            "name": "scan-bomb",
            "method": "POST",
            "path": "/v1/detect",
            "headers": {"Content-Type": scan.headers["Content-Type"]},
            "body": scan.read(),
            "statuses": [400],
            "word": "scans",
        },
        # finding 3: 31 MB of JSON, 2.6 million tiny URL entries
        {
            "name": "dense-json",
            "method": "POST",
            "path": "/v1/detect",
            "headers": json_ct,
            "body": hp.url_entries(),
            "statuses": [413],
            "word": "values",
        },
        # finding 6: v2 JSON nested 100,000 deep
        {
            "name": "malformed-v2",
            "method": "POST",
            "path": infer,
            "headers": json_ct,
            "body": b'{"inputs":' + hp.deep_nesting() + b"}",
            "statuses": [400],
            "word": "nest",
        },
        # finding 5: one header of 48 KiB
        {
            "name": "oversized-header",
            "method": "GET",
            "path": "/v1/models",
            "headers": {"X-Padding": "a" * OVERSIZED_HEADER},
            "body": None,
            "statuses": [431],
            "word": "header",
        },
    ]
    for entry in classes:
        body = entry.pop("body")
        entry["body_file"] = None
        if body is not None:
            path = workdir / f"hostile-{entry['name']}.bin"
            path.write_bytes(body)
            entry["body_file"] = str(path)
            entry["body_bytes"] = len(body)
    manifest = workdir / "hostile.json"
    manifest.write_text(json.dumps(classes))
    return manifest


def soak(
    url: str,
    rate: float,
    users: int,
    seconds: float,
    image: Path,
    out: Path,
    hostile: tuple[Path, float] | None = None,
) -> dict:
    """One phase: `users` OverloadUsers at `rate` requests/s together; with `hostile`
    (manifest, requests/s), HOSTILE_USERS HostileUsers beside them."""
    env = {
        "DETR_BENCH_IMAGE": str(image),
        "DETR_LOAD_RATE_PER_USER": str(rate / users),
        "DETR_LOAD_RESULTS": str(out),
    }
    classes = ["OverloadUser"]
    total_users = users
    if hostile is not None:
        manifest, hostile_rate = hostile
        env.update(
            DETR_LOAD_HOSTILE_MANIFEST=str(manifest),
            DETR_LOAD_HOSTILE_USERS=str(HOSTILE_USERS),
            DETR_LOAD_HOSTILE_RATE_PER_USER=str(hostile_rate / HOSTILE_USERS),
        )
        classes.append("HostileUser")
        total_users += HOSTILE_USERS
    run_locust_headless(
        LOCUSTFILE, url, total_users, seconds, env, "--stop-timeout", "60", *classes
    )
    return dict(json.loads(out.read_text()))


def normal_problems(report: dict, phase: str) -> list[str]:
    problems = []
    if report["accepted"] != report["answered"]:
        problems.append(f"{phase}: accepted {report['accepted']} != answered {report['answered']}")
    if report["server_errors"]:
        problems.append(f"{phase}: {report['server_errors']} responses were 5xx")
    if report["rejected_without_retry_after"]:
        problems.append(f"{phase}: a 429 came without Retry-After")
    if report["lost"]:
        problems.append(f"{phase}: {report['lost']} requests got no response")
    return problems


def hostile_problems(hostile: dict[str, dict]) -> list[str]:
    problems = []
    for name, row in hostile.items():
        if not row["sent"]:
            problems.append(f"{name}: never sent")
        for key, what in (
            ("accepted_2xx", "answered 2xx"),
            ("server_errors", "answered 5xx"),
            ("unanswered", "got no response"),
            ("unexpected", f"answered other than {row['expected']} or 429"),
            ("unnamed", "refused without naming the problem"),
            ("rejected_without_retry_after", "refused 429 without Retry-After"),
        ):
            if row[key]:
                problems.append(f"{name}: {row[key]} of {row['sent']} {what}")
    return problems


def print_summary(report: dict) -> None:
    def normal_line(phase: str, r: dict) -> str:
        return (
            f"  {phase:<14} sent {r['sent']:>6}  accepted {r['accepted']:>6}  answered "
            f"{r['answered']:>6}  429 {100 * r['share_429']:4.0f}%  5xx {r['server_errors']}  "
            f"lost {r['lost']}  p50 {r['p50_accepted_ms']:6.0f} ms  p99 "
            f"{r['p99_accepted_ms']:6.0f} ms"
        )

    print("ordinary requests (POST /v1/detect, 640x480 JPEG):")
    print(normal_line("alone", report["normal_only"]))
    if "mixed" in report:
        print(normal_line("under hostile", report["mixed"]))
        print(f"  p99 under hostile load / alone: {report['p99_factor']:.2f}")
        print("hostile requests:")
        for name, row in report["mixed"]["hostile"].items():
            print(
                f"  {name:<17} sent {row['sent']:>4}  refused 4xx {row['refused_4xx']:>4} "
                f"{row['statuses']}  2xx {row['accepted_2xx']}  5xx {row['server_errors']}  "
                f"unanswered {row['unanswered']}  p50 {row['p50_ms']:5.0f} ms  max "
                f"{row['max_ms']:5.0f} ms"
            )
    rss = report["rss_mb"]
    print(
        f"server RSS (process tree): start {rss['start']:.0f} MB, peak {rss['peak']:.0f} MB, "
        f"end {rss['end']:.0f} MB"
    )
    for phase, mark in rss["phases"].items():
        print(f"  {phase:<12} peak {mark['peak']:.0f} MB, at its end {mark['end']:.0f} MB")
    for pid, row in rss["processes"].items():
        print(
            f"  pid {pid:<8} start {row['start']:5.0f}  peak {row['peak']:5.0f}  "
            f"end {row['end']:5.0f} MB"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=REPO_MODELS_DIR / DEFAULT_MODEL_NAME)
    parser.add_argument("--url", default=None, help="an already running server (loopback only)")
    parser.add_argument("--minutes", type=float, default=3.0, help="per phase")
    parser.add_argument("--overload", type=float, default=2.0, help="x measured capacity")
    parser.add_argument("--calibrate-s", type=float, default=15.0)
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--queue", type=int, default=32, help="server max queue size")
    parser.add_argument("--max-rss-growth", type=float, default=1.5, help="peak/start RSS limit")
    parser.add_argument("--hostile", action="store_true", help="add the mixed hostile phase")
    parser.add_argument(
        "--hostile-rate", type=float, default=3.5, help="hostile requests/s, over all classes"
    )
    parser.add_argument(
        "--max-p99-factor",
        type=float,
        default=3.0,
        help="limit on accepted p99 under hostile load / accepted p99 alone",
    )
    parser.add_argument(
        "--max-hostile-rss-mb",
        type=float,
        default=300.0,
        help="limit on the hostile phase's RSS peak over the ordinary phase's peak",
    )
    parser.add_argument("--image", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="detr-soak-"))
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)  # its models and logs
    image = args.image or workdir / "image.jpg"
    if args.image is None:
        image.write_bytes(sample_jpeg(None))
    server = None
    origin = hostile_payloads.HostileOrigin() if args.hostile else None
    if args.url:
        if urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
            parser.error("--url must point at loopback: load is only ever sent to this machine")
        # The compressed-URL class needs that server to fetch from 127.0.0.1
        # (DETR_SERVE_ALLOW_PRIVATE_URLS=true); its RSS is not measured.
        url, pid = args.url, None
    else:
        env = {"DETR_SERVE_ALLOW_PRIVATE_URLS": "true"} if args.hostile else {}
        server = RunningServer(
            [
                "--model",
                str(args.model),
                "--max-queue-size",
                str(args.queue),
                "--log-level",
                "warning",
            ],
            env=env,
        )
        url, pid = server.url, server.proc.pid
    seconds = args.minutes * 60
    report: dict[str, Any] = {}
    try:
        manifest = hostile_manifest(url, origin, workdir) if origin is not None else None
        capacity = run_locust(url, 8, args.calibrate_s, image, workdir)["img_s"]
        target = capacity * args.overload
        print(
            f"capacity {capacity:.1f} req/s; soaking at {target:.1f} req/s for "
            f"{args.minutes:g} min" + (", then the same with hostile requests" if origin else ""),
            flush=True,
        )
        watch = RssWatch(pid) if pid else None
        report["normal_only"] = soak(url, target, args.users, seconds, image, workdir / "soak.json")
        if watch:
            watch.mark("normal_only")
        if manifest is not None:
            print(f"hostile phase: {args.hostile_rate:g} hostile req/s beside it", flush=True)
            report["mixed"] = soak(
                url,
                target,
                args.users,
                seconds,
                image,
                workdir / "mixed.json",
                hostile=(manifest, args.hostile_rate),
            )
            if watch:
                watch.mark("mixed")
        rss_end = watch.stop() if watch else float("nan")
    finally:
        if server is not None:
            time.sleep(1)
            server.stop()
        if origin is not None:
            origin.close()
    report.update(
        capacity_req_s=capacity,
        target_req_s=target,
        rss_mb={
            "start": watch.start if watch else float("nan"),
            "peak": watch.peak if watch else float("nan"),
            "end": rss_end,
            "phases": watch.marks if watch else {},
            "processes": {str(p): row for p, row in watch.processes.items()} if watch else {},
        },
    )
    problems = normal_problems(report["normal_only"], "alone")
    if "mixed" in report:
        mixed = report["mixed"]
        report["hostile_rate_req_s"] = args.hostile_rate
        report["p99_factor"] = mixed["p99_accepted_ms"] / report["normal_only"]["p99_accepted_ms"]
        problems += normal_problems(mixed, "under hostile")
        problems += hostile_problems(mixed["hostile"])
        if not mixed["answered"]:
            problems.append("under hostile: no ordinary request was answered")
        if not report["p99_factor"] <= args.max_p99_factor:  # NaN fails too
            problems.append(
                f"accepted p99 under hostile load {mixed['p99_accepted_ms']:.0f} ms is "
                f"{report['p99_factor']:.2f}x the {report['normal_only']['p99_accepted_ms']:.0f} "
                f"ms alone (limit {args.max_p99_factor:g}x)"
            )
    rss = report["rss_mb"]
    if pid and not math.isnan(rss["start"]) and rss["peak"] > rss["start"] * args.max_rss_growth:
        problems.append(
            f"RSS peaked at {rss['peak']:.0f} MB from {rss['start']:.0f} MB "
            f"(limit {args.max_rss_growth:g}x)"
        )
    phases = rss["phases"]
    if "mixed" in phases and "normal_only" in phases:
        added = phases["mixed"]["peak"] - phases["normal_only"]["peak"]
        rss["hostile_added_mb"] = added
        if added > args.max_hostile_rss_mb:
            problems.append(
                f"RSS peaked {added:.0f} MB higher under hostile load than without "
                f"(limit {args.max_hostile_rss_mb:g} MB)"
            )
    report["problems"] = problems
    print(json.dumps(report, indent=2))
    print_summary(report)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    print("PASS" if not problems else "FAIL: " + "; ".join(problems), flush=True)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
