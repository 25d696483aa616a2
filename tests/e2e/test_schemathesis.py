"""Property-based API fuzzing with schemathesis against the live server's OpenAPI document.

`make test` runs a short pass; `make fuzz` runs the dedicated one (over 1000 generated cases).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.bench.serverproc import RunningServer

pytestmark = pytest.mark.e2e

# positive_data_acceptance is left out on purpose: a schema cannot say "these base64 bytes are
# a decodable image", so schema-valid bodies with junk images are rightly answered 400.
CHECKS_EXCLUDED = "positive_data_acceptance"


def test_fuzzed_requests_get_no_server_error_and_match_the_schema(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    max_examples = os.environ.get("DETR_FUZZ_MAX_EXAMPLES", "8")
    server = RunningServer(["--model", str(tiny_model_dir), "--torch-threads", "1"])
    try:
        cmd = [
            str(Path(sys.executable).parent / "schemathesis"),
            "run",
            server.url + "/openapi.json",
            "--checks",
            "all",
            "--exclude-checks",
            CHECKS_EXCLUDED,
            "--max-examples",
            max_examples,
            "--seed",
            "20261127",
            "--workers",
            "1",
            "--request-timeout",
            "30",
            "--no-color",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    finally:
        server.stop()
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    generated = re.search(r"(\d+) generated", out)
    assert generated and int(generated.group(1)) > 0, out[-2000:]
    print(f"schemathesis: {generated.group(0)} test cases")
    assert "Traceback" not in server.log()
