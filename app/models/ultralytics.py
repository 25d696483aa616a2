"""Ultralytics RT-DETR checkpoints: given a path, whether it is one, what it says, how to load it.

An Ultralytics checkpoint is a ``torch.save`` zip of a dict whose ``"model"`` (or ``"ema"``) is a
pickled ``ultralytics.nn.tasks.RTDETRDetectionModel`` (``RTDETR(...).save(path)``, or a training
run's ``best.pt``). :func:`probe` reads the pickle's structure without importing torch or
ultralytics and without running any of its code (every class is a stub), so a front end can learn
the input size and labels, and the settings can refuse a wrong file at start-up. Loading
(:meth:`UltralyticsCheckpoint.load`) does unpickle it with Ultralytics' own loader: serve only
checkpoints you trust, as with ``torch.load``. Ultralytics is AGPL-3.0: the optional extra
``pip install .[ultralytics]``, imported only here, when a ``.pt`` is served.

Pre-processing is Ultralytics' for RT-DETR (``RTDETRPredictor``: ``LetterBox(scale_fill=True)``):
the image stretched to the square ``imgsz`` with OpenCV's INTER_LINEAR, RGB, divided by 255, no
mean or std. Post-processing follows ``RTDETRPredictor.postprocess`` of the installed version
(app/backends/ultralytics.py tells which of its two layouts).
"""

from __future__ import annotations

import math
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.engine.preprocess_spec import BILINEAR, FixedSize, PreprocessSpec

if TYPE_CHECKING:
    from app.backends.torch_backend import TorchBackend
    from app.engine.postprocess import PostprocessSpec

SUFFIXES = (".pt", ".pth")
RTDETR_CLASS = "ultralytics.nn.tasks.RTDETRDetectionModel"
# Ultralytics' default imgsz (cfg/default.yaml), and the stride its check_imgsz rounds up to
# (RT-DETR's deepest feature map).
DEFAULT_IMGSZ = 640
STRIDE = 32
# The pickle of a checkpoint is small (the tensors are separate zip members): bound what we read.
_MAX_PICKLE_BYTES = 64 << 20
# Classes the stub reader builds for real: plain containers, nothing that runs code.
_REAL_CLASSES: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): dict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "dict"): dict,
    ("builtins", "list"): list,
    ("builtins", "tuple"): tuple,
}


class UltralyticsCheckpointError(ValueError):
    """The file is an Ultralytics checkpoint that cannot be served (not an RT-DETR, unreadable)."""


@dataclass(frozen=True)
class UltralyticsCheckpoint:
    """What an Ultralytics RT-DETR checkpoint says about itself, read without loading it."""

    path: Path
    model_class: str  # dotted name of the pickled model class
    input_size: tuple[int, int]  # (height, width) the image is stretched to
    labels: dict[int, str]
    version: str | None  # the Ultralytics version that saved it

    @property
    def architecture(self) -> str:
        saved = f", saved by Ultralytics {self.version}" if self.version else ""
        return f"{self.model_class.rsplit('.', 1)[-1]} (Ultralytics checkpoint{saved})"

    def preprocess_spec(self) -> PreprocessSpec:
        """Ultralytics' LetterBox(scale_fill=True): stretched with OpenCV, /255, no mean/std."""
        height, width = self.input_size
        return PreprocessSpec(
            resize=FixedSize(height, width),
            resample=BILINEAR,
            resize_with="opencv",
            do_rescale=True,
            rescale_factor=1 / 255,
            do_normalize=False,
            do_pad=False,
        )

    def load(
        self, device: str = "auto", dtype: str = "auto", msda_kernel: bool = False
    ) -> tuple[TorchBackend, PostprocessSpec]:
        """The model on `device` behind the torch backend's interface, and how its outputs
        become boxes (imports torch and ultralytics)."""
        from app.backends.ultralytics import load_checkpoint

        return load_checkpoint(self, device=device, dtype=dtype, msda_kernel=msda_kernel)


