"""Waiting in tests: barriers that prove nothing else arrived, and the timed wait kept for where no barrier exists."""

from __future__ import annotations

from collections.abc import Callable

import trio
from trio_websocket import WebSocketConnection

from .clients import request


async def nothing_before_pong(ws: WebSocketConnection) -> None:
    """Ping and assert the next message is the pong: nothing was queued for `ws` before the server read the ping.

    The server handles one connection's messages in order and sends its frames in order, so anything it had queued
    for `ws` (a hub delivery happens at once, in the publishing task) comes before the pong. It proves nothing about
    what other tasks have not done yet: settle those first (the sender's own pong, a later change on the same table).
    """
    assert await request(ws, type="ping", ref="barrier") == {"type": "pong", "ref": "barrier"}


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll `condition` until it holds; fail after `timeout` seconds."""
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.01)


async def nothing_arrives(ws: WebSocketConnection, within: float = 0.3) -> None:
    """Assert that no message arrives within `within` seconds. Only where no barrier can prove the same."""
    with trio.move_on_after(within):
        message = await ws.get_message()
        raise AssertionError(f"expected nothing, got {message!r}")
