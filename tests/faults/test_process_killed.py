"""fluxrt killed with SIGKILL under load and started again (as operators run it: `python -m fluxrt_trio --config`):
the Python client reconnects, resumes from the last row it had and tells the application so
(Resubscribed(recovered=True)), and every committed row arrives once, in order, across the kill."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import trio
import yaml

from fluxrt_trio.client import Backoff, Change, Resubscribed, open_client

from ..process import FluxrtProcess, Remote
from ..support.clients import url
from ..support.config import SECRET, token
from .support import PrivatePostgres, Writer


def write_config(path: Path, dsn: str, port: int) -> None:
    path.write_text(
        yaml.safe_dump(
            {
                "server": {"host": "127.0.0.1", "port": port},
                "auth": {"jwt_secret": SECRET},
                "database": {"dsn": dsn, "poll_interval": "10ms"},
                "log": {"format": "json", "level": "info"},
            }
        )
    )


async def test_sigkilled_under_load_the_client_resubscribes_and_says_so(private_pg: PrivatePostgres, tmp_path, nursery):
    table = private_pg.table(grant="anon, authenticated")
    config = tmp_path / "fluxrt.yaml"
    write_config(config, private_pg.dsn, 0)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUXRT_")}
    argv = [sys.executable, "-m", "fluxrt_trio", "--config", str(config)]
    first = FluxrtProcess(argv, env)
    second: FluxrtProcess | None = None
    writer = Writer(private_pg.dsn, table)
    events: list[Any] = []
    try:
        await first.start(nursery)
        await first.wait_for("changefeed connected")
        assert first.port is not None
        async with open_client(
            url(Remote(first.port)), token=token("alice"), backoff=Backoff(base=0.05, cap=0.3)
        ) as client:
            channel = client.channel(f"table:public.{table}")
            with channel.events() as stream:
                await channel.subscribe()

                async def collect() -> None:
                    async for event in stream:
                        events.append(event)

                async with trio.open_nursery() as inner:
                    inner.start_soon(collect)
                    inner.start_soon(writer.run)
                    with trio.fail_after(15):
                        while len(events) < 100:
                            await trio.sleep(0.01)
                    first.kill()
                    await first.wait()
                    # The same port, as a supervisor restarting the unit would.
                    write_config(config, private_pg.dsn, first.port)
                    second = await FluxrtProcess(argv, env).start(inner)
                    await second.wait_for("changefeed connected")
                    with trio.fail_after(15):
                        while not any(isinstance(e, Resubscribed) for e in events):
                            await trio.sleep(0.01)
                    resubscribed_at = writer.committed
                    await writer.wait_committed(resubscribed_at + 100)
                    expected = await writer.finish()
                    after = [i for i in expected if i > resubscribed_at]
                    with trio.fail_after(10):
                        while not {e.record["id"] for e in events if isinstance(e, Change)} >= set(after):
                            await trio.sleep(0.01)
                    inner.cancel_scope.cancel()
            assert client.last_close is not None and client.last_close.code == 1006
    finally:
        writer.stop.set()
        first.kill()
        if second is not None:
            second.kill()
    markers = [i for i, e in enumerate(events) if isinstance(e, Resubscribed)]
    assert len(markers) == 1, markers
    [marker] = markers
    # The client resumed from the last row it had: the change log still held what it missed.
    assert events[marker] == Resubscribed(recovered=True)
    assert all(isinstance(e, Change) for e in events if not isinstance(e, Resubscribed)), [
        e for e in events if not isinstance(e, Change | Resubscribed)
    ][:3]
    before = [e.record["id"] for e in events[:marker]]
    since = [e.record["id"] for e in events[marker + 1 :]]
    # Every committed row once, in commit order, across the kill: those committed while fluxrt was down were
    # replayed after Resubscribed, then the live stream went on.
    assert before + since == expected[: len(before) + len(since)]
    assert set(i for i in expected if i > resubscribed_at) <= set(since)
    print(f"\n{len(before)} rows before the kill, {len(since)} after Resubscribed, {len(expected)} committed")
