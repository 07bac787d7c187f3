"""Sessions over loopback QUIC: the Python client against the Rust server (`unimic serve`), the
Rust client (the `turns` example) against a Python agent, and Python on both ends."""

from __future__ import annotations

import asyncio
import json
import subprocess
from typing import List

import numpy as np
import pytest
from PIL import Image

import unimic
from conftest import SAMPLE, gradient, run


def test_python_client_and_the_rust_server(rust_server, photo):
    addr, pin = rust_server

    async def main():
        async with await unimic.Client.connect(addr, pin=pin) as client:
            reply = await client.send("What is in this photo?", images=[photo])
            events = await reply.collect()
            assert events[0] == "What is in this photo?"
            (img,) = [e for e in events if isinstance(e, Image.Image)]
            grid = unimic.tokenize(photo)
            assert img.size == (grid.shape[1] * 16, grid.shape[0] * 16)
            stats = reply.stats
            assert stats["sent_wire_bytes"] > 0 and stats["received_wire_bytes"] > 0
            assert stats["sent_wire_bytes"] < 400, stats  # a photo and a question
            # The echo returns the grid token for token.
            reply = await client.send("again", grids=[grid], decode_images=False)
            events = await reply.collect()
            assert events[0] == "again"
            assert np.array_equal(events[1], grid) and events[1].dtype == np.uint32
            # Context reuse: the same text again costs fewer bytes.
            r1 = await client.send("the same words once more")
            await r1.text()
            r2 = await client.send("the same words once more")
            assert await r2.text() == "the same words once more"
            assert r2.stats["sent_wire_bytes"] <= r1.stats["sent_wire_bytes"]

    run(main())


def test_rust_client_and_a_python_agent(rust_bins, photo, tmp_path):
    image = tmp_path / "photo.png"
    photo.save(image)
    seen: List[unimic.Conversation] = []

    async def agent(conversation: unimic.Conversation, sink: unimic.Sink) -> None:
        seen.append(conversation)
        turn = conversation.last
        await sink.text(f"python heard {turn.text!r}")
        for g in turn.images:
            await sink.text(f" and saw a {g.shape[0]}x{g.shape[1]} image")
            await sink.image(g)

    async def main():
        server = await unimic.serve("127.0.0.1:0", agent)
        proc = await asyncio.create_subprocess_exec(
            str(rust_bins["turns"]), server.address, server.pin, "--text", "hi from rust",
            "--grid", str(image), "--turns", "2", "--warmup", "0",
            stdout=subprocess.PIPE,
        )
        out, _ = await proc.communicate()
        assert proc.returncode == 0
        lines = [json.loads(l) for l in out.decode().splitlines()]
        turns = [l for l in lines if "turn" in l]
        assert len(turns) == 2
        for t in turns:
            assert t["text"].startswith("python heard 'hi from rust' and saw a ")
            assert len(t["images"]) == 1
        assert [t["outcome"] for t in server.turns()] == ["answered", "answered"]
        # The agent saw the whole conversation: its own first reply, image included.
        second = seen[1]
        assert [t.role for t in second.turns] == ["user", "assistant", "user"]
        assert isinstance(second.turns[1].content[-1], np.ndarray)
        await server.close()
        assert server.closed

    run(main(), timeout=600)


def test_python_on_both_ends_with_an_object_agent_and_pil_replies(models):
    class Painter:
        async def respond(self, conversation, sink):
            await sink.text("here: ")
            await sink.image(gradient(32, 32))

    async def main():
        server = await unimic.serve("127.0.0.1:0", Painter())
        client = await unimic.Client.connect(server.address, pin=server.pin)
        events = await (await client.send("paint")).collect()
        assert events[0] == "here: "
        assert isinstance(events[1], Image.Image) and events[1].size == (32, 32)
        assert await client.ask("and again") == "here: "
        await client.close()
        await server.close()

    run(main())


def test_agent_exceptions_reach_the_client_and_the_session_goes_on():
    async def moody(conversation, sink):
        if "fail" in conversation.last.text:
            raise RuntimeError("the model is on fire")
        await sink.text("fine")

    async def main():
        server = await unimic.serve("127.0.0.1:0", moody)
        client = await unimic.Client.connect(server.address, pin=server.pin)
        with pytest.raises(unimic.AgentError, match="the model is on fire") as e:
            await (await client.send("please fail")).text()
        assert e.value.code == "AGENT_FAILED"
        assert await client.ask("now work") == "fine"
        outcomes = [t["outcome"] for t in server.turns()]
        assert outcomes[0] == "agent failed: backend error: RuntimeError: the model is on fire"
        assert outcomes[1] == "answered"
        await client.close()
        await server.close()

    run(main())


