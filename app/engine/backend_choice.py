"""Which backend serves a device, and why: `--backend auto` resolved, the ONNX file found or
exported (app/export/cache.py), and the fallbacks that keep a server alive.

auto: on CUDA, torch (CUDA graphs; the ONNX path is not measured faster there). On the CPU,
onnxruntime on an up-to-date export (found, or exported now into the cache); torch when
onnxruntime is not installed or the export fails, with a warning. onnx: MODEL/model.onnx as it
is when there is one, else the same export, but a failed export stops the start-up (it was asked
for). precision int8 needs the file written by
scripts/export_onnx.py --int8 (calibration images are a script's business); without it the float
model is served, with a warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from app.config import Settings

if TYPE_CHECKING:
    from app.export.cache import OnnxFile

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackendChoice:
    backend: str  # "torch" or "onnx"
    reason: str
    onnx_path: Path | None = None
    int8: bool = False


def onnx_cache_dir(settings: Settings) -> Path:
    from app.export.cache import default_cache_dir

    return (settings.onnx_cache_dir or default_cache_dir()).expanduser()


def choose_backend(settings: Settings, device_type: str) -> BackendChoice:
    s = settings
    if s.backend == "torch":
        return BackendChoice("torch", "--backend torch")
    if s.backend == "auto" and device_type == "cuda":
        return BackendChoice(
            "torch", "auto on CUDA: torch with CUDA graphs (the faster path on a GPU)"
        )
    asked = "--backend onnx" if s.backend == "onnx" else "auto on the CPU"
    missing = _missing_onnx_packages()
    if missing:
        why = f"{', '.join(missing)} not installed (pip install -e '.[onnx]')"
        if s.backend == "onnx":
            raise RuntimeError(f"--backend onnx needs onnxruntime: {why}")
        logger.warning("backend auto: serving with torch: %s", why)
        return BackendChoice("torch", f"auto: torch, since {why}")
    if s.precision == "int8":
        found = _int8_file(s)
        if found is not None:
            return BackendChoice("onnx", f"{asked}: INT8 model {found}", found, int8=True)
    try:
        onnx_file = _float_file(s)
    except Exception as exc:
        if s.backend == "onnx":
            raise
        logger.warning(
            "backend auto: the ONNX export of %s failed, serving with torch instead: %s: %s",
            s.model,
            type(exc).__name__,
            exc,
            exc_info=exc,
        )
        return BackendChoice("torch", f"auto: torch, since the ONNX export failed: {exc}")
    reason = f"{asked}: onnxruntime on {onnx_file.describe()}"
    if s.precision == "int8":
        reason += (
            "; INT8 was asked for but no up-to-date model.int8.onnx exists: run "
            f"`python scripts/export_onnx.py {s.model} --int8` (float32 served meanwhile)"
        )
        logger.warning("precision int8: %s", reason)
    return BackendChoice("onnx", reason, onnx_file.path)


def _missing_onnx_packages() -> list[str]:
    import importlib.util

    return [m for m in ("onnxruntime", "onnx", "onnxscript") if importlib.util.find_spec(m) is None]


def _int8_file(s: Settings) -> Path | None:
    from app.export.cache import find_export

    found = find_export(s.model, onnx_cache_dir(s), "int8")
    if found is None and s.backend == "onnx":
        from app.export.cache import local_export

        local = local_export(s.model, "int8")
        if local.is_file():  # asked for explicitly: serve the user's file, stale or not
            logger.warning("%s is not up to date with %s; serving it as asked", local, s.model)
            return local
    return found.path if found is not None else None


def _float_file(s: Settings) -> OnnxFile:
    from app.export.cache import OnnxFile, ensure_export, local_export

    local = local_export(s.model)
    if s.backend == "onnx" and local.is_file():
        # Asked for explicitly, and the folder has one: serve it as it is (the backend warns
        # when it was exported from other weights).
        return OnnxFile(local, "model folder")
    return ensure_export(s.model, onnx_cache_dir(s))
