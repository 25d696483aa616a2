"""The ONNX export cache (app/export/cache.py): keys, hits and misses, the model folder's own file,
read-only model folders, atomic writes and one export across concurrent processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("onnx")
import onnx  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

from app.export import cache  # noqa: E402
from app.export.cache import (  # noqa: E402
    META_EXPORT_KEY,
    ensure_export,
    export_key,
    find_export,
    recorded_key,
)

ROOT = Path(__file__).resolve().parents[2]


def write_fake_onnx(path: Path, key: str | None) -> None:
    """A valid one-node ONNX file whose metadata carries ``key``."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    model = helper.make_model(
        helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    )
    if key is not None:
        helper.set_model_props(model, {META_EXPORT_KEY: key})
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, path)


class RecordingExporter:
    """Stands in for export_onnx: writes a fake file with the metadata it is given."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[Path] = []
        self.fail = fail

    def __call__(self, model_dir: Path, output: Path, **kwargs: object) -> None:
        self.calls.append(output)
        if self.fail:
            raise RuntimeError("the exporter blew up")
        metadata = kwargs["metadata"]
        assert isinstance(metadata, dict)
        write_fake_onnx(output, metadata[META_EXPORT_KEY])


@pytest.fixture
def model_dir(tiny_model_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "tiny"
    shutil.copytree(tiny_model_dir, copy)
    return copy


def test_export_key_follows_weights_config_precision_and_exporter_version(
    model_dir, tmp_path, monkeypatch
):
    key = export_key(model_dir)
    assert key == export_key(model_dir), "the key is not deterministic"
    # Same bytes in another folder: the same key (a copy reuses the export).
    other = tmp_path / "elsewhere" / "renamed"
    shutil.copytree(model_dir, other)
    assert export_key(other) == key
    assert export_key(model_dir, "int8") != key

    weights = next(model_dir.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    changed_weights = export_key(model_dir)
    assert changed_weights != key

    config = json.loads((model_dir / "config.json").read_text())
    config["num_queries"] = config["num_queries"] + 1
    (model_dir / "config.json").write_text(json.dumps(config))
    changed_config = export_key(model_dir)
    assert changed_config != changed_weights

    monkeypatch.setattr(cache, "EXPORTER_VERSION", "test-next")
    assert export_key(model_dir) != changed_config


def test_miss_exports_into_the_cache_then_the_next_start_hits(model_dir, tmp_path):
    cache_dir = tmp_path / "cache"
    exporter = RecordingExporter()
    first = ensure_export(model_dir, cache_dir, exporter=exporter)
    assert first.source == "exported"
    assert first.path.is_file() and cache_dir in first.path.parents
    assert recorded_key(first.path) == export_key(model_dir)
    second = ensure_export(model_dir, cache_dir, exporter=exporter)
    assert (second.source, second.path) == ("cache", first.path)
    assert len(exporter.calls) == 1
    # New weights: a miss again, into an entry of its own.
    weights = next(model_dir.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes() + b"\0")
    third = ensure_export(model_dir, cache_dir, exporter=exporter)
    assert third.source == "exported" and third.path != first.path
    assert len(exporter.calls) == 2


def test_an_up_to_date_model_folder_export_is_used_and_a_stale_one_is_not(model_dir, tmp_path):
    cache_dir = tmp_path / "cache"
    exporter = RecordingExporter()
    write_fake_onnx(model_dir / "model.onnx", export_key(model_dir))
    found = ensure_export(model_dir, cache_dir, exporter=exporter)
    assert (found.source, found.path) == ("model folder", model_dir / "model.onnx")
    assert exporter.calls == []

    write_fake_onnx(model_dir / "model.onnx", "some-older-key")
    found = ensure_export(model_dir, cache_dir, exporter=exporter)
    assert found.source == "exported" and cache_dir in found.path.parents
    # A file with no key at all (exported by hand before keys existed) is not up to date either.
    write_fake_onnx(model_dir / "model.onnx", None)
    assert find_export(model_dir, tmp_path / "empty-cache", "float32") is None


def test_a_read_only_model_folder_is_never_written(model_dir, tmp_path):
    before = sorted(p.name for p in model_dir.iterdir())
    modes = {p: p.stat().st_mode for p in [model_dir, *model_dir.iterdir()]}
    for p in model_dir.iterdir():
        p.chmod(0o444)
    model_dir.chmod(0o555)
    try:
        found = ensure_export(model_dir, tmp_path / "cache", exporter=RecordingExporter())
    finally:
        for p, mode in modes.items():
            p.chmod(mode)
    assert found.source == "exported" and model_dir not in found.path.parents
    assert sorted(p.name for p in model_dir.iterdir()) == before


def test_a_failed_export_leaves_no_file_behind(model_dir, tmp_path):
    from app.export.onnx_export import written_atomically

    cache_dir = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="blew up"):
        ensure_export(model_dir, cache_dir, exporter=RecordingExporter(fail=True))
    assert not [p for p in cache_dir.rglob("*") if p.suffix in (".onnx", ".tmp")]

    target = tmp_path / "out" / "model.onnx"
    target.parent.mkdir()
    with pytest.raises(ValueError), written_atomically(target) as temporary:
        temporary.write_bytes(b"half a file")
        raise ValueError("interrupted")
    assert list(target.parent.iterdir()) == []
    with written_atomically(target) as temporary:
        assert temporary.parent == target.parent and temporary != target
        temporary.write_bytes(b"whole")
    assert target.read_bytes() == b"whole" and list(target.parent.iterdir()) == [target]


_CONCURRENT = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, {root!r})
    from pathlib import Path
    from app.export.cache import META_EXPORT_KEY, ensure_export
    from tests.unit.test_onnx_cache import write_fake_onnx

    def slow_exporter(model_dir, output, **kwargs):
        with open({log!r}, "a") as fh:
            fh.write(f"{{os.getpid()}}\\n")
        time.sleep(1.0)
        write_fake_onnx(output, kwargs["metadata"][META_EXPORT_KEY])

    Path({start!r}).touch()
    while not all(Path(p).exists() for p in {starts!r}):
        time.sleep(0.01)
    found = ensure_export(Path({model!r}), Path({cache!r}), exporter=slow_exporter)
    print(found.source, found.path)
    """
)


def test_two_processes_starting_at_once_export_once_and_share_the_file(model_dir, tmp_path):
    log = tmp_path / "exports.log"
    starts = [str(tmp_path / f"started-{i}") for i in range(2)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _CONCURRENT.format(
                    root=str(ROOT),
                    log=str(log),
                    start=start,
                    starts=starts,
                    model=str(model_dir),
                    cache=str(tmp_path / "cache"),
                ),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        for start in starts
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
    answers = sorted(out.split() for out, _ in outputs)
    assert [a[0] for a in answers] == ["cache", "exported"], answers
    assert answers[0][1] == answers[1][1]
    assert len(log.read_text().split()) == 1, "both processes exported"
    assert recorded_key(Path(answers[0][1])) == export_key(model_dir)
