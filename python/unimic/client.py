"""The client: connect to a unimic server, send turns (text, images, token grids, requests),
read each reply as an async stream of events.

.. code-block:: python

    import asyncio, unimic

    async def main():
        async with await unimic.Client.connect("127.0.0.1:4433", pin="ab12...") as client:
            reply = await client.send(text="What is in this photo?", images=["photo.jpg"])
            async for event in reply:
                if isinstance(event, str):
                    print(event, end="")
            print(reply.stats)

    asyncio.run(main())
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
from PIL import Image

from . import _native
from ._images import ImageLike, from_rgb, grid_array, grid_bytes, to_rgb
from ._loop import bridge
from .errors import ClosedError, ContentError
from .models import Models, PathLike, _models

__all__ = ["Client", "Reply", "Event", "ImageRows"]


class ImageRows:
    """The first rows of a reply image still arriving (with ``send(..., image_rows=True)``): a
    server streams an image its agent makes as it goes, and each piece that arrives before the
    last gives one of these; the whole image follows as an ordinary image event.

    ``height`` and ``width`` are the whole image's, in tokens; ``rows`` the rows complete so
    far; ``tokens`` their token grid (``numpy.ndarray`` of ``uint32``, ``(rows, width)``), which
    :func:`unimic.detokenize` turns into the top of the picture."""

    __slots__ = ("height", "width", "rows", "tokens")

    def __init__(self, height: int, width: int, rows: int, tokens: "np.ndarray") -> None:
        self.height = height
        self.width = width
        self.rows = rows
        self.tokens = tokens

    def __repr__(self) -> str:
        return f"ImageRows({self.rows} of {self.height} rows, width {self.width})"


Event = Union[str, "Image.Image", "np.ndarray", ImageRows]
"""An event of a reply: a text delta (``str``), an image, decoded (``PIL.Image``) or as its
token grid (``numpy.ndarray`` of ``uint32``, ``(rows, cols)``), or, when asked for, the first
rows of an image still arriving (:class:`ImageRows`)."""


class Reply:
    """The reply to one turn: ``async for event in reply`` gives its text deltas (``str``) and
    images (``PIL.Image``, or token grids with ``decode_images=False``) as they arrive, and ends
    with the reply. Not to be iterated by two tasks at once."""

    def __init__(self, native: _native.Reply) -> None:
        self._native = native

    @property
    def turn(self) -> int:
        """The turn's message id."""
        return self._native.turn

    @property
    def stats(self) -> Optional[Dict[str, Any]]:
        """Once the reply has ended: bytes on the wire each way (``sent_wire_bytes``,
        ``received_wire_bytes``), payload bytes, tokens and ``seconds`` from sending the turn to
        the reply's end; ``None`` before."""
        return self._native.stats

    def __aiter__(self) -> "Reply":
        return self

    async def __anext__(self) -> Event:
        ev = await self._native.next(bridge())
        if ev is None:
            raise StopAsyncIteration
        if type(ev) is str:
            return ev
        if ev[0] == "pixels":
            return from_rgb(ev[1], ev[2], ev[3])
        if ev[0] == "rows":
            _, height, width, rows, ids = ev
            return ImageRows(height, width, rows, grid_array(rows, width, ids))
        return grid_array(ev[1], ev[2], ev[3])

    async def text(self) -> str:
        """Reads the rest of the reply and returns its text (images are skipped)."""
        out: List[str] = []
        async for ev in self:
            if isinstance(ev, str):
                out.append(ev)
        return "".join(out)

    async def collect(self) -> List[Event]:
        """Reads the rest of the reply: all its events, in order."""
        return [ev async for ev in self]

    async def cancel(self) -> None:
        """Cancels the reply: the server stops its agent; iterating it further raises
        :class:`ReplyCancelledError`."""
        await self._native.cancel(bridge())


