"""Imports of the tools: no circle among the modules of scripts/, app/ never imports scripts/,
and scripts/bench/bench.py run as a file (the way the README runs it) is not imported a second
time by the runs it dispatches to (bench_compare.py, bench_cuda.py), which therefore see the
OMP_WAIT_POLICY the user set, not the PASSIVE default bench.py sets for the peers afterwards."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import runpy, sys
sys.argv = ["scripts/bench/bench.py", "--help"]
try:
    runpy.run_path("scripts/bench/bench.py", run_name="__main__")
except SystemExit:
    pass
import scripts.bench.bench_compare as compare
import scripts.bench.bench_cuda  # noqa: F401
print("removed", compare._detr_env_remove())
print("copies", "scripts.bench.bench" in sys.modules)
"""


@pytest.mark.parametrize(
    ("user_policy", "removed"), [(None, "('OMP_WAIT_POLICY',)"), ("ACTIVE", "()")]
)
def test_compare_sees_the_users_omp_policy_through_bench_py(user_policy, removed):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if user_policy is not None:
        env["OMP_WAIT_POLICY"] = user_policy
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
    # bench.py runs as __main__: a module importing `scripts.bench.bench` would run it again.
    assert lines["copies"] == "False"
    # detr-serve runs as shipped (PASSIVE removed) unless the user chose a policy for everyone.
    assert lines["removed"] == removed


def _imports(path: Path) -> set[str]:
    """The `scripts.*` modules a file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("scripts"):
            package = (ROOT / node.module.replace(".", "/")).is_dir()
            if package:  # `from scripts.training import evaluate`: the names are modules
                found |= {f"{node.module}.{alias.name}" for alias in node.names}
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("scripts")}
    return found


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_circle_among_the_scripts():
    graph = {_module(p): _imports(p) for p in (ROOT / "scripts").rglob("*.py")}
    assert graph["scripts.bench.bench"], "the walk found no imports: it checks nothing"
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        for dep in sorted(graph.get(module, ())):
            assert dep not in path, f"import circle: {' -> '.join([*path, dep])}"
            if dep not in done:
                visit(dep, [*path, dep])
        done.add(module)

    for module in sorted(graph):
        visit(module, [module])


def test_app_never_imports_scripts():
    offenders = {
        str(p.relative_to(ROOT)): sorted(found)
        for p in (ROOT / "app").rglob("*.py")
        if (found := _imports(p))
    }
    assert offenders == {}
