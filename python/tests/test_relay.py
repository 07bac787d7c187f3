"""The relay bridge: how the package wakes an event loop that cannot watch a descriptor
(Windows' proactor loop, or any loop whose ``add_reader`` raises ``NotImplementedError``).
Linux runs it here by asking for it (``UNIMIC_BRIDGE=relay``) and with a loop that refuses
``add_reader``."""

from __future__ import annotations

import asyncio
import gc
import os
import time

import numpy as np
from PIL import Image

import unimic
from unimic import _loop
from conftest import skip_unless_linux


async def echo(conversation, sink):
    await sink.text(conversation.last.text)
    for g in conversation.last.images:
        await sink.image(g)


async def session(photo) -> None:
    """A server and a client on the running loop: text turns, an image each way, a grid."""
    assert _loop.bridge().fileno() is None, "a relay bridge has no descriptor"
    server = await unimic.serve("127.0.0.1:0", echo)
    client = await unimic.Client.connect(server.address, pin=server.pin)
    for i in range(20):
        assert await client.ask(f"turn {i}") == f"turn {i}"
    events = await (await client.send("look", images=[photo])).collect()
    assert events[0] == "look" and isinstance(events[1], Image.Image)
    grid = unimic.tokenize(photo)
    events = await (await client.send("grid", grids=[grid], decode_images=False)).collect()
    assert np.array_equal(events[1], grid)
    await client.close()
    await server.close()


def relay_threads() -> int:
    """Threads of this process named as the relay names its own."""
    n = 0
    for t in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{t}/comm") as f:
                n += f.read().strip() == "unimic-relay"
        except OSError:
            pass
    return n


def test_a_session_runs_through_a_relay_bridge_when_asked_for(monkeypatch, photo):
    monkeypatch.setenv("UNIMIC_BRIDGE", "relay")
    asyncio.run(asyncio.wait_for(session(photo), 120))


class NoReaderLoop(asyncio.SelectorEventLoop):
    """A loop that cannot watch descriptors, as Windows' proactor loop cannot."""

    def add_reader(self, fd, callback, *args):
        raise NotImplementedError


def test_a_loop_without_add_reader_gets_a_relay_bridge(photo):
    loop = NoReaderLoop()
    try:
        loop.run_until_complete(asyncio.wait_for(session(photo), 120))
    finally:
        loop.close()


@skip_unless_linux
def test_the_relay_thread_ends_with_its_loop(monkeypatch, photo):
    monkeypatch.setenv("UNIMIC_BRIDGE", "relay")
    gc.collect()
    before = relay_threads()

    async def main():
        await session(photo)
        assert relay_threads() == before + 1

    for _ in range(3):
        asyncio.run(asyncio.wait_for(main(), 120))
    gc.collect()
    deadline = time.monotonic() + 5
    while relay_threads() > before and time.monotonic() < deadline:
        time.sleep(0.05)
        gc.collect()
    assert relay_threads() == before, "a relay thread outlived its loop"
