"""Type stubs of the extension module ``unimic._native`` (python/src/*.rs).

Use the ``unimic`` package rather than this module: it turns PIL images and numpy arrays into
the bytes these functions take, and back. Every async method returns an awaitable that runs on
the event loop of the :class:`Bridge` passed to it (``unimic._loop.bridge()``).
"""

from typing import Any, Awaitable, Dict, List, Optional, Tuple, Union

__version__: str
SOURCE_MODELS_DIR: str
REQUEST_MEDIA_TYPE: str

class Bridge:
    def __init__(self, event_loop: Any, relay: bool = False) -> None: ...
    def fileno(self) -> Optional[int]: ...
    def run(self) -> None: ...
    def pending(self) -> int: ...

class Ready:
    def __await__(self) -> "Ready": ...
    def __iter__(self) -> "Ready": ...
    def __next__(self) -> Any: ...
    def send(self, value: Any) -> Any: ...
    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any: ...
    def close(self) -> None: ...

class Models:
    def __init__(self, root: str) -> None: ...
    @property
    def path(self) -> str: ...
    def load(self) -> None: ...
    def tokenizer_info(self) -> Dict[str, Any]: ...
    def tokenize(
        self, width: int, height: int, rgb: bytes, levels: int, max_side: int, rdo: float = 0.02
    ) -> Tuple[int, int, int, bytes]: ...
    def detokenize(
        self,
        levels: int,
        height: int,
        width: int,
        ids: bytes,
        crop: Optional[Tuple[int, int]] = None,
    ) -> Tuple[int, int, bytes]: ...
    def encode(
        self,
        width: int,
        height: int,
        rgb: bytes,
        quality: int = 1,
        max_bytes: Optional[int] = None,
        max_side: int = 1024,
        rdo: float = 0.02,
    ) -> bytes: ...
    def decode(self, data: bytes, levels: int = 0) -> Tuple[int, int, bytes]: ...

ReplyItem = Union[str, Tuple[str, int, int, bytes], Tuple[str, int, int, int, bytes], None]

class Reply:
    @property
    def turn(self) -> int: ...
    @property
    def sent(self) -> Tuple[int, int, int]: ...
    @property
    def stats(self) -> Optional[Dict[str, Any]]: ...
    def next(self, bridge: Bridge) -> Awaitable[ReplyItem]: ...
    def cancel(self, bridge: Bridge) -> Awaitable[None]: ...

class Client:
    @property
    def remote(self) -> str: ...
    @property
    def closed(self) -> bool: ...
    def send(
        self,
        bridge: Bridge,
        parts: List[Tuple[Any, ...]],
        decode_images: bool = True,
        max_side: int = 1024,
        image_rows: bool = False,
    ) -> Awaitable[Reply]: ...
    def close(self, bridge: Bridge, grace: float = 1.0) -> Awaitable[None]: ...

def connect(
    bridge: Bridge,
    addr: str,
    pin: Optional[str],
    models: Models,
    token: Optional[bytes] = None,
    connect_timeout: float = 10.0,
    reply_timeout: Optional[float] = 60.0,
    idle_timeout: float = 15.0,
    context_reuse: bool = True,
    ca: Optional[str] = None,
    server_name: Optional[str] = None,
) -> Awaitable[Client]: ...

class Sink:
    def text(self, bridge: Bridge, delta: str) -> Awaitable[None]: ...
    def grid(self, bridge: Bridge, height: int, width: int, ids: bytes) -> Awaitable[None]: ...
    def rows(
        self, bridge: Bridge, height: int, width: int, rows: int, ids: bytes, last: bool
    ) -> Awaitable[None]: ...
    def pixels(
        self, bridge: Bridge, width: int, height: int, rgb: bytes, max_side: int = 1024
    ) -> Awaitable[None]: ...
    def edit(
        self,
        bridge: Bridge,
        turn: int,
        content: int,
        height: int,
        width: int,
        ids: bytes,
        region: bytes,
    ) -> Awaitable[None]: ...
    def edit_cells(
        self,
        bridge: Bridge,
        ids: bytes,
        last: bool,
        open: Optional[Tuple[int, int, bytes]] = None,
    ) -> Awaitable[None]: ...

class EchoAgent:
    def __init__(self) -> None: ...

class LocalAgent:
    def __init__(self) -> None: ...

class Server:
    @property
    def address(self) -> str: ...
    @property
    def pin(self) -> str: ...
    @property
    def closed(self) -> bool: ...
    def close(self, bridge: Bridge) -> Awaitable[None]: ...
    def wait(self, bridge: Bridge) -> Awaitable[None]: ...
    def turns(self) -> List[Dict[str, Any]]: ...

def serve(
    bridge: Bridge,
    addr: str,
    agent: Any,
    models: Models,
    token: Optional[bytes] = None,
    cert: Optional[str] = None,
    key: Optional[str] = None,
    history: Optional[Tuple[int, int]] = None,
) -> Awaitable[Server]: ...