def test_the_agent_sees_the_newest_turns_within_the_history_limits():
    async def recall(conversation, sink):
        await sink.text(f"{len(conversation.turns)} {conversation.turns[0].text}")

    async def main():
        server = await unimic.serve("127.0.0.1:0", recall, history_turns=3)
        client = await unimic.Client.connect(server.address, pin=server.pin)
        said = [await client.ask(f"t{i}") for i in range(4)]
        # t0, its reply, t1, its reply, t2, …: the agent sees the newest three turns.
        assert said == ["1 t0", "3 t0", "3 t1", "3 t2"]
        await client.close()
        await server.close()
        with pytest.raises(unimic.ContentError, match="at least 1"):
            await unimic.serve("127.0.0.1:0", recall, history_bytes=0)

    run(main())


def test_a_sync_agent_is_refused_with_a_clear_error():
    def not_async(conversation, sink):
        return None

    async def main():
        server = await unimic.serve("127.0.0.1:0", not_async)
        client = await unimic.Client.connect(server.address, pin=server.pin)
        with pytest.raises(unimic.AgentError, match="async"):
            await client.ask("hello")
        await client.close()
        await server.close()

    run(main())


def test_the_local_agent_generates_an_image_on_request():
    async def main():
        server = await unimic.serve("127.0.0.1:0", unimic.LocalAgent())
        client = await unimic.Client.connect(server.address, pin=server.pin)
        reply = await client.send(
            "a red bird", request={"task": {"generate": {"height": 2, "width": 3}}, "seed": 1},
            decode_images=False,
        )
        grids = [e for e in await reply.collect() if isinstance(e, np.ndarray)]
        assert len(grids) == 1 and grids[0].shape == (2, 3)
        with pytest.raises(unimic.ContentError):
            await client.send("x", request={"task": {"no such task": {}}})
        await client.close()
        await server.close()

    run(main(), timeout=300)


def test_image_rows_arrive_before_the_whole_image_when_asked_for():
    """The local agent samples a 40×40 image for a few hundred ms: the server streams it, and
    with ``image_rows=True`` the client sees its rows grow before the whole grid; without, the
    same reply has no row events."""

    async def main():
        server = await unimic.serve("127.0.0.1:0", unimic.LocalAgent())
        client = await unimic.Client.connect(server.address, pin=server.pin)
        request = {"task": {"generate": {"height": 40, "width": 40}}, "seed": 3}
        reply = await client.send("a bird", request=request, decode_images=False, image_rows=True)
        events = await reply.collect()
        rows = [e for e in events if isinstance(e, unimic.ImageRows)]
        (grid,) = [e for e in events if isinstance(e, np.ndarray)]
        assert rows, events
        at = {id(e): i for i, e in enumerate(events)}
        assert at[id(rows[-1])] < at[id(grid)], "the rows come before the whole grid"
        assert [r.rows for r in rows] == sorted({r.rows for r in rows})
        for r in rows:
            assert (r.height, r.width) == (40, 40) and r.tokens.shape == (r.rows, 40)
            assert (r.tokens == grid[: r.rows]).all()
        reply = await client.send("a bird", request=request, decode_images=False)
        events = await reply.collect()
        assert not any(isinstance(e, unimic.ImageRows) for e in events)
        (again,) = [e for e in events if isinstance(e, np.ndarray)]
        assert (again == grid).all(), "the same seed samples the same image"
        await client.close()
        await server.close()

    run(main(), timeout=300)


def test_a_python_agent_streams_an_image_row_by_row():
    """A Python agent hands over an image a row at a time, pausing between rows: the server
    streams it, the client sees the rows grow and then the whole grid; rows past the image's
    height are refused in the agent with ContentError."""
    grid = (np.arange(12 * 10, dtype=np.uint32) * 7 % 1024).reshape(12, 10)
    refused = []

    async def agent(conversation, sink):
        await sink.text("drawing")
        for r in range(12):
            await asyncio.sleep(0.02)
            await sink.image_rows(grid[r : r + 1], height=12)
        try:
            await sink.image_rows(np.vstack([grid, grid[:1]]), height=12)
        except unimic.ContentError as e:
            refused.append(str(e))

    async def main():
        server = await unimic.serve("127.0.0.1:0", agent)
        client = await unimic.Client.connect(server.address, pin=server.pin)
        reply = await client.send("draw", decode_images=False, image_rows=True)
        events = await reply.collect()
        rows = [e for e in events if isinstance(e, unimic.ImageRows)]
        grids = [e for e in events if isinstance(e, np.ndarray)]
        assert len(grids) == 1, [getattr(e, "shape", e) for e in events]
        assert (grids[0] == grid).all()
        assert rows, events
        for r in rows:
            assert (r.tokens == grid[: r.rows]).all()
        assert refused and "13 rows for an image of height 12" in refused[0]
        await client.close()
        await server.close()

    run(main(), timeout=120)


