"""Settings and the CLI: flags mirror the environment; bad values fail with a fix-it message."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.cli import build_parser, load_settings
from app.config import Settings


def test_every_setting_has_a_flag() -> None:
    help_text = build_parser().format_help()
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in help_text
        assert "DETR_SERVE_" + name.upper() in help_text


def test_environment_is_read_and_flags_win(tiny_model_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("DETR_SERVE_PORT", "9001")
    monkeypatch.setenv("DETR_SERVE_MAX_BATCH_SIZE", "4")
    s = load_settings(["--model", str(tiny_model_dir), "--port", "9002", "--json-logs"])
    assert s.port == 9002 and s.max_batch_size == 4 and s.json_logs is True
    assert s.served_model_name == tiny_model_dir.name


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "70000"], "--port / DETR_SERVE_PORT"),
        (["--grpc-port", "-1"], "--grpc-port / DETR_SERVE_GRPC_PORT"),
        (["--port", "9000", "--grpc-port", "9000"], "give gRPC another port"),
        (["--device", "tpu"], "use one of auto, cpu, cuda or cuda:N"),
        (["--max-batch-size", "0"], "--max-batch-size"),
        (["--default-threshold", "2"], "--default-threshold"),
        (["--device", "cpu", "--dtype", "float16"], "float16 is not supported on the CPU"),
    ],
)
def test_invalid_values_fail_with_a_message(tiny_model_dir, capsys, argv, message) -> None:
    with pytest.raises(SystemExit) as info:
        load_settings(["--model", str(tiny_model_dir), *argv])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_model_dir_says_how_to_fix(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        load_settings(["--model", str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert "is not a directory" in err and "--model" in err
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SystemExit):
        load_settings(["--model", str(tmp_path)])
    assert "lacks preprocessor_config.json" in capsys.readouterr().err


def test_readme_configuration_table_lists_every_setting() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for name in Settings.model_fields:
        flag = "--" + name.replace("_", "-")
        assert f"| `{flag}` | `DETR_SERVE_{name.upper()}` |" in readme, flag
