"""One :class:`unimic._native.Bridge` per asyncio event loop (see ``python/src/bridge.rs``).

The bridge's socket pair is watched by the loop (``add_reader``); it does not keep the loop
alive, and it is dropped (its sockets closed) with the loop.
"""

from __future__ import annotations

import asyncio
import weakref

from . import _native

_bridges: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _native.Bridge]" = (
    weakref.WeakKeyDictionary()
)


def bridge() -> _native.Bridge:
    """The bridge of the running loop (made on first use)."""
    loop = asyncio.get_running_loop()
    b = _bridges.get(loop)
    if b is None:
        b = _native.Bridge(loop)
        loop.add_reader(b.fileno(), b.run)
        _bridges[loop] = b
    return b
