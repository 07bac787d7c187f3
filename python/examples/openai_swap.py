"""The same question about a photo, sent the way an OpenAI-style client sends it (a Chat
Completions request with the photo as a base64 JPEG data URL) and through unimic (the photo as
entropy-coded tokens over a QUIC session), printing the bytes each puts on the wire.

    python python/examples/openai_swap.py [PHOTO] [--server ADDR --pin PIN]

Without --server it starts a unimic server in this process whose agent is a few lines of
Python (a stand-in for your LMM wrapper). The OpenAI-style request is built exactly as the
OpenAI Python SDK sends it; with the `openai` package installed and OPENAI_API_KEY (and
optionally OPENAI_BASE_URL / OPENAI_MODEL) set, it is also sent for real.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
from pathlib import Path

from PIL import Image

import unimic

QUESTION = "What is in this photo?"
SAMPLE = Path(__file__).resolve().parents[2] / "samples" / "kodim23.png"


def openai_style(photo: Image.Image, model: str) -> dict:
    """The Chat Completions request body the OpenAI SDK sends for a question and a photo."""
    jpeg = io.BytesIO()
    photo.save(jpeg, "JPEG", quality=85)
    url = "data:image/jpeg;base64," + base64.b64encode(jpeg.getvalue()).decode()
    return {
        "model": model,
        "stream": True,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": QUESTION},
                    {"type": "image_url", "image_url": {"url": url}},
                ],
            }
        ],
    }


def send_openai(body: dict) -> None:
    """Sends the request with the OpenAI SDK when it is installed and configured."""
    if not os.environ.get("OPENAI_API_KEY"):
        print("  (set OPENAI_API_KEY to also send it; printing its size only)")
        return
    try:
        from openai import OpenAI  # type: ignore[import-not-found]
    except ImportError:
        print("  (pip install openai to also send it; printing its size only)")
        return
    client = OpenAI()  # OPENAI_BASE_URL is honoured by the SDK
    stream = client.chat.completions.create(**body)
    print("  reply: ", end="")
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()


async def describe(conversation: unimic.Conversation, sink: unimic.Sink) -> None:
    """A stand-in agent: a real one would hand the decoded image to an LMM."""
    turn = conversation.last
    for grid in turn.images:
        image = await asyncio.to_thread(unimic.detokenize, grid)
        await sink.text(f"I got a {image.width}×{image.height} image ({grid.size} tokens) ")
    await sink.text(f"and the question {turn.text!r}.")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("photo", nargs="?", default=str(SAMPLE))
    ap.add_argument("--server", help="a unimic server's address (default: one in this process)")
    ap.add_argument("--pin", help="its certificate pin")
    ap.add_argument("--size", type=int, default=512, help="longest side of the photo sent")
    a = ap.parse_args()

    with Image.open(a.photo) as f:
        photo = f.convert("RGB")
    photo.thumbnail((a.size, a.size))

    body = openai_style(photo, os.environ.get("OPENAI_MODEL", "gpt-4o"))
    body_bytes = len(json.dumps(body).encode())
    print(f"OpenAI-style request: {body_bytes:,} bytes of JSON ({photo.width}×{photo.height} "
          "JPEG-85, base64)")
    send_openai(body)

    server = None
    if a.server:
        addr, pin = a.server, a.pin
    else:
        server = await unimic.serve("127.0.0.1:0", describe)
        addr, pin = server.address, server.pin
    async with await unimic.Client.connect(addr, pin=pin) as client:
        reply = await client.send(QUESTION, images=[photo])
        print("unimic reply: ", end="")
        async for event in reply:
            if isinstance(event, str):
                print(event, end="", flush=True)
        print()
        s = reply.stats
        print(f"unimic turn: {s['sent_wire_bytes']:,} bytes on the wire "
              f"({s['sent_tokens']} tokens), reply {s['received_wire_bytes']:,} bytes; "
              f"{body_bytes / s['sent_wire_bytes']:.0f}× fewer bytes up")
    if server:
        await server.close()


if __name__ == "__main__":
    asyncio.run(main())
