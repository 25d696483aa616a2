"""The model repository: what a path holds (its kind), the models a folder serves, and each
model's settings (the server's, with its optional `serve.json` overrides).

No torch, no HTTP: the supervisor, the front ends and the settings use it. A kind says which
paths it claims (folders, or files by suffix), why a claimed path cannot be served, and how an
engine loads it: Hugging Face folders, and Ultralytics RT-DETR checkpoints (`.pt`); `register_kind`
adds one, after which the repository lists such paths as models too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.errors import describe_validation

if TYPE_CHECKING:
    from app.config import Settings

OVERRIDES_FILE = "serve.json"
# Model names travel in URLs (/v2/models/{name}) and metric labels.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class ModelKind:
    """One way of storing a model. `suffix` "" claims folders, else files ending so;
    `problem(path)` says why a claimed path cannot be served (None: it can); `builder` is
    "module:function", called in the engine process with its Settings to build the engines
    (a list of app.engine.pool.BatchRunner)."""

    name: str
    suffix: str
    problem: Callable[[Path], str | None]
    builder: str

    def claims(self, path: Path) -> bool:
        if self.suffix == "":
            return path.is_dir()
        return path.is_file() and path.name.lower().endswith(self.suffix)

    def build_engines(self, settings: Settings) -> Any:
        module, _, function = self.builder.partition(":")
        return getattr(import_module(module), function)(settings)


def huggingface_problem(path: Path) -> str | None:
    """Why `path` cannot be a Hugging Face model folder, or None."""
    if not path.is_dir():
        return (
            f"{path} is not a directory: point --model / DETR_SERVE_MODEL at a Hugging Face "
            "checkpoint folder holding config.json and preprocessor_config.json, or at an "
            "Ultralytics RT-DETR checkpoint (.pt)"
        )
    missing = [n for n in ("config.json", "preprocessor_config.json") if not (path / n).is_file()]
    if missing:
        return (
            f"{path} lacks {', '.join(missing)}: save the model and its image processor there "
            "with save_pretrained()"
        )
    return None


def ultralytics_problem(path: Path) -> str | None:
    """Why `path` cannot be an Ultralytics RT-DETR checkpoint, or None (read without running
    any of the file's code: app/models/ultralytics.py)."""
    from app.models.ultralytics import UltralyticsCheckpointError, probe

    try:
        if probe(path) is not None:
            return None
    except UltralyticsCheckpointError as exc:
        return str(exc)
    return (
        f"{path} is a file but not an Ultralytics RT-DETR checkpoint (.pt): point --model / "
        "DETR_SERVE_MODEL at one, or at a Hugging Face checkpoint folder"
    )


HUGGINGFACE = ModelKind("huggingface", "", huggingface_problem, "app.engine.build:build_engines")
# Engine.load tells a checkpoint file from a folder itself (app/backends/ultralytics.py).
ULTRALYTICS = ModelKind("ultralytics", ".pt", ultralytics_problem, "app.engine.build:build_engines")
_KINDS: list[ModelKind] = [ULTRALYTICS, HUGGINGFACE]


def register_kind(kind: ModelKind) -> None:
    """Add a kind (a file suffix claims before the folder kind); a kind of the same name is
    replaced."""
    _KINDS[:] = [k for k in _KINDS if k.name != kind.name]
    _KINDS.insert(0, kind)


def kinds() -> list[ModelKind]:
    return list(_KINDS)


def resolve(path: Path) -> tuple[ModelKind, str | None]:
    """The kind of model at `path` and why it cannot be served (None: it can). A path no kind
    claims is taken as the folder kind, whose problem then says what is missing."""
    for kind in _KINDS:
        if kind.claims(path):
            return kind, kind.problem(path)
    return HUGGINGFACE, HUGGINGFACE.problem(path)


def model_problem(path: Path) -> str | None:
    return resolve(path)[1]


def model_name(path: Path) -> str:
    """A model's name: its folder's name, or its file's name without the kind's suffix."""
    for kind in _KINDS:
        if kind.suffix and path.name.lower().endswith(kind.suffix):
            return path.name[: -len(kind.suffix)]
    return path.name


def name_problem(name: str) -> str | None:
    if _NAME_RE.match(name):
        return None
    return (
        f"model name {name!r} is not usable: letters, digits, '.', '_' and '-', starting with a "
        "letter or digit, at most 128 characters"
    )


def scan(repository: Path) -> dict[str, Path]:
    """The models under `repository`, by name: each folder, and each file a kind claims (its
    own file suffix). Hidden entries are skipped; a folder that is not a complete model is
    still listed (it then fails with the reason)."""
    found: dict[str, Path] = {}
    if not repository.is_dir():
        return found
    for entry in sorted(repository.iterdir()):
        if entry.name.startswith("."):
            continue
        claimed = entry.is_dir() or any(k.suffix and k.claims(entry) for k in _KINDS)
        if claimed:
            found.setdefault(model_name(entry), entry)
    return found


class ServeOverrides(BaseModel):
    """What a model's `serve.json` may set; the same limits as the server-wide settings."""

    model_config = ConfigDict(extra="forbid", strict=True)

    max_batch_size: int | None = Field(default=None, ge=1, le=1024)
    max_batch_delay_ms: float | int | None = Field(default=None, ge=0, le=10_000)
    dtype: Literal["auto", "float32", "float16", "bfloat16"] | None = None
    precision: Literal["float", "int8"] | None = None
    default_threshold: float | int | None = Field(default=None, ge=0.0, le=1.0)


def overrides_path(path: Path) -> Path:
    """`serve.json` inside a model folder; `<file>.serve.json` beside a checkpoint file."""
    return path / OVERRIDES_FILE if path.is_dir() else path.with_name(path.name + ".serve.json")


def model_settings(
    base: Settings, name: str, path: Path, **update: Any
) -> tuple[Settings, str | None]:
    """The settings of one model's engines: the server's, with the model's path and name and
    its `serve.json` overrides; `update` is applied last. The reason (second) is set when the
    overrides cannot be used: the settings are then the server's, unchanged but for the path."""
    from app.config import contradictions

    settings = base.model_copy(update={"model": path, "model_name": name, **update})
    file = overrides_path(path)
    if not file.is_file():
        return settings, None
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
        overrides = ServeOverrides.model_validate(raw)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return settings, f"{file} cannot be read as JSON: {exc}"
    except ValidationError as exc:
        return settings, f"{file} is not valid: {describe_validation(exc.errors())}"
    changed = overrides.model_dump(exclude_none=True)
    candidate = settings.model_copy(update=changed)
    problems = contradictions(candidate)
    if problems:
        return settings, f"{file} contradicts the server's settings: {'; '.join(problems)}"
    return candidate, None
