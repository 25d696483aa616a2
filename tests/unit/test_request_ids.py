"""New request ids: uuid4().hex's shape, unique within a process and across processes."""

from __future__ import annotations

import multiprocessing
import re

from app.api.http.middleware import client_request_id, new_request_id


def test_new_ids_are_32_hex_digits_and_unique() -> None:
    ids = [client_request_id(None) for _ in range(10_000)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == len(ids)
    assert client_request_id("my-id.1") == "my-id.1"
    assert client_request_id("bad id\n") != "bad id\n"


def _child_id(queue: multiprocessing.Queue) -> None:
    queue.put(new_request_id())


def test_a_forked_or_spawned_process_draws_another_prefix() -> None:
    here = new_request_id()
    for method in ("fork", "spawn"):
        ctx = multiprocessing.get_context(method)
        queue = ctx.Queue()
        child = ctx.Process(target=_child_id, args=(queue,))
        child.start()
        there = queue.get(timeout=60)
        child.join(60)
        assert there[:16] != here[:16], method
    assert new_request_id()[:16] == here[:16]  # the parent keeps its own
