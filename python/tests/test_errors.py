"""Bad input and refused connections raise the documented exceptions (unimic.errors)."""

from __future__ import annotations

import socket

import numpy as np
import pytest

import unimic
from conftest import run


async def echo(conversation, sink):
    await sink.text(conversation.last.text)


def test_a_wrong_pin_is_refused_with_connect_error():
    async def main():
        server = await unimic.serve("127.0.0.1:0", echo)
        wrong = "00" * 32
        with pytest.raises(unimic.ConnectError) as e:
            await unimic.Client.connect(server.address, pin=wrong, timeout=5)
        assert isinstance(e.value, unimic.UnimicError) and isinstance(e.value, ConnectionError)
        # The right pin still works.
        client = await unimic.Client.connect(server.address, pin=server.pin)
        assert await client.ask("ok") == "ok"
        await client.close()
        await server.close()

    run(main())


def test_a_malformed_pin_or_address_is_content_or_connect_error():
    async def main():
        with pytest.raises(unimic.ContentError):
            await unimic.Client.connect("127.0.0.1:9", pin="not-a-pin")
        with pytest.raises(unimic.ConnectError):
            await unimic.Client.connect("no port here", pin="00" * 32)

    run(main())


def test_nobody_listening_times_out():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    addr = "127.0.0.1:%d" % s.getsockname()[1]  # a UDP port that never answers

    async def main():
        with pytest.raises(unimic.TimeoutError):
            await unimic.Client.connect(addr, pin="00" * 32, timeout=0.5)

    try:
        run(main())
    finally:
        s.close()


def test_a_server_with_a_token_refuses_clients_without_it():
    async def main():
        server = await unimic.serve("127.0.0.1:0", echo, token="s3cret")
        with pytest.raises(unimic.ConnectError) as e:
            await unimic.Client.connect(server.address, pin=server.pin)
        assert e.value.code == "UNAUTHORIZED"
        with pytest.raises(unimic.ConnectError):
            await unimic.Client.connect(server.address, pin=server.pin, token="wrong")
        client = await unimic.Client.connect(server.address, pin=server.pin, token="s3cret")
        assert await client.ask("in") == "in"
        await client.close()
        await server.close()

    run(main())


def test_a_closed_client_raises_closed_error():
    async def main():
        server = await unimic.serve("127.0.0.1:0", echo)
        client = await unimic.Client.connect(server.address, pin=server.pin)
        await client.close()
        assert client.closed
        with pytest.raises(unimic.ClosedError):
            await client.send("hello")
        await client.close()  # twice is fine
        await server.close()

    run(main())


def test_a_closed_server_ends_its_sessions():
    async def main():
        server = await unimic.serve("127.0.0.1:0", echo)
        client = await unimic.Client.connect(server.address, pin=server.pin)
        assert await client.ask("before") == "before"
        await server.close()
        with pytest.raises(unimic.ClosedError):
            for _ in range(50):  # the go-away reaches the client within a round trip
                await client.ask("after")
        await client.close()

    run(main())


def test_bad_turn_content_is_content_error(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")

    async def main():
        server = await unimic.serve("127.0.0.1:0", echo)
        client = await unimic.Client.connect(server.address, pin=server.pin)
        for kwargs in (
            {"images": [str(text)]},
            {"images": [object()]},
            {"grids": [np.zeros(3, np.uint32)]},
            {"grids": [np.full((2, 2), 99999, np.uint32)]},
            {"request": "{not json"},
            {},
            {"text": 42},
        ):
            with pytest.raises(unimic.ContentError):
                await client.send(**kwargs)
        # The session is unharmed.
        assert await client.ask("still here") == "still here"
        await client.close()
        await server.close()

    run(main())


def test_agents_must_be_callable():
    async def main():
        with pytest.raises(unimic.ContentError):
            await unimic.serve("127.0.0.1:0", 42)

    run(main())


def test_a_sink_after_its_reply_is_closed():
    kept = []

    async def leaky(conversation, sink):
        kept.append(sink)
        await sink.text("bye")

    async def main():
        server = await unimic.serve("127.0.0.1:0", leaky)
        client = await unimic.Client.connect(server.address, pin=server.pin)
        assert await client.ask("hi") == "bye"
        with pytest.raises(unimic.ClosedError):
            await kept[0].text("too late")
        await client.close()
        await server.close()

    run(main())
