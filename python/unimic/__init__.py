"""unimic: token-based multimodal coding between edge devices and cloud LMM agents.

Images travel as entropy-coded tokens (a few hundred bytes for a photo) and text as BPE token
ids, over QUIC sessions that remember what was said. This package is the Python face of the
Rust crates:

- :class:`Client` — connect to a server, ``await client.send(text=..., images=[...])``, then
  ``async for event in reply`` (text deltas as ``str``, images as ``PIL.Image`` or token grids);
- :func:`serve` — answer sessions with an agent written in Python (an async
  ``respond(conversation, sink)``), or the built-in :class:`EchoAgent` / :class:`LocalAgent`;
- the codec alone — :func:`encode` / :func:`decode` (``.umic`` file bytes), :func:`tokenize` /
  :func:`detokenize` (token grids as numpy arrays), on the models of :class:`Models`;
- :mod:`unimic.errors` — the exceptions, all :class:`UnimicError`.

Everything async runs on asyncio without blocking the event loop; the codec functions are
synchronous and release the GIL (use ``asyncio.to_thread`` in a coroutine).
"""

from __future__ import annotations

from . import errors
from ._images import ImageLike
from .client import Client, Event, ImageRows, Reply
from .errors import (
    AgentError,
    ClosedError,
    CodecError,
    ConnectError,
    ContentError,
    ReplyCancelledError,
    TimeoutError,
    TransportError,
    UnimicError,
)
from .models import (
    RDO,
    Models,
    decode,
    default_models,
    detokenize,
    encode,
    models_path,
    tokenize,
)
from .server import (
    REQUEST_MEDIA_TYPE,
    Attachment,
    Conversation,
    EchoAgent,
    ImageRef,
    LocalAgent,
    Server,
    Sink,
    Turn,
    serve,
)
from . import _native

__version__: str = _native.__version__

__all__ = [
    "Client",
    "Reply",
    "Event",
    "ImageRows",
    "ImageLike",
    "serve",
    "Server",
    "Sink",
    "Conversation",
    "Turn",
    "Attachment",
    "ImageRef",
    "EchoAgent",
    "LocalAgent",
    "REQUEST_MEDIA_TYPE",
    "Models",
    "RDO",
    "default_models",
    "models_path",
    "encode",
    "decode",
    "tokenize",
    "detokenize",
    "errors",
    "UnimicError",
    "ConnectError",
    "ClosedError",
    "TimeoutError",
    "ContentError",
    "CodecError",
    "AgentError",
    "ReplyCancelledError",
    "TransportError",
]
