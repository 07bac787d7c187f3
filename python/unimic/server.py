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
from typing import Any, Awaitable, Callable, Dict, List, Optional, Sequence, Tuple, Union

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
    "ImageRef",
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


@dataclass(frozen=True)
class ImageRef:
    """Where an image sits in a :class:`Conversation`: ``conversation.turns[turn].content[item]``
    (what :meth:`Sink.edit` and :meth:`Sink.edit_cells` edit)."""

    turn: int
    item: int


@dataclass
class Turn:
    """One turn of the conversation."""

    role: str
    """``"user"``, ``"assistant"`` or ``"system"``."""
    content: List[Content] = field(default_factory=list)
    # The index of each item in the server's copy of the turn (edits name images by it).
    _at: List[int] = field(default_factory=list, repr=False, compare=False)

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
        """The most recent image of the conversation (of either side), as its token grid
        (``(levels, rows, cols)`` for an image sent with several levels of the quality ladder;
        ``conversation.image(conversation.last_image_ref())`` gives its level 1, the grid an
        edit starts from)."""
        ref = self.last_image_ref()
        return None if ref is None else self.turns[ref.turn].content[ref.item]

    def last_image_ref(self) -> Optional[ImageRef]:
        """Where the most recent image of the conversation sits (the image an edit changes
        unless told otherwise), or ``None``."""
        for t in range(len(self.turns) - 1, -1, -1):
            content = self.turns[t].content
            for i in range(len(content) - 1, -1, -1):
                if isinstance(content[i], np.ndarray):
                    return ImageRef(t, i)
        return None

    def image(self, ref: ImageRef) -> "np.ndarray":
        """The token grid of the image at ``ref`` (level 1 of an image sent with several
        levels): the grid an edit of it starts from. :class:`ContentError` if there is none."""
        item = None
        ok = isinstance(ref, ImageRef) and all(
            isinstance(i, int) and i >= 0 for i in (ref.turn, ref.item)
        )
        if ok and ref.turn < len(self.turns) and ref.item < len(self.turns[ref.turn].content):
            item = self.turns[ref.turn].content[ref.item]
        if not isinstance(item, np.ndarray):
            raise ContentError(f"the conversation has no image at {ref}")
        return item[0] if item.ndim == 3 else item

    def _native_ref(self, ref: ImageRef) -> Tuple[int, int]:
        self.image(ref)
        at = self.turns[ref.turn]._at
        if ref.item >= len(at):
            raise ContentError(f"the image at {ref} is not one the server holds")
        return ref.turn, at[ref.item]

    @classmethod
    def _from_items(cls, items: list) -> "Conversation":
        turns = []
        for role, raw, at in items:
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
            turns.append(Turn(role, content, list(at)))
        return cls(turns)


def _region_bytes(region: Any, base: "np.ndarray") -> Tuple["np.ndarray", bytes]:
    r = np.asarray(region)
    if r.shape != base.shape:
        raise ContentError(
            f"the region's shape {r.shape} is not the edited image's {base.shape}"
        )
    if r.dtype != np.bool_ and r.dtype.kind not in "iu":
        raise ContentError(f"a region holds booleans (or 0 and 1), not {r.dtype}")
    r = r != 0
    return r, np.ascontiguousarray(r, dtype=np.uint8).tobytes()


