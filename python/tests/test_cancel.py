"""Cancellation: of a reply (the server's agent is cancelled), of an await (no event is lost),
and timeouts."""

from __future__ import annotations

import asyncio

import pytest

import unimic
from conftest import run


def test_cancelling_a_reply_cancels_the_agent_and_the_session_goes_on():
    agent_cancelled = asyncio.Event()
    started = []

    async def slow(conversation, sink):
        if conversation.last.text == "quick":
            await sink.text("done")
            return
        started.append(1)
        try:
            for i in range(200):
                await sink.text(f"{i} ")
                await asyncio.sleep(0.02)
        except asyncio.CancelledError:
            agent_cancelled.set()
            raise

    async def main():
        server = await unimic.serve("127.0.0.1:0", slow)
        client = await unimic.Client.connect(server.address, pin=server.pin)
        reply = await client.send("count slowly")
        first = await reply.__anext__()
        assert first == "0 "
        await reply.cancel()
        await asyncio.wait_for(agent_cancelled.wait(), 5)
        with pytest.raises(unimic.ReplyCancelledError):
            await reply.__anext__()
        assert await client.ask("quick") == "done"
        for _ in range(100):
            if len(server.turns()) == 2:
                break
            await asyncio.sleep(0.02)
        assert [t["outcome"] for t in server.turns()] == ["cancelled", "answered"]
        await client.close()
        await server.close()

    run(main())


def test_cancelling_a_pending_iteration_cancels_it_and_loses_no_event():
    async def agent(conversation, sink):
        for word in ("one ", "two ", "three"):
            await asyncio.sleep(0.15)
            await sink.text(word)

    async def main():
        server = await unimic.serve("127.0.0.1:0", agent)
        client = await unimic.Client.connect(server.address, pin=server.pin)
        reply = await client.send("count")
        got = []
        timeouts = 0
        while True:
            try:
                ev = await asyncio.wait_for(reply.__anext__(), 0.02)
            except asyncio.TimeoutError:
                timeouts += 1
                continue
            except StopAsyncIteration:
                break
            got.append(ev)
        assert "".join(got) == "one two three"
        assert timeouts > 5
        await client.close()
        await server.close()

    run(main())


def test_a_reply_that_does_not_come_in_time_raises_timeout_error():
    async def sleepy(conversation, sink):
        await asyncio.sleep(2)
        await sink.text("late")

    async def main():
        server = await unimic.serve("127.0.0.1:0", sleepy)
        client = await unimic.Client.connect(server.address, pin=server.pin, reply_timeout=0.2)
        with pytest.raises(unimic.TimeoutError) as e:
            await client.ask("hello?")
        assert isinstance(e.value, TimeoutError)  # also the builtin
        await client.close()
        await server.close()

    run(main())


def test_closing_the_client_ends_a_waiting_reply_with_closed_error():
    async def never(conversation, sink):
        await asyncio.sleep(30)

    async def main():
        server = await unimic.serve("127.0.0.1:0", never)
        client = await unimic.Client.connect(server.address, pin=server.pin)
        reply = await client.send("wait")
        pending = asyncio.ensure_future(reply.text())
        await asyncio.sleep(0.1)
        await client.close()
        with pytest.raises(unimic.ClosedError):
            await asyncio.wait_for(pending, 5)
        await server.close()

    run(main())
