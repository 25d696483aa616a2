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


# Each pair: settings that contradict, and the two names the message must give.
CONTRADICTIONS = [
    (
        {"max_images_per_request": 300, "max_queue_size": 256},
        "max_images_per_request",
        "max_queue_size",
    ),
    (
        {"max_batch_size": 64, "max_queue_size": 32, "max_images_per_request": 16},
        "max_batch_size",
        "max_queue_size",
    ),
    (
        {"max_batch_delay_ms": 2000, "request_timeout_s": 2},
        "max_batch_delay_ms",
        "request_timeout_s",
    ),
    (
        {"max_request_pixels": 10, "max_inflight_pixels": 5, "max_image_pixels": 5},
        "max_request_pixels",
        "max_inflight_pixels",
    ),
    (
        {"max_download_buffer_bytes": 1 << 20, "max_upload_bytes": 2 << 20},
        "max_download_buffer_bytes",
        "max_upload_bytes",
    ),
    ({"protect_metrics": True}, "protect_metrics", "api_key"),
    ({"image_decoder": "nvjpeg", "device": "cpu"}, "image_decoder", "device"),
    ({"image_decoder": "nvjpeg", "devices": "0,1"}, "image_decoder", "devices"),
]


@pytest.mark.parametrize(("values", "first", "second"), CONTRADICTIONS)
def test_contradicting_settings_are_refused_naming_both(
    tiny_model_dir: Path, values: dict[str, object], first: str, second: str
) -> None:
    with pytest.raises(ValueError) as info:
        Settings(model=tiny_model_dir, **values)
    message = str(info.value)
    assert first in message and second in message


def test_the_defaults_contradict_nothing(tiny_model_dir: Path) -> None:
    from app.config import contradictions

    assert contradictions(Settings(model=tiny_model_dir)) == []


def test_every_contradiction_is_listed_at_once(tiny_model_dir: Path, capsys) -> None:
    argv = ["--model", str(tiny_model_dir), "--max-images-per-request", "300", "--protect-metrics"]
    with pytest.raises(SystemExit) as info:
        load_settings(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "max_images_per_request (300) is over max_queue_size (256)" in err
    assert "--max-images-per-request / DETR_SERVE_MAX_IMAGES_PER_REQUEST" in err
    assert "--max-queue-size / DETR_SERVE_MAX_QUEUE_SIZE" in err
    assert "protect_metrics is set but api_key is not" in err


def test_the_console_script_exits_2_naming_both_settings(tiny_model_dir: Path) -> None:
    """The real `detr-serve` process, settings from the environment and a flag."""
    import os
    import subprocess

    from scripts.bench.serverproc import detr_serve_command

    env = {**os.environ, "DETR_SERVE_MAX_QUEUE_SIZE": "8"}
    done = subprocess.run(
        [*detr_serve_command(), "--model", str(tiny_model_dir), "--max-images-per-request", "9"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "max_images_per_request (9) is over max_queue_size (8)" in done.stderr
    assert done.stdout == ""
