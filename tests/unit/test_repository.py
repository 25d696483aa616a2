"""The model repository without processes: kinds, scanning, serve.json overrides, the memory
budget check and the repeated --model flag."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.cli import load_settings
from app.config import REPO_MODELS_DIR, Settings
from app.engine.memory_budget import budget_problem, needed_bytes, weights_bytes
from app.models import repository
from app.models.manager import ControlError, ModelManager
from app.models.repository import ModelKind, model_settings, resolve, scan

DEFAULT = REPO_MODELS_DIR / "rtdetr-shapes"


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    for name in ("alpha", "beta"):
        (root / name).mkdir(parents=True)
        for file in ("config.json", "preprocessor_config.json"):
            shutil.copy(DEFAULT / file, root / name / file)
    return root


@pytest.fixture
def checkpoint_kind() -> Iterator[ModelKind]:
    """A file kind, as the Ultralytics `.pt` kind registers itself."""
    kind = ModelKind(
        "checkpoint",
        ".pt",
        lambda p: None if p.stat().st_size else f"{p} is empty",
        "app.engine.build:build_engines",
    )
    before = repository.kinds()
    repository.register_kind(kind)
    yield kind
    repository._KINDS[:] = before


def test_scan_lists_each_folder_and_skips_hidden_entries_and_stray_files(repo: Path) -> None:
    (repo / ".cache").mkdir()
    (repo / "notes.txt").write_text("not a model")
    assert scan(repo) == {"alpha": repo / "alpha", "beta": repo / "beta"}


def test_scan_lists_checkpoint_files_once_their_kind_is_registered(
    repo: Path, checkpoint_kind: ModelKind
) -> None:
    (repo / "rtdetr-l.pt").write_bytes(b"weights")
    before = set(scan(repo))
    assert before == {"alpha", "beta", "rtdetr-l"}
    kind, problem = resolve(repo / "rtdetr-l.pt")
    assert (kind.name, problem) == ("checkpoint", None)
    (repo / "empty.pt").write_bytes(b"")
    assert resolve(repo / "empty.pt")[1] == f"{repo / 'empty.pt'} is empty"


def test_a_pt_file_is_listed_as_an_ultralytics_model_and_fails_with_the_reason(repo: Path) -> None:
    (repo / "rtdetr-l.pt").write_bytes(b"weights")
    assert scan(repo)["rtdetr-l"] == repo / "rtdetr-l.pt"
    kind, problem = resolve(repo / "rtdetr-l.pt")
    assert kind.name == "ultralytics"
    assert problem is not None and str(repo / "rtdetr-l.pt") in problem


def test_a_file_no_kind_claims_is_not_a_model(repo: Path) -> None:
    (repo / "weights.bin").write_bytes(b"weights")
    assert "weights" not in scan(repo) and "weights.bin" not in scan(repo)
    kind, problem = resolve(repo / "weights.bin")
    assert kind.name == "huggingface"
    assert problem is not None and "is not a directory" in problem


def test_a_folder_without_config_says_what_is_missing(repo: Path) -> None:
    (repo / "alpha" / "config.json").unlink()
    problem = resolve(repo / "alpha")[1]
    assert problem is not None and "lacks config.json" in problem


def test_serve_json_overrides_the_model_settings(repo: Path) -> None:
    (repo / "beta" / "serve.json").write_text(
        json.dumps({"max_batch_size": 4, "max_batch_delay_ms": 2, "default_threshold": 0.25})
    )
    base = Settings(model=DEFAULT)
    settings, reason = model_settings(base, "beta", repo / "beta")
    assert reason is None
    assert (settings.max_batch_size, settings.max_batch_delay_ms) == (4, 2)
    assert settings.default_threshold == 0.25
    assert settings.model == repo / "beta" and settings.served_model_name == "beta"
    assert base.max_batch_size == 8  # the server's own are untouched


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{not json", "cannot be read as JSON"),
        (json.dumps({"max_batch_size": 0}), "max_batch_size: Input should be greater than"),
        (json.dumps({"batch": 4}), "batch: Extra inputs are not permitted"),
        (json.dumps({"dtype": "float8"}), "dtype: Input should be"),
        (json.dumps({"max_batch_size": "4"}), "max_batch_size: Input should be a valid integer"),
        (json.dumps({"max_batch_size": 512}), "max_batch_size (512) is over max_queue_size"),
    ],
)
def test_a_bad_serve_json_is_that_models_failure_with_the_reason(
    repo: Path, content: str, expected: str
) -> None:
    (repo / "alpha" / "serve.json").write_text(content)
    settings, reason = model_settings(Settings(model=DEFAULT), "alpha", repo / "alpha")
    assert reason is not None
    assert str(repo / "alpha" / "serve.json") in reason and expected in reason
    assert settings.max_batch_size == 8  # unchanged


def test_model_names_must_fit_urls_and_labels() -> None:
    assert repository.name_problem("rtdetr-r18_v2.1") is None
    problem = repository.name_problem("bad name")
    assert problem is not None and "'bad name'" in problem
    assert repository.name_problem(".hidden") is not None


def test_model_repository_must_be_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model_repository .* is not a directory"):
        Settings(model_repository=tmp_path / "absent")


def test_several_models_need_engine_processes(repo: Path) -> None:
    with pytest.raises(ValueError, match="several models .* need engine processes"):
        Settings(model_repository=repo, engine_process=False)


def test_model_flag_repeats_into_several_models(repo: Path) -> None:
    settings = load_settings(["--model", str(repo / "alpha"), "--model", str(repo / "beta")])
    assert settings.several_models
    assert settings.model_list == [repo / "alpha", repo / "beta"]
    one = load_settings(["--model", str(repo / "alpha")])
    assert not one.several_models and one.model == (repo / "alpha").resolve()


def test_no_flags_is_the_single_default_model() -> None:
    settings = load_settings([])
    assert not settings.several_models
    assert settings.model == DEFAULT and settings.model_control == "none"


def test_memory_budget_refuses_a_model_that_cannot_fit() -> None:
    mib = 1 << 20
    weights = 80 * mib
    need = needed_bytes(weights, 8)
    assert need == 2 * weights + 8 * 64 * mib
    assert budget_problem("cuda:0", need, weights, 8) is None
    problem = budget_problem("cuda:0", need - 1, weights, 8)
    assert problem is not None
    assert problem.startswith(
        f"cuda:0 has {(need - 1) // mib} MiB free, under the {need // mib} MiB"
    )
    assert "batch of 8" in problem


def test_weights_bytes_counts_weight_files_only(repo: Path) -> None:
    (repo / "alpha" / "model.safetensors").write_bytes(b"x" * 1000)
    assert weights_bytes(repo / "alpha") == 1000
    assert weights_bytes(repo / "alpha" / "model.safetensors") == 1000
    assert weights_bytes(repo / "absent") == 0


def _manager(tmp_path: Path, **values: object) -> ModelManager:
    # No process starts until start(); the metrics are only handed to the engines.
    return ModelManager(Settings(**values), tmp_path, metrics=None)  # type: ignore[arg-type]


def test_manager_serves_the_repository_and_the_models_named_beside_it(
    repo: Path, tmp_path: Path
) -> None:
    assert set(_manager(tmp_path, model_repository=repo).views()) == {"alpha", "beta"}
    extra = tmp_path / "extra" / "gamma"
    shutil.copytree(repo / "alpha", extra)
    both = _manager(tmp_path, model_repository=repo, model=extra)
    assert set(both.views()) == {"alpha", "beta", "gamma"}
    assert all(v.state == "loading" and v.startup for v in both.views().values())
    listed = _manager(tmp_path, models=f"{repo / 'alpha'},{extra}")
    assert set(listed.views()) == {"alpha", "gamma"} and listed.default_model == "alpha"


def test_manager_refuses_an_unknown_default_model_and_an_empty_repository(
    repo: Path, tmp_path: Path
) -> None:
    problem = _manager(tmp_path, model_repository=repo, default_model="nope").problem()
    assert problem == "default_model 'nope' is not among the models served: alpha, beta"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "holds no model folder" in str(_manager(tmp_path, model_repository=empty).problem())
    assert _manager(tmp_path, model_repository=repo, default_model="beta").problem() is None


def test_manager_loads_unknown_names_as_404_naming_the_repository(
    repo: Path, tmp_path: Path
) -> None:
    manager = _manager(tmp_path, model_repository=repo)
    with pytest.raises(ControlError) as refused:
        manager.load("delta")
    assert (refused.value.status, refused.value.message) == (
        404,
        "unknown model 'delta'; the repository holds: alpha, beta",
    )
    with pytest.raises(ControlError, match="unknown model 'delta'"):
        manager.unload("delta")