def test_a_python_agent_edits_an_image_whole_and_cell_by_cell():
    """A Python agent edits the conversation's last image: whole with ``sink.edit`` and cell by
    cell with ``sink.edit_cells`` (pausing between cells, so the server streams the edit). The
    client gets the whole edited grid each time, for far fewer bytes than the image itself; an
    edit that changes a cell outside its region, a region of the wrong shape and too many cells
    are refused in the agent with ContentError."""
    grid = (np.arange(12 * 10, dtype=np.uint32) * 37 % 1024).reshape(12, 10)
    region = np.zeros((12, 10), dtype=bool)
    region[4:7, 3:6] = True
    new_cells = np.arange(9, dtype=np.uint32) + 500
    edited = grid.copy()
    edited[region] = new_cells
    refused: List[str] = []
    refs: List[unimic.ImageRef] = []

    async def agent(conversation: unimic.Conversation, sink: unimic.Sink) -> None:
        ref = conversation.last_image_ref()
        refs.append(ref)
        request = conversation.last.text
        if request == "echo":
            await sink.text("here it is")
            await sink.image(conversation.last.images[0])
            return
        base = conversation.image(ref)
        for nowhere in (unimic.ImageRef(-1, 0), unimic.ImageRef(0, 0), unimic.ImageRef(99, 0)):
            try:  # a negative index, the user's text, past the end: no image there
                conversation.image(nowhere)
            except unimic.ContentError as e:
                refused.append(str(e))
        if request == "edit whole":
            bad = edited.copy()
            bad[0, 0] ^= 1
            try:
                await sink.edit(bad, region)
            except unimic.ContentError as e:
                refused.append(str(e))
            try:
                await sink.edit(edited, region[:-1])
            except unimic.ContentError as e:
                refused.append(str(e))
            out = base.copy()
            out[region] = new_cells
            await sink.edit(out, region, base=ref)
        else:
            try:
                await sink.edit_cells(np.arange(10), region=region)
            except unimic.ContentError as e:
                refused.append(str(e))
            for i, c in enumerate(new_cells):
                await asyncio.sleep(0.02)
                if i == 3:
                    # Refused without moving the edit on: an id past the codebook, and
                    # anything else before the edit is complete.
                    for bad in (sink.edit_cells([5000], region=region), sink.text("meanwhile")):
                        try:
                            await bad
                        except unimic.ContentError as e:
                            refused.append(str(e))
                await sink.edit_cells([c], region=region)

    async def main():
        server = await unimic.serve("127.0.0.1:0", agent)
        client = await unimic.Client.connect(server.address, pin=server.pin)
        reply = await client.send("echo", grids=[grid], decode_images=False)
        events = await reply.collect()
        assert np.array_equal(events[-1], grid)
        whole_bytes = reply.stats["received_wire_bytes"]
        # The last image is now the agent's own (turn 1, item 1 after its text).
        reply = await client.send("edit whole", decode_images=False)
        (got,) = [e for e in await reply.collect() if isinstance(e, np.ndarray)]
        assert np.array_equal(got, edited)
        edit_bytes = reply.stats["received_wire_bytes"]
        assert edit_bytes < whole_bytes, (edit_bytes, whole_bytes)
        assert reply.stats["received_tokens"] == 9, reply.stats  # only the region's cells
        reply = await client.send("edit by cells", decode_images=False, image_rows=True)
        events = await reply.collect()
        grids = [e for e in events if isinstance(e, np.ndarray)]
        assert len(grids) == 1 and np.array_equal(grids[0], edited), events
        partial = [e for e in events if isinstance(e, unimic.ImageRows)]
        assert partial, "a streamed edit shows its progress"
        assert reply.stats["received_tokens"] == 9, reply.stats
        await client.close()
        await server.close()

    run(main(), timeout=120)
    assert refs[1] == unimic.ImageRef(1, 1) and refs[2] == unimic.ImageRef(3, 0), refs
    assert any("outside its region" in r for r in refused), refused
    assert any("region's shape" in r for r in refused), refused
    assert any("10 cells for an edit of a region of 9" in r for r in refused), refused
    assert any("5000" in r for r in refused), refused
    assert sum("the conversation has no image at" in r for r in refused) == 6, refused
    assert any("text while the edit begun with edit_cells is not complete (3 of 9" in r
               for r in refused), refused


