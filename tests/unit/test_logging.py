"""Logs: JSON lines carry the request id of the request being served."""

from __future__ import annotations

import json
import logging

from app.logging_setup import configure_logging, request_id_var


def test_json_logs_carry_the_request_id(capsys) -> None:
    configure_logging("info", json_logs=True)
    token = request_id_var.set("req-42")
    try:
        logging.getLogger("app.test").info("hello %s", "world")
    finally:
        request_id_var.reset(token)
        configure_logging("warning", json_logs=False)
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["message"] == "hello world"
    assert line["request_id"] == "req-42"
    assert line["level"] == "info" and line["logger"] == "app.test"
