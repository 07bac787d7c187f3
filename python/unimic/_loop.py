"""One :class:`unimic._native.Bridge` per asyncio event loop (see ``python/src/bridge.rs``).

On Unix the bridge's socket pair is watched by the loop (``add_reader``). Where the loop cannot
watch a descriptor (Windows' proactor loop, or any loop whose ``add_reader`` raises
``NotImplementedError``), or when the environment variable ``UNIMIC_BRIDGE`` is ``relay``, the
bridge wakes the loop from a thread of its own through ``loop.call_soon_threadsafe``. Either way
the bridge does not keep the loop alive, and it is dropped (its sockets closed, its thread ended)
with the loop.
"""

from __future__ import annotations

import asyncio
import os
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
        if os.name != "posix" or os.environ.get("UNIMIC_BRIDGE") == "relay":
            b = _native.Bridge(loop, relay=True)
        else:
            b = _native.Bridge(loop)
            try:
                loop.add_reader(b.fileno(), b.run)
            except NotImplementedError:
                b = _native.Bridge(loop, relay=True)
        _bridges[loop] = b
    return b