def test_an_edit_goes_whole_when_the_session_has_no_masked_model(tmp_path):
    """A client without the masked model: the agent's edits (whole and cell by cell) still reach
    it, as whole images (the sink collects the cells and sends the grid)."""
    models = unimic.models_path()
    folder = tmp_path / "models"
    (folder / "entropy").mkdir(parents=True)
    for d in ("taef2", "tokenizer-taef2"):
        (folder / d).symlink_to((models / d).resolve())
    for f in (models / "entropy").iterdir():
        if "masked" not in f.name:
            (folder / "entropy" / f.name).symlink_to(f.resolve())
    grid = (np.arange(6 * 5, dtype=np.uint32) * 11 % 1024).reshape(6, 5)
    region = np.zeros((6, 5), dtype=bool)
    region[1:3, 2:4] = True
    edited = grid.copy()
    edited[region] = [900, 901, 902, 903]

    async def agent(conversation, sink):
        if conversation.last.text == "by cells":
            for c in edited[region]:
                await asyncio.sleep(0.06)
                await sink.edit_cells([c], region=region)
        elif conversation.last.text == "half":
            await sink.edit_cells(edited[region][:2], region=region)
        else:
            await sink.edit(edited, region)

    async def main():
        server = await unimic.serve("127.0.0.1:0", agent)
        client = await unimic.Client.connect(
            server.address, pin=server.pin, models=unimic.Models(folder)
        )
        for text in ("whole", "by cells"):
            reply = await client.send(text, grids=[grid], decode_images=False, image_rows=True)
            events = await reply.collect()
            grids = [e for e in events if isinstance(e, np.ndarray)]
            assert len(grids) == 1 and np.array_equal(grids[0], edited), (text, events)
            assert reply.stats["received_tokens"] == grid.size, reply.stats  # the whole grid
        # An agent that returns with its edit half made: the client is told, not left waiting.
        with pytest.raises(unimic.AgentError, match="the edit begun is not complete .2 of 4 cells"):
            await (await client.send("half", grids=[grid])).collect()
        await client.close()
        await server.close()

    run(main(), timeout=120)


def test_the_event_loop_is_not_blocked_while_images_are_coded():
    """A ticker on the loop keeps ticking while the client tokenizes a photo, the agent
    tokenizes its reply image and the client detokenizes it (each several hundred ms)."""

    async def agent(conversation, sink):
        await sink.image(SAMPLE, max_side=256)

    async def main():
        server = await unimic.serve("127.0.0.1:0", agent)
        client = await unimic.Client.connect(server.address, pin=server.pin)
        gaps = []
        stop = asyncio.Event()

        async def ticker():
            loop = asyncio.get_running_loop()
            last = loop.time()
            while not stop.is_set():
                await asyncio.sleep(0.005)
                now = loop.time()
                gaps.append(now - last)
                last = now

        t = asyncio.create_task(ticker())
        reply = await client.send("look", images=[SAMPLE], max_side=256)
        events = await reply.collect()
        stop.set()
        await t
        assert any(isinstance(e, Image.Image) for e in events)
        assert len(gaps) > 20
        assert max(gaps) < 0.1, f"the loop stalled for {max(gaps) * 1000:.0f} ms"
        await client.close()
        await server.close()

    run(main(), timeout=300)


def test_images_sent_with_quality_levels_reach_a_python_agent_as_one_ladder(photo):
    seen: List[tuple] = []

    async def shapes(conversation, sink):
        for item in conversation.last.content:
            if isinstance(item, np.ndarray):
                seen.append(item.shape)
                # The levels decode together (sharper than the base grid alone).
                img = await asyncio.to_thread(unimic.detokenize, item)
                await sink.text(f"{img.size[0]}x{img.size[1]} ")

    async def main():
        server = await unimic.serve("127.0.0.1:0", shapes)
        client = await unimic.Client.connect(server.address, pin=server.pin)
        reply = await client.send("look", [photo], levels=3, max_side=128)
        assert (await reply.text()).strip() == "128x96"
        grids = await asyncio.to_thread(unimic.tokenize, photo, levels=2, max_side=64)
        reply = await client.send(grids=[grids, grids[0]])
        assert await reply.text() == "64x48 64x48 "
        with pytest.raises(unimic.ContentError):
            await client.send("x", [photo], levels=0)
        await client.close()
        await server.close()

    run(main())
    assert seen == [(3, 6, 8), (2, 3, 4), (3, 4)]
