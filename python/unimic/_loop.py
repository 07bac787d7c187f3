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


def _waker(loop: asyncio.AbstractEventLoop, holder: list) -> "object":
    """The relay's callable: asks ``loop`` (held weakly) to run the bridge (held weakly, through
    ``holder``) and says whether the loop is still there."""
    loop_ref = weakref.ref(loop)

    def wake() -> bool:
        loop = loop_ref()
        bridge = holder[0]() if holder else None
        if loop is None or bridge is None or loop.is_closed():
            return False
        try:
            loop.call_soon_threadsafe(bridge.run)
        except RuntimeError:  # closed between the check and the call
            return False
        return True

    return wake


def _relay_bridge(loop: asyncio.AbstractEventLoop) -> _native.Bridge:
    holder: list = []
    b = _native.Bridge(loop, relay=_waker(loop, holder))
    holder.append(weakref.ref(b))
    return b


def bridge() -> _native.Bridge:
    """The bridge of the running loop (made on first use)."""
    loop = asyncio.get_running_loop()
    b = _bridges.get(loop)
    if b is None:
        if os.name != "posix" or os.environ.get("UNIMIC_BRIDGE") == "relay":
            b = _relay_bridge(loop)
        else:
            b = _native.Bridge(loop)
            try:
                loop.add_reader(b.fileno(), b.run)
            except NotImplementedError:
                b = _relay_bridge(loop)
        _bridges[loop] = b
    return b
