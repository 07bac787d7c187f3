"""No threads or sockets are left behind once clients, servers and event loops are closed."""

from __future__ import annotations

import asyncio
import gc
import time

import unimic
from conftest import run, skip_unless_linux, sockets, threads


async def echo(conversation, sink):
    await sink.text(conversation.last.text)
    for g in conversation.last.images:
        await sink.image(g)


async def settle(want_threads: int, want_sockets: int, seconds: float = 5.0):
    """Waits until the counts are back to at most the wanted ones (idle blocking-pool threads
    leave after a second); returns the last counts."""
    deadline = time.monotonic() + seconds
    while True:
        t, s = threads(), sockets()
        if (t <= want_threads and s <= want_sockets) or time.monotonic() > deadline:
            return t, s
        await asyncio.sleep(0.05)


@skip_unless_linux
def test_clients_and_servers_leave_no_threads_or_sockets_after_close(photo):
    async def session(server):
        client = await unimic.Client.connect(server.address, pin=server.pin)
        assert await client.ask("hi") == "hi"
        await (await client.send("img", images=[photo])).collect()
        await client.close()

    async def main():
        # Warm up: the runtime's worker threads, the models and this loop's bridge exist from
        # here on, for the life of the process / loop.
        server = await unimic.serve("127.0.0.1:0", echo)
        await session(server)
        await server.close()
        base_t, base_s = await settle(0, 0, seconds=1.5)
        for _ in range(3):
            server = await unimic.serve("127.0.0.1:0", echo)
            for _ in range(3):
                await session(server)
            await server.close()
        t, s = await settle(base_t, base_s)
        assert s <= base_s, f"{s - base_s} socket(s) left open"
        assert t <= base_t, f"{t - base_t} thread(s) left running"

    run(main())


@skip_unless_linux
def test_a_closed_event_loop_releases_its_bridge():
    async def main():
        server = await unimic.serve("127.0.0.1:0", echo)
        client = await unimic.Client.connect(server.address, pin=server.pin)
        assert await client.ask("x") == "x"
        await client.close()
        await server.close()

    run(main())  # the runtime and models are up from here on
    gc.collect()
    before = sockets()
    for _ in range(3):
        run(main())
    gc.collect()
    deadline = time.monotonic() + 5
    while sockets() > before and time.monotonic() < deadline:
        time.sleep(0.05)
        gc.collect()
    assert sockets() <= before, f"{sockets() - before} socket(s) left by closed loops"
