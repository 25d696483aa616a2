"""The engine socket's Channel: messages of one loop turn leave in one write; frames split
anywhere by the socket arrive whole and in order; a message before listen() waits for it."""

from __future__ import annotations

import asyncio
from typing import Any

from app.ipc.wire import Channel, pack_message


class FakeTransport:
    def __init__(self) -> None:
        self.writes: list[list[bytes]] = []
        self.closing = False

    def writelines(self, buffers: list[bytes]) -> None:
        self.writes.append(list(buffers))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True


async def test_messages_sent_in_one_loop_turn_leave_in_one_write() -> None:
    channel, transport = Channel(), FakeTransport()
    channel.connection_made(transport)  # type: ignore[arg-type]
    for i in range(5):
        channel.send(("ok", i, [1.5, "x"]))
    assert transport.writes == []  # not before the end of the turn
    await asyncio.sleep(0)
    assert len(transport.writes) == 1
    assert b"".join(transport.writes[0]) == b"".join(
        pack_message(("ok", i, [1.5, "x"])) for i in range(5)
    )
    channel.send(("idle",))
    await asyncio.sleep(0)
    assert len(transport.writes) == 2
    transport.closing = True
    channel.send(("dropped",))  # the connection has ended: nothing is written
    await asyncio.sleep(0)
    assert len(transport.writes) == 2


async def test_frames_split_anywhere_arrive_whole_and_in_order() -> None:
    channel = Channel()
    channel.connection_made(FakeTransport())  # type: ignore[arg-type]
    messages: list[Any] = [("submit", i, "r" * i, b"\x00" * (i * 1000)) for i in range(20)]
    stream = b"".join(pack_message(m) for m in messages)
    got: list[Any] = []
    first = channel.next_message()  # before listen(): the handshake reads this way
    for start in range(0, len(stream), 777):  # chunks that cut headers and payloads
        channel.data_received(stream[start : start + 777])
    assert await first == messages[0]
    channel.listen(got.append)  # the messages that waited come first, in order
    assert got == messages[1:]
    channel.connection_lost(None)
    assert channel.closed.done()