class Sink:
    """Where an agent writes its reply. Every method is awaited; it returns once the output is
    written to the connection, and raises :class:`ClosedError` once the client has cancelled
    the turn or gone (the agent should then return, or let it propagate). An image handed over
    with :meth:`image_rows` or an edit with :meth:`edit_cells` is completed before anything else
    is sent (:class:`ContentError` otherwise) and before the agent returns (else the turn fails
    with :class:`AgentError` on the client)."""

    def __init__(self, native: _native.Sink, conversation: Optional[Conversation] = None) -> None:
        self._native = native
        self._conversation = conversation if conversation is not None else Conversation()
        # Rows of the image being drawn with `image_rows`, so far.
        self._rows = 0
        # The edit being handed over with `edit_cells`: (base, region, cells so far, total).
        self._edit: Optional[Tuple[ImageRef, "np.ndarray", int, int]] = None

    def _finish_first(self, what: str) -> None:
        """Refuses `what` while an image (``image_rows``) or edit (``edit_cells``) is half made:
        its part may be open on the wire."""
        if self._rows:
            raise ContentError(f"{what} while the image begun with image_rows is not complete "
                               f"({self._rows} rows so far)")
        if self._edit is not None:
            raise ContentError(f"{what} while the edit begun with edit_cells is not complete "
                               f"({self._edit[2]} of {self._edit[3]} cells)")

    async def text(self, delta: str) -> None:
        """Appends a piece of text to the reply (deltas are streamed as they come)."""
        self._finish_first("text")
        if not isinstance(delta, str):
            raise ContentError(f"text must be a str, not {type(delta).__name__}")
        await self._native.text(bridge(), delta)

    async def image(self, image: Union[ImageLike, "np.ndarray"], *, max_side: int = 1024) -> None:
        """Appends an image: a token grid (a 2-D integer array of any dtype but ``uint8``, as
        :func:`unimic.tokenize` gives; sent as it is) or pixels (PIL image, path, image file
        bytes, ``uint8`` array ``(h, w, 3)``, ``(h, w, 4)`` or ``(h, w)``; scaled down to
        ``max_side`` and tokenized off the loop)."""
        self._finish_first("an image")
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
        if self._edit is not None:
            self._finish_first("image rows")
        a = np.asarray(rows)
        if a.ndim != 2 or a.shape[0] == 0:
            raise ContentError(f"rows must be a non-empty 2-D token array, not shape {a.shape}")
        if not isinstance(height, int) or height < 1 or self._rows + a.shape[0] > height:
            raise ContentError(
                f"{self._rows + a.shape[0]} rows for an image of height {height!r}"
            )
        n, width, ids = grid_bytes(a)
        got = self._rows + n
        last = got == height
        # The native call checks the ids before it returns the awaitable: the count moves on
        # only once they are taken.
        pending = self._native.rows(bridge(), height, width, n, ids, last)
        self._rows = 0 if last else got
        await pending

    def _base(self, base: Optional[ImageRef]) -> ImageRef:
        if base is None:
            base = self._conversation.last_image_ref()
            if base is None:
                raise ContentError("the conversation has no image to edit")
        if not isinstance(base, ImageRef):
            raise ContentError(f"base is an ImageRef, not {type(base).__name__}")
        return base

    async def edit(
        self, grid: "np.ndarray", region: Any, *, base: Optional[ImageRef] = None
    ) -> None:
        """Appends an edit of the conversation's image at ``base`` (default: the most recent
        image, :meth:`Conversation.last_image_ref`): ``grid`` is the whole new token grid, of
        the base's shape and equal to it outside ``region`` (a boolean array of that shape,
        ``True`` = redrawn cell). The client receives the whole grid; on the wire only the
        region's cells travel, coded against the rest of the image both ends hold (when the
        session has the masked model). :class:`ContentError` for a grid or region that does not
        fit the base."""
        self._finish_first("an edit")
        ref = self._base(base)
        base_grid = self._conversation.image(ref)
        _, region_bytes = _region_bytes(region, base_grid)
        rows, cols, ids = grid_bytes(grid)
        turn, content = self._conversation._native_ref(ref)
        await self._native.edit(bridge(), turn, content, rows, cols, ids, region_bytes)

    async def edit_cells(
        self, cells: Any, *, region: Any, base: Optional[ImageRef] = None
    ) -> None:
        """Appends the next redrawn cells of an edit that the agent makes cell by cell:
        ``cells`` are token ids (a 1-D integer array or list) in row-major order of the
        ``region``'s cells (a boolean array of the base image's shape, ``True`` = redrawn;
        ``base`` as for :meth:`edit`). Pass the same ``region`` and ``base`` on every call of
        one edit; the call that brings the cells to the region's count ends it. The server may
        send the cells so far before the rest are made, so the client sees the edit grow."""
        if self._rows:
            self._finish_first("an edit")
        ref = self._base(base)
        base_grid = self._conversation.image(ref)
        r, region_bytes = _region_bytes(region, base_grid)
        c = np.asarray(cells)
        if c.size == 0:
            c = c.astype(np.uint32).reshape(0)
        if c.ndim != 1 or c.dtype.kind not in "iu":
            raise ContentError(f"cells are a 1-D integer array, not shape {c.shape} of {c.dtype}")
        if c.size and (c.min() < 0 or c.max() > 0xFFFFFFFF):
            raise ContentError("token ids are between 0 and 2^32 - 1")
        open_ = None
        state = self._edit
        if state is None:
            turn, content = self._conversation._native_ref(ref)
            state = (ref, r, 0, int(r.sum()))
            open_ = (turn, content, region_bytes)
        edit_ref, edit_region, got, total = state
        if edit_ref != ref or not np.array_equal(edit_region, r):
            raise ContentError(
                "edit_cells: an edit in progress takes the same region and base until complete"
            )
        if got + c.size > total:
            raise ContentError(f"{got + c.size} cells for an edit of a region of {total}")
        got += c.size
        last = got == total
        ids = np.ascontiguousarray(c, dtype="<u4").tobytes()
        # The native call checks the ids (against the codebook) before it returns the
        # awaitable: the edit's state moves on only once they are taken.
        pending = self._native.edit_cells(bridge(), ids, last, open_)
        self._edit = None if last else (edit_ref, edit_region, got, total)
        await pending


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
        conversation = Conversation._from_items(items)
        result = respond(conversation, Sink(native_sink, conversation))
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
    history_turns: int = 256,
    history_bytes: int = 16 << 20,
) -> Server:
    """Listens on ``addr`` (``"host:port"``; port 0 picks one) and answers every session with
    ``agent``: an object with an async ``respond(conversation, sink)``, an async function
    ``(conversation, sink)``, :class:`EchoAgent` or :class:`LocalAgent`. Its TLS certificate is
    the PEM chain ``cert`` with its private key ``key`` (for example one a CA signed for the
    server's name; clients verify it with ``Client.connect(..., ca=...)``), or without them a
    fresh self-signed one; either way clients may pin :attr:`Server.pin`. With ``token``, only
    clients that send it are accepted. Each session's agent is shown, and the server keeps,
    the newest turns of its conversation within ``history_turns`` turns and ``history_bytes``
    bytes (64 per item plus its text, 4 per image token, raw bytes; the turn being answered
    always stays), so a long session holds bounded memory. Returns once listening. Keep the
    returned :class:`Server`: it stops when it is closed or garbage-collected.

    Raises :class:`ContentError` for an unreadable ``cert``/``key``, one without the other, or
    a history limit below 1."""
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
        (history_turns, history_bytes),
    )
    return Server(native)
