"""Exported once, reused: where the onnx backend finds an up-to-date ONNX file of a model.

An export is up to date when the key in its metadata equals the key of the model as it is now:
a SHA-256 over the exporter's version, torch's version, the opset, the precision, the input size
and the SHA-256 of every file the graph is made from (config, image processor, weights). Looked
for in order: the model folder's own file (``model.onnx``, ``model.int8.onnx``: the Docker image
exports there at build time), then the cache folder (``--onnx-cache-dir``; the model folder may
be read-only), else the float32 model is exported into the cache. Exports are written to a
temporary file and renamed, under a file lock: a second process starting at the same time waits
for the first one's export and reuses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

# Bump when the exporter writes a different graph for the same model (app/export/onnx_export.py,
# app/ops/onnx_function.py): every cached export is then stale.
EXPORTER_VERSION = "2"
META_EXPORT_KEY = "detr_serve.export_key"
Precision = Literal["float32", "int8"]
FILE_NAMES: dict[str, str] = {"float32": "model.onnx", "int8": "model.int8.onnx"}
# Files whose bytes make the graph; weights in any of transformers' layouts.
_GRAPH_FILES = ("config.json", "preprocessor_config.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# An export of a large model on a slow machine takes minutes; a holder that dies frees the lock.
LOCK_TIMEOUT_S = 1800.0


def default_cache_dir() -> Path:
    """The user's cache folder ($XDG_CACHE_HOME/detr-serve/onnx, ~/.cache/... on Linux)."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("detr-serve", appauthor=False)) / "onnx"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def local_export(model: Path, precision: Precision = "float32") -> Path:
    """Where a model keeps its own export: MODEL_DIR/model.onnx for a folder; beside a checkpoint
    file (an Ultralytics ``x.pt``: ``x.onnx``, ``x.int8.onnx``)."""
    model = Path(model)
    if model.is_file():
        return model.with_name(model.stem + FILE_NAMES[precision].removeprefix("model"))
    return model / FILE_NAMES[precision]


def model_files(model_dir: Path) -> list[Path]:
    """The files of ``model_dir`` an export is made from, sorted by name (a checkpoint file: the
    file itself)."""
    if model_dir.is_file():
        return [model_dir]
    weights = [
        p
        for p in model_dir.iterdir()
        if p.is_file()
        and (p.name.endswith(_WEIGHT_SUFFIXES) or p.name.endswith(".index.json"))
        and not p.name.startswith(".")
    ]
    graph = [model_dir / n for n in _GRAPH_FILES if (model_dir / n).is_file()]
    return sorted(graph + weights, key=lambda p: p.name)


def export_key(model_dir: Path, precision: Precision = "float32", opset: int | None = None) -> str:
    """The key an export of ``model_dir`` at ``precision`` must carry to be reused."""
    import torch

    from app.engine.preprocess_spec import PreprocessSpec
    from app.export.onnx_export import DEFAULT_OPSET, input_size

    parts = {
        "exporter": EXPORTER_VERSION,
        "torch": torch.__version__,
        "opset": opset or DEFAULT_OPSET,
        "precision": precision,
        "input_size": list(input_size(PreprocessSpec.for_model(model_dir))),
        "files": {p.name: sha256_file(p) for p in model_files(model_dir)},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def recorded_key(path: Path) -> str | None:
    """The key in an ONNX file's metadata (None: none, or not a readable ONNX file)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # a truncated or foreign file is simply not up to date
        return None
    return next((p.value for p in proto.metadata_props if p.key == META_EXPORT_KEY), None)


def cache_path(cache_dir: Path, model_dir: Path, key: str, precision: Precision) -> Path:
    """One folder per key: copies of a model (same bytes, any folder) share their export."""
    return Path(cache_dir) / key[:32] / FILE_NAMES[precision]


@dataclass(frozen=True)
class OnnxFile:
    path: Path
    source: str  # "model folder", "cache", "exported"

    def describe(self) -> str:
        return f"{self.path} ({self.source})"


def find_export(
    model_dir: Path, cache_dir: Path, precision: Precision, key: str | None = None
) -> OnnxFile | None:
    """The up-to-date export of ``model_dir`` at ``precision``, in the model folder or the
    cache, or None."""
    key = key or export_key(model_dir, precision)
    local = local_export(model_dir, precision)
    if local.is_file():
        if recorded_key(local) == key:
            return OnnxFile(local, "model folder")
        logger.info("%s is not up to date with %s (export key differs)", local, model_dir)
    cached = cache_path(cache_dir, model_dir, key, precision)
    if cached.is_file() and recorded_key(cached) == key:
        return OnnxFile(cached, "cache")
    return None


def ensure_export(
    model_dir: Path,
    cache_dir: Path,
    *,
    exporter: Callable[..., object] | None = None,
    log: Callable[[str], None] | None = None,
) -> OnnxFile:
    """The up-to-date float32 export of ``model_dir``: found, or exported into ``cache_dir`` now
    (once across processes). Raises what the export raised (the caller decides on a fallback)."""
    from filelock import FileLock

    model_dir = Path(model_dir)
    key = export_key(model_dir, "float32")
    found = find_export(model_dir, cache_dir, "float32", key)
    if found is not None:
        return found
    target = cache_path(cache_dir, model_dir, key, "float32")
    target.parent.mkdir(parents=True, exist_ok=True)
    say = log or (lambda line: logger.info("onnx export: %s", line.strip()))
    with FileLock(str(target.parent / ".export.lock"), timeout=LOCK_TIMEOUT_S):
        if target.is_file() and recorded_key(target) == key:  # another process exported it
            return OnnxFile(target, "cache")
        if exporter is None:
            from app.export import onnx_export

            exporter = onnx_export.export_onnx
        say(f"exporting {model_dir} to {target} (no up-to-date export; once per model)")
        summary = exporter(model_dir, target, verify=True, log=say, metadata={META_EXPORT_KEY: key})
        for line in getattr(summary, "lines", list)():
            say(line)
    return OnnxFile(target, "exported")
