"""The server: answer every session with an agent that is a Python object (or function) with an
async ``respond(conversation, sink)``, or one of the built-in Rust agents.

.. code-block:: python

    import asyncio, unimic

    async def shout(conversation: unimic.Conversation, sink: unimic.Sink) -> None:
        for item in conversation.last.content:
            if isinstance(item, str):
                await sink.text(item.upper())

    async def main():
        server = await unimic.serve("127.0.0.1:4433", shout)
        print("unimic.Client.connect(%r, pin=%r)" % (server.address, server.pin))
        await server.serve_forever()

    asyncio.run(main())

The agent runs on the event loop that called :func:`serve`. Each ``await sink.text(...)`` /
``await sink.image(...)`` returns once the output is written to the connection (a slow client
slows the agent down). When the client cancels the turn, the agent's task is cancelled
(``asyncio.CancelledError`` inside ``respond``). An exception raised by the agent is reported
to the client, which gets :class:`AgentError` with its text; the session goes on.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
from PIL import Image

from . import _native
from ._images import ImageLike, grid_array, grid_bytes, to_rgb
from ._loop import bridge
from .errors import ContentError
from .models import Models, PathLike, _models

__all__ = [
    "Attachment",
    "Conversation",
    "Turn",
    "Sink",
    "Server",
    "serve",
    "EchoAgent",
    "LocalAgent",
    "REQUEST_MEDIA_TYPE",
]

REQUEST_MEDIA_TYPE: str = _native.REQUEST_MEDIA_TYPE
"""Media type of a request for a token-native agent (inpaint, outpaint, generate, vary)."""


@dataclass(frozen=True)
class Attachment:
    """A part of a turn that is neither text nor an image: a request for a token-native agent
    (``media_type == REQUEST_MEDIA_TYPE``, ``data`` its JSON) or a raw attachment."""

    media_type: str
    data: bytes

    def json(self) -> Any:
        """``data`` parsed as JSON."""
        return json.loads(self.data)


Content = Union[str, "np.ndarray", Attachment]
"""One item of a turn: text (``str``), an image as its token grid (``numpy.ndarray`` of
``uint32``, ``(rows, cols)``, or ``(levels, rows, cols)`` for an image sent with several levels
of the quality ladder, base first; decode it with ``unimic.detokenize``, off the loop:
``await asyncio.to_thread(unimic.detokenize, grid)``), or an :class:`Attachment`."""


@dataclass
class Turn:
    """One turn of the conversation."""

    role: str
    """``"user"``, ``"assistant"`` or ``"system"``."""
    content: List[Content] = field(default_factory=list)

    @property
    def text(self) -> str:
        """The turn's text items, joined."""
        return "".join(c for c in self.content if isinstance(c, str))

    @property
    def images(self) -> List["np.ndarray"]:
        """The turn's images (token grids)."""
        return [c for c in self.content if isinstance(c, np.ndarray)]


@dataclass
class Conversation:
    """The conversation so far, oldest turn first: the last turn is the one to answer."""

    turns: List[Turn] = field(default_factory=list)

    @property
    def last(self) -> Turn:
        """The turn to answer."""
        return self.turns[-1]

    def last_image(self) -> Optional["np.ndarray"]:
        """The most recent image of the conversation (of either side), as its token grid."""
        for t in reversed(self.turns):
            for c in reversed(t.content):
                if isinstance(c, np.ndarray):
                    return c
        return None

    @classmethod
    def _from_items(cls, items: list) -> "Conversation":
        turns = []
        for role, raw in items:
            content: List[Content] = []
            for it in raw:
                if isinstance(it, str):
                    content.append(it)
                elif it[0] == "grid":
                    content.append(grid_array(it[1], it[2], it[3]))
                elif it[0] == "levels":
                    content.append(grid_array(it[2], it[3], it[4], it[1]))
                elif it[0] == "request":
                    content.append(Attachment(REQUEST_MEDIA_TYPE, bytes(it[1])))
                else:
                    content.append(Attachment(it[1], bytes(it[2])))
            turns.append(Turn(role, content))
        return cls(turns)


