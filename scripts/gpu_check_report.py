"""scripts/gpu_check.sh's bookkeeping: record each step in OUT/check.json, and print a one-screen
summary (OUT/summary.txt) of the steps, the R18 figures and the tests.

    python scripts/gpu_check_report.py --out OUT --record NAME STATUS RC SECONDS REASON
    python scripts/gpu_check_report.py --out OUT --summary
"""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

MAX_LINES = 40  # one screen


def record(out: Path, name: str, status: str, rc: int, seconds: int, reason: str) -> None:
    path = out / "check.json"
    check = json.loads(path.read_text()) if path.exists() else {"steps": []}
    check["steps"].append(
        {"name": name, "status": status, "rc": rc, "seconds": seconds, "reason": reason}
    )
    path.write_text(json.dumps(check, indent=2))


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _tests(path: Path) -> str:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return "no results"
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return "no results"
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [
        f"{case.get('name')}"
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    text = (
        f"{counts['tests']} tests, {counts['failures']} failed, {counts['errors']} errors, "
        f"{counts['skipped']} skipped"
    )
    return text + (f"; failed: {', '.join(failed[:4])}" if failed else "")


def _bench_lines(name: str, report: dict[str, Any]) -> list[str]:
    lines = []
    for model, entry in report.get("models", {}).items():
        raw = entry.get("raw", {})
        graphs = raw.get("graphs") or "none"
        lines.append(
            f"{name} {model}: {raw.get('dtype')}, graphs {graphs}, nvjpeg {raw.get('nvjpeg')}, "
            f"start-up {raw.get('startup_s', 0):.0f} s"
        )
        for why in raw.get("eager_reasons", [])[:2]:
            lines.append(f"  EAGER: {why[:150]}")
        for row in raw.get("rows", []):
            if row["batch"] not in (1, 8, 32, 64):
                continue
            graph = f"{row['graph_ms']:.2f}" if "graph_ms" in row else "-"
            jpeg = f"{row['engine_jpeg_ms']:.2f}" if "engine_jpeg_ms" in row else "-"
            lines.append(
                f"  batch {row['batch']:3d}: graph {graph:>7} ms  eager {row['eager_ms']:7.2f} ms"
                f"  engine {row['engine_ms']:7.2f} ms  engine+nvjpeg {jpeg:>7} ms"
            )
        for part in ("http", "naive"):
            rows = entry.get(part, {}).get("rows", [])
            if rows:
                cells = [
                    f"{r['clients']}c {r['img_s']:.0f} img/s p50 {r['p50_ms']:.1f}" for r in rows
                ]
                lines.append(f"  {part}: " + " | ".join(cells))
        targets = entry.get("targets", {})
        ok = {k: v for k, v in targets.items() if k.endswith("_ok")}
        if ok:
            lines.append(
                "  targets: "
                + ", ".join(f"{k[:-3]} {'OK' if v else 'MISSED'}" for k, v in ok.items())
            )
    return lines


def summary(out: Path) -> str:
    lines: list[str] = []
    env = (out / "env.txt").read_text().splitlines() if (out / "env.txt").exists() else []
    lines.append(" / ".join(env[:4]))
    check = _load(out / "check.json") or {"steps": []}
    for s in check["steps"]:
        why = f" ({s['reason']})" if s["reason"] else ""
        lines.append(
            f"step {s['name']:10s} {s['status']:8s} rc {s['rc']:3d} {s['seconds']:4d} s{why}"
        )
    for name in ("r18", "r50", "compile"):
        report = _load(out / f"{name}.json")
        if report is not None:
            lines += _bench_lines(name, report)
    for name in ("kernel", "tests"):
        if (out / f"{name}.xml").exists():
            lines.append(f"{name}: {_tests(out / f'{name}.xml')}")
    text = "\n".join(lines[:MAX_LINES])
    (out / "summary.txt").write_text(text + "\n")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--record", nargs=5, metavar=("NAME", "STATUS", "RC", "SECONDS", "REASON"))
    parser.add_argument("--summary", action="store_true")
    args = parser.parse_args()
    if args.record:
        name, status, rc, seconds, reason = args.record
        record(args.out, name, status, int(rc), int(seconds), reason)
    if args.summary:
        print(summary(args.out))


if __name__ == "__main__":
    main()