def probe(path: Path | str) -> UltralyticsCheckpoint | None:
    """The checkpoint at `path` when it is an Ultralytics RT-DETR checkpoint; None when `path` is
    no Ultralytics checkpoint at all (a folder, another file). Raises UltralyticsCheckpointError
    for an Ultralytics checkpoint that cannot be served (a YOLO model, a damaged file)."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES or not path.is_file():
        return None
    try:
        top = _read_pickle(path)
    except (zipfile.BadZipFile, KeyError, OSError, pickle.UnpicklingError, EOFError) as exc:
        raise UltralyticsCheckpointError(
            f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(top, dict):
        return None
    model = top.get("ema") or top.get("model")
    if not isinstance(model, _Stub) or not model.qualname.startswith("ultralytics."):
        return None
    if model.qualname != RTDETR_CLASS:
        raise UltralyticsCheckpointError(
            f"{path} holds an Ultralytics {model.qualname.rsplit('.', 1)[-1]}; detr-serve serves "
            "RT-DETR checkpoints (RTDETRDetectionModel) only"
        )
    state = model.state if isinstance(model.state, dict) else {}
    return UltralyticsCheckpoint(
        path=path.resolve(),
        model_class=model.qualname,
        input_size=_input_size(top, state),
        labels=_labels(state),
        version=str(top["version"]) if top.get("version") else None,
    )


def is_checkpoint(path: Path | str) -> bool:
    """Whether `path` is an Ultralytics checkpoint (of any kind: probe says whether it serves)."""
    try:
        return probe(path) is not None
    except UltralyticsCheckpointError:
        return True


def preprocess_spec_for(path: Path) -> PreprocessSpec | None:
    """The pre-processing of the checkpoint at `path`, or None when it is not one."""
    checkpoint = probe(path)
    return checkpoint.preprocess_spec() if checkpoint is not None else None


class _Stub:
    """Any object of the pickle: the name of its class, its arguments and its state, no code."""

    qualname = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _StubUnpickler(pickle.Unpickler):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._classes: dict[str, type[_Stub]] = {}

    def find_class(self, module: str, name: str) -> Any:
        real = _REAL_CLASSES.get((module, name))
        if real is not None:
            return real
        qualname = f"{module}.{name}"
        if qualname not in self._classes:
            self._classes[qualname] = type(name, (_Stub,), {"qualname": qualname})
        return self._classes[qualname]

    def persistent_load(self, pid: Any) -> None:
        return None  # tensor storages: zip members we never read


def _read_pickle(path: Path) -> Any:
    with zipfile.ZipFile(path) as archive:
        name = next((n for n in archive.namelist() if n.endswith("/data.pkl")), None)
        if name is None:
            raise KeyError("no data.pkl member (not a torch.save zip)")
        info = archive.getinfo(name)
        if info.file_size > _MAX_PICKLE_BYTES:
            raise OSError(f"its pickle is {info.file_size} bytes, over {_MAX_PICKLE_BYTES}")
        with archive.open(name) as fh:
            return _StubUnpickler(fh).load()


def _as_dict(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    if isinstance(value, _Stub) and isinstance(value.state, dict):  # a SimpleNamespace
        return value.state
    return {}


def _input_size(top: dict[str, Any], state: dict[str, Any]) -> tuple[int, int]:
    """Where Ultralytics' predictor takes imgsz from: the training arguments saved with the
    checkpoint, else the model's args, else its default; rounded up to the stride (check_imgsz)."""
    imgsz = _as_dict(top.get("train_args")).get("imgsz") or _as_dict(state.get("args")).get("imgsz")
    if imgsz is None:
        imgsz = DEFAULT_IMGSZ
    sides = [imgsz, imgsz] if isinstance(imgsz, int | float) else list(imgsz)
    if len(sides) == 1:
        sides = sides * 2
    if len(sides) != 2 or not all(isinstance(s, int | float) and s > 0 for s in sides):
        raise UltralyticsCheckpointError(f"imgsz={imgsz!r} in the checkpoint is not a size")
    height, width = (max(math.ceil(s / STRIDE) * STRIDE, STRIDE) for s in sides)
    return height, width


def _labels(state: dict[str, Any]) -> dict[int, str]:
    names = state.get("names")
    if isinstance(names, dict) and names:
        return {int(k): str(v) for k, v in names.items()}
    if isinstance(names, list | tuple) and names:
        return {i: str(v) for i, v in enumerate(names)}
    nc = _as_dict(state.get("yaml")).get("nc")
    if isinstance(nc, int) and nc > 0:
        return {i: str(i) for i in range(nc)}
    raise UltralyticsCheckpointError("the checkpoint's model has no class names (names, nc)")
