"""Logs: JSON lines carry the request id of the request being served."""

from __future__ import annotations

import json
import logging

import pytest

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


INJECTED = [
    ("\n2026-01-01 00:00:00 WARNING forged", "\\n2026-01-01 00:00:00 WARNING forged"),
    ("\r\nforged", "\\r\\nforged"),
    ("\x1b[2J\x1b[31mred", "\\x1b[2J\\x1b[31mred"),
    ("a\x85b\u2028c\u2029d\x00e\x7f", "a\\x85b\\u2028c\\u2029d\\x00e\\x7f"),
]


@pytest.mark.parametrize(("text", "escaped"), INJECTED)
@pytest.mark.parametrize("json_logs", [False, True])
def test_client_text_stays_on_one_line(capsys, text: str, escaped: str, json_logs: bool) -> None:
    configure_logging("info", json_logs=json_logs)
    try:
        logging.getLogger("app.test").info("GET %s -> 404", "/v1/x" + text)
    finally:
        configure_logging("warning", json_logs=False)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n"), repr(err)
    line = err[:-1]
    assert not any(c in line for c in "\r\x1b\x85\u2028\u2029\x00\x7f"), repr(line)
    message = json.loads(line)["message"] if json_logs else line
    assert "/v1/x" + escaped + " -> 404" in message


def test_a_traceback_keeps_its_lines(capsys) -> None:
    configure_logging("info", json_logs=False)
    try:
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("app.test").exception("failed on %s", "a\nb")
    finally:
        configure_logging("warning", json_logs=False)
    err = capsys.readouterr().err
    assert "failed on a\\nb\nTraceback (most recent call last):\n" in err