class Client:
    """A session with a unimic server. Make one with :meth:`connect`; close it with
    :meth:`close` (or ``async with``)."""

    def __init__(self, native: _native.Client, models: Models) -> None:
        self._native = native
        self.models = models

    @classmethod
    async def connect(
        cls,
        addr: str,
        *,
        pin: Optional[str] = None,
        ca: Optional[PathLike] = None,
        server_name: str = "localhost",
        token: Union[str, bytes, None] = None,
        models: Union[Models, PathLike, None] = None,
        timeout: float = 10.0,
        reply_timeout: Optional[float] = 60.0,
        idle_timeout: float = 15.0,
        context_reuse: bool = True,
    ) -> "Client":
        """Connects to the server at ``addr`` (``"host:port"``), sending ``token`` if the server
        asks for one. The server is trusted either by ``pin``, the SHA-256 of its certificate
        (64 hex digits, as ``unimic serve`` prints it; development mode), or by ``ca``, a PEM
        file of the CA certificates its certificate must chain to, valid for ``server_name``
        (a server started with ``cert=``/``key=`` or ``unimic serve --cert``): give one of the
        two. ``timeout`` bounds connecting and the handshake, ``reply_timeout`` each wait for a
        reply's next event (``None``: no limit); a server silent for ``idle_timeout`` seconds is
        taken as gone. With ``context_reuse`` every turn is coded against the conversation so
        far.

        Raises :class:`ConnectError` (refused, wrong pin, a certificate the CA did not sign or
        not valid for ``server_name``, unauthorized), :class:`TimeoutError`,
        :class:`ContentError` (a malformed pin or address, an unreadable ``ca``, neither or both
        of ``pin`` and ``ca``)."""
        m = _models(models)
        if isinstance(token, str):
            token = token.encode()
        native = await _native.connect(
            bridge(),
            addr,
            pin,
            m._native,
            token,
            timeout,
            reply_timeout,
            idle_timeout,
            context_reuse,
            None if ca is None else str(ca),
            server_name,
        )
        return cls(native, m)

    @property
    def remote(self) -> str:
        """The server's address."""
        return self._native.remote

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._native.closed

    async def send(
        self,
        text: Optional[str] = None,
        images: Sequence[ImageLike] = (),
        *,
        grids: Sequence[Any] = (),
        request: Union[Mapping[str, Any], str, bytes, None] = None,
        decode_images: bool = True,
        max_side: int = 1024,
        levels: int = 1,
        image_rows: bool = False,
    ) -> Reply:
        """Sends a turn: ``text``, then ``images`` (PIL images, paths, image file bytes or
        uint8 pixel arrays; scaled down to ``max_side`` and tokenized off the event loop), then
        ``grids`` (token grids, sent as they are), then ``request`` (a request for a
        token-native agent, as a dict or JSON: ``{"task": {"generate": {"height": 16, "width":
        16}}, "seed": 1}``). Returns the :class:`Reply` once the turn is on the wire; its images
        come decoded unless ``decode_images=False``.

        ``levels`` > 1 sends each of ``images`` with that many levels of the quality ladder
        (sharper, more bytes); a grid of shape ``(levels, rows, cols)`` (from
        ``unimic.tokenize(image, levels=n)``) is sent as a ladder too.

        ``image_rows=True`` also gives, while a reply image is still arriving (a server streams
        an image its agent samples row by row), its first rows as :class:`ImageRows` events.

        Raises :class:`ClosedError` after :meth:`close`, :class:`ContentError` for input that
        cannot be sent."""
        if self._native.closed:
            raise ClosedError("the client is closed")
        parts: List[tuple] = []
        if text is not None:
            if not isinstance(text, str):
                raise ContentError(f"text must be a str, not {type(text).__name__}")
            parts.append(("text", text))
        if isinstance(images, (str, bytes, Image.Image, np.ndarray)) or not isinstance(
            images, Sequence
        ):
            images = [images]  # type: ignore[list-item]
        if not isinstance(levels, int) or levels < 1:
            raise ContentError(f"levels is a positive int, not {levels!r}")
        for img in images:
            w, h, rgb = to_rgb(img)
            parts.append(("pixels", w, h, rgb, levels))
        for g in grids:
            a = np.asarray(g)
            if a.ndim == 3:
                if a.shape[0] == 0:
                    raise ContentError("a ladder grid needs at least one level")
                lv = [grid_bytes(a[i]) for i in range(a.shape[0])]
                rows, cols = lv[0][0], lv[0][1]
                parts.append(("levels", a.shape[0], rows, cols, b"".join(x[2] for x in lv)))
            else:
                rows, cols, ids = grid_bytes(g)
                parts.append(("grid", rows, cols, ids))
        if request is not None:
            if isinstance(request, Mapping):
                request = json.dumps(request)
            if isinstance(request, str):
                request = request.encode()
            parts.append(("request", bytes(request)))
        if not parts:
            raise ContentError("a turn needs text, an image, a grid or a request")
        native = await self._native.send(bridge(), parts, decode_images, max_side, image_rows)
        return Reply(native)

    async def ask(self, text: Optional[str] = None, images: Sequence[ImageLike] = ()) -> str:
        """Sends a turn and returns the reply's whole text."""
        reply = await self.send(text, images)
        return await reply.text()

    async def close(self, grace: float = 1.0) -> None:
        """Ends the session: go-away, close, and the connection drained within ``grace``
        seconds. Its socket and tasks are released; replies still waiting raise
        :class:`ClosedError`. Closing twice is harmless."""
        await self._native.close(bridge(), grace)

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
