"""The exceptions of unimic: every error the package raises is a :class:`UnimicError`.

Each mirrors a typed error of the Rust crates (``ChatError``, ``ConnectError``, ``SendError``,
``ImageError``, ...); ``code`` is the protocol's registry code (``"UNAUTHORIZED"``,
``"AGENT_FAILED"``, ``"CANCELLED"``, ...) where the failure has one, else ``None``.

=========================  ==============================================================
class                      raised when
=========================  ==============================================================
``ConnectError``           connecting or the handshake failed: nothing listens, wrong
                           certificate pin, token refused (``code="UNAUTHORIZED"``), no
                           common models; also a server that cannot listen on its address
``ClosedError``            the client, the server or the session is closed (a send after
                           ``close()``, a reply whose session ended, a sink whose reply is
                           finished)
``TimeoutError``           nothing arrived in time (connect timeout, reply timeout); also a
                           :class:`builtins.TimeoutError`
``ContentError``           the input cannot be sent or coded: not an image, an empty or too
                           large image, a malformed grid, pin or request; also a
                           :class:`ValueError`
``CodecError``             a ``.umic`` file cannot be decoded (corrupt, crafted, made with
                           models not held here) or the models cannot be loaded
``AgentError``             the server's agent failed to answer the turn (``code``
                           ``"AGENT_FAILED"``; the message is the agent's error)
``ReplyCancelledError``    the reply was cancelled (by :meth:`unimic.Reply.cancel`)
``TransportError``         a message broke the protocol or its stream was reset
=========================  ==============================================================
"""

from __future__ import annotations

import builtins
from typing import Optional

__all__ = [
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


class UnimicError(Exception):
    """Base class of every unimic error."""

    code: Optional[str]

    def __init__(self, message: str = "", *, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.code = code


class ConnectError(UnimicError, ConnectionError):
    """Connecting or the handshake failed (refused, wrong pin, unauthorized, no common models)."""


class ClosedError(UnimicError, ConnectionError):
    """The client, server, session or reply sink is closed."""


class TimeoutError(UnimicError, builtins.TimeoutError):  # noqa: A001 - mirrors the Rust name
    """Nothing arrived within the configured time."""


class ContentError(UnimicError, ValueError):
    """The input is not something unimic can send or code."""


class CodecError(UnimicError):
    """A ``.umic`` file or grid could not be decoded, or the models could not be loaded."""


class AgentError(UnimicError):
    """The server's agent failed to answer the turn."""


class ReplyCancelledError(UnimicError):
    """The reply was cancelled."""


class TransportError(UnimicError):
    """A message broke the protocol, or its stream was reset."""