class Sink:
    """Where an agent writes its reply. Every method is awaited; it returns once the output is
    written to the connection, and raises :class:`ClosedError` once the client has cancelled
    the turn or gone (the agent should then return, or let it propagate)."""

    def __init__(self, native: _native.Sink) -> None:
        self._native = native
        # Rows of the image being drawn with `image_rows`, so far.
        self._rows = 0

    async def text(self, delta: str) -> None:
        """Appends a piece of text to the reply (deltas are streamed as they come)."""
        if not isinstance(delta, str):
            raise ContentError(f"text must be a str, not {type(delta).__name__}")
        await self._native.text(bridge(), delta)

    async def image(self, image: Union[ImageLike, "np.ndarray"], *, max_side: int = 1024) -> None:
        """Appends an image: a token grid (a 2-D integer array of any dtype but ``uint8``, as
        :func:`unimic.tokenize` gives; sent as it is) or pixels (PIL image, path, image file
        bytes, ``uint8`` array ``(h, w, 3)``, ``(h, w, 4)`` or ``(h, w)``; scaled down to
        ``max_side`` and tokenized off the loop)."""
        if isinstance(image, np.ndarray) and image.ndim == 2 and image.dtype != np.uint8:
            rows, cols, ids = grid_bytes(image)
            await self._native.grid(bridge(), rows, cols, ids)
            return
        w, h, rgb = to_rgb(image)
        await self._native.pixels(bridge(), w, h, rgb, max_side)

    async def image_rows(self, rows: "np.ndarray", *, height: int) -> None:
        """Appends the next rows of an image of ``height`` rows that the agent draws row by row:
        ``rows`` is a 2-D integer token array ``(n, width)``. The server may send the rows so far
        before the rest are drawn (it streams an image whose first rows took a while), so the
        client sees the picture grow; the call that brings the rows to ``height`` ends the
        image."""
        a = np.asarray(rows)
        if a.ndim != 2 or a.shape[0] == 0:
            raise ContentError(f"rows must be a non-empty 2-D token array, not shape {a.shape}")
        if not isinstance(height, int) or height < 1 or self._rows + a.shape[0] > height:
            raise ContentError(
                f"{self._rows + a.shape[0]} rows for an image of height {height!r}"
            )
        n, width, ids = grid_bytes(a)
        self._rows += n
        last = self._rows == height
        if last:
            self._rows = 0
        await self._native.rows(bridge(), height, width, n, ids, last)


Agent = Union[
    Callable[[Conversation, Sink], Awaitable[None]],
    Any,  # an object with an async respond(conversation, sink)
]


class EchoAgent:
    """The built-in echo agent (Rust): replies with the turn's text and images."""

    def __init__(self) -> None:
        self._native = _native.EchoAgent()


class LocalAgent:
    """The built-in local token-native agent (Rust) on the shipped masked and text-conditioned
    entropy models: answers requests to inpaint, outpaint, vary and generate images; it is not a
    language model and says so when asked a question."""

    def __init__(self) -> None:
        self._native = _native.LocalAgent()


def _entry(agent: Any) -> Callable[[list, _native.Sink], Awaitable[None]]:
    respond = getattr(agent, "respond", None)
    if respond is None:
        if not callable(agent):
            raise ContentError(
                "the agent must have an async respond(conversation, sink) or be an async "
                "function (conversation, sink)"
            )
        respond = agent

    def entry(items: list, native_sink: _native.Sink) -> Awaitable[None]:
        result = respond(Conversation._from_items(items), Sink(native_sink))
        if not inspect.isawaitable(result):
            raise TypeError(
                f"the agent's respond returned {type(result).__name__}, not an awaitable: "
                "make it `async def`"
            )
        return result

    return entry


class Server:
    """A running server (made by :func:`serve`). Stop it with :meth:`close` (or ``async
    with``)."""

    def __init__(self, native: _native.Server) -> None:
        self._native = native

    @property
    def address(self) -> str:
        """The address it listens on, ``"host:port"``."""
        return self._native.address

    @property
    def pin(self) -> str:
        """The SHA-256 of its certificate, which clients pin (``Client.connect(..., pin=)``)."""
        return self._native.pin

    @property
    def closed(self) -> bool:
        """Whether it has stopped."""
        return self._native.closed

    def turns(self) -> List[Dict[str, Any]]:
        """The turns answered so far (the most recent 1,000), oldest first: ``turn``,
        ``reply``, ``remote``, ``bytes_in``, ``bytes_out``, ``seconds`` and ``outcome``
        (``"answered"``, ``"cancelled"``, ``"agent failed: ..."``, ``"failed: ..."``)."""
        return list(self._native.turns())

    async def serve_forever(self) -> None:
        """Waits until the server is closed."""
        await self._native.wait(bridge())

    async def close(self) -> None:
        """Stops accepting, closes every session (``GOING_AWAY``) and returns once the socket
        is released."""
        await self._native.close(bridge())

    async def __aenter__(self) -> "Server":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


async def serve(
    addr: str,
    agent: Agent,
    *,
    token: Union[str, bytes, None] = None,
    models: Union[Models, PathLike, None] = None,
    cert: Optional[PathLike] = None,
    key: Optional[PathLike] = None,
) -> Server:
    """Listens on ``addr`` (``"host:port"``; port 0 picks one) and answers every session with
    ``agent``: an object with an async ``respond(conversation, sink)``, an async function
    ``(conversation, sink)``, :class:`EchoAgent` or :class:`LocalAgent`. Its TLS certificate is
    the PEM chain ``cert`` with its private key ``key`` (for example one a CA signed for the
    server's name; clients verify it with ``Client.connect(..., ca=...)``), or without them a
    fresh self-signed one; either way clients may pin :attr:`Server.pin`. With ``token``, only
    clients that send it are accepted. Returns once listening. Keep the returned
    :class:`Server`: it stops when it is closed or garbage-collected.

    Raises :class:`ContentError` for an unreadable ``cert``/``key`` or one without the other."""
    m = _models(models)
    if isinstance(agent, (EchoAgent, LocalAgent)):
        target: Any = agent._native
    else:
        target = _entry(agent)
    if isinstance(token, str):
        token = token.encode()
    native = await _native.serve(
        bridge(),
        addr,
        target,
        m._native,
        token,
        None if cert is None else str(cert),
        None if key is None else str(key),
    )
    return Server(native)
