"""A unimic server whose agent is a plain async Python function: it answers every turn by
saying what it got, in capitals, and sends back a mirrored copy of each image.

    python python/examples/agent_server.py [--listen 127.0.0.1:4433] [--token T]

Connect with the Rust terminal client (`unimic chat ADDR --pin PIN`), the Rust example
(`cargo run -p unimic-examples --example turns -- ADDR PIN --image PHOTO`) or from Python:

    client = await unimic.Client.connect(ADDR, pin=PIN)
    print(await client.ask("hello", images=["photo.jpg"]))
"""

from __future__ import annotations

import argparse
import asyncio

from PIL import ImageOps

import unimic


async def shout(conversation: unimic.Conversation, sink: unimic.Sink) -> None:
    turn = conversation.last
    await sink.text(turn.text.upper() or "(NO TEXT)")
    for grid in turn.images:
        await sink.text(f" [AN IMAGE OF {grid.shape[0]}×{grid.shape[1]} TOKENS]")
        # Decode it (off the event loop), mirror it, send it back (tokenized off the loop too).
        image = await asyncio.to_thread(unimic.detokenize, grid)
        await sink.image(ImageOps.mirror(image))
    await sink.text(f" (turn {len(conversation.turns) // 2 + 1} of this session)")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", default="127.0.0.1:4433")
    ap.add_argument("--token")
    a = ap.parse_args()
    server = await unimic.serve(a.listen, shout, token=a.token)
    print(f"listening on {server.address}")
    print(f"pin {server.pin}")
    print(f"connect with: unimic chat {server.address} --pin {server.pin}"
          + (f" --token {a.token}" if a.token else ""))
    try:
        await server.serve_forever()
    finally:
        await server.close()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
