"""The shipped models, and the codec alone: images to token grids and ``.umic`` files and back.

Where the models come from (the first that exists wins):

1. the ``path`` given to :class:`Models` (or ``models=`` of :meth:`Client.connect`,
   :func:`serve`, the codec functions);
2. the folder in ``$UNIMIC_MODELS``;
3. the models installed with the package (``unimic/models`` inside the wheel: the default
   tokenizer, its TAEF2 halves and the entropy models, about 23 MB);
4. ``models/`` of the source checkout the extension was built from.

A models folder is laid out like the repository's ``models/``: ``tokenizer-taef2/``,
``taef2/`` and ``entropy/``. Both ends of a session must hold the same models (they are
named by content hash in the handshake).

Every codec function is synchronous and releases the GIL while it works (a 256×256 image takes
about half a second to tokenize on one core): call it with ``await asyncio.to_thread(...)``
from a coroutine.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
from PIL import Image

from . import _native
from ._images import ImageLike, from_rgb, grid_array, grid_bytes, to_rgb
from .errors import ContentError

#: The default rate-distortion weight of the level-1 codes (``unimic encode --rdo``): a bit
#: weighs this fraction of the image's mean quantization error (docs/CODING.md §7.12).
RDO: float = 0.02

__all__ = [
    "Models",
    "default_models",
    "models_path",
    "tokenize",
    "detokenize",
    "encode",
    "decode",
]

PathLike = Union[str, "os.PathLike[str]"]

_PACKAGE_MODELS = Path(__file__).resolve().parent / "models"


def _is_models_dir(p: Path) -> bool:
    return (p / "tokenizer-taef2" / "manifest.json").is_file()


def models_path(path: Optional[PathLike] = None) -> Path:
    """The models folder: ``path``, else ``$UNIMIC_MODELS``, else the package's own models,
    else the source checkout's ``models/`` (see the module docs)."""
    if path is not None:
        return Path(path)
    env = os.environ.get("UNIMIC_MODELS")
    if env:
        return Path(env)
    if _is_models_dir(_PACKAGE_MODELS):
        return _PACKAGE_MODELS
    return Path(_native.SOURCE_MODELS_DIR)


class Models:
    """A models folder (see the module docs), loaded on first use and shared by every client,
    server and codec call given the same folder.

    >>> import unimic
    >>> m = unimic.Models()            # the default models
    >>> grid = m.tokenize("photo.jpg")  # doctest: +SKIP
    """

    def __init__(self, path: Optional[PathLike] = None) -> None:
        self.path: Path = models_path(path)
        self._native = _native.Models(str(self.path))

    def __repr__(self) -> str:
        return f"unimic.Models({str(self.path)!r})"

    def load(self) -> "Models":
        """Loads the models now (otherwise on first use); raises :class:`CodecError` when they
        cannot be loaded."""
        self._native.load()
        return self

    @property
    def tokenizer(self) -> Dict[str, Any]:
        """The image tokenizer: ``name``, ``sha256``, ``codebook_size``, ``patch`` (pixels per
        token side) and ``levels`` (of its quality ladder)."""
        return dict(self._native.tokenizer_info())

    def tokenize(
        self, image: ImageLike, *, levels: int = 1, max_side: int = 1024, rdo: float = RDO
    ) -> "np.ndarray":
        """The token grid of an image: a ``uint32`` array ``(rows, cols)`` (one token per 16×16
        pixels), or ``(levels, rows, cols)`` for ``levels > 1`` (the quality ladder). The image
        is first scaled down so that neither side exceeds ``max_side`` pixels (0: never).
        ``rdo`` weighs the bits of the level-1 codes under the generic model against their
        distance (docs/CODING.md §7.12; 0: the nearest codes; :data:`RDO`, what ``unimic
        encode`` and :class:`Client` use, saves about 3% of an image's bytes for 0.03 dB)."""
        w, h, rgb = to_rgb(image)
        n, rows, cols, ids = self._native.tokenize(w, h, rgb, levels, max_side, float(rdo))
        return grid_array(rows, cols, ids, n if levels > 1 else 1)

    def detokenize(
        self, grid: Any, *, size: Optional[Tuple[int, int]] = None
    ) -> "Image.Image":
        """The image of a token grid (``(rows, cols)``, or ``(levels, rows, cols)`` for the
        ladder), ``16·cols × 16·rows`` pixels, or cropped to ``size`` ``(width, height)``."""
        a = np.asarray(grid)
        if a.ndim == 3:
            levels = a.shape[0]
            if levels == 0:
                raise ContentError("no grid given")
            parts = [grid_bytes(a[i]) for i in range(levels)]
            rows, cols = parts[0][0], parts[0][1]
            ids = b"".join(p[2] for p in parts)
        else:
            levels = 1
            rows, cols, ids = grid_bytes(a)
        w, h, rgb = self._native.detokenize(levels, rows, cols, ids, size)
        return from_rgb(w, h, rgb)

    def encode(
        self,
        image: ImageLike,
        *,
        quality: int = 1,
        max_bytes: Optional[int] = None,
        max_side: int = 1024,
        rdo: float = RDO,
    ) -> bytes:
        """The bytes of a ``.umic`` file of the image, as ``unimic encode`` writes it:
        ``quality`` levels of the quality ladder (1–4), or as many as fit in ``max_bytes``;
        scaled down to ``max_side`` first; level-1 codes chosen at ``rdo`` (as ``unimic encode
        --rdo``, see :meth:`tokenize`). About 340 bytes for a 256×256 photo at quality 1."""
        if quality < 1:
            raise ContentError(f"quality={quality}: the ladder's levels start at 1")
        w, h, rgb = to_rgb(image)
        return bytes(self._native.encode(w, h, rgb, quality, max_bytes, max_side, float(rdo)))

    def decode(self, data: Union[bytes, bytearray, memoryview], *, levels: int = 0) -> "Image.Image":
        """The image of a ``.umic`` file's bytes, from its first ``levels`` levels (0: all)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ContentError(f"decode takes the bytes of a .umic file, not {type(data).__name__}")
        w, h, rgb = self._native.decode(bytes(data), levels)
        return from_rgb(w, h, rgb)


_default: Optional[Models] = None
_default_lock = threading.Lock()


def default_models() -> Models:
    """The :class:`Models` of :func:`models_path` ``()``, made once."""
    global _default
    with _default_lock:
        if _default is None or _default.path != models_path():
            _default = Models()
        return _default


def _models(models: Union[Models, PathLike, None]) -> Models:
    if isinstance(models, Models):
        return models
    if models is None:
        return default_models()
    return Models(models)


def tokenize(
    image: ImageLike,
    *,
    levels: int = 1,
    max_side: int = 1024,
    rdo: float = RDO,
    models: Union[Models, PathLike, None] = None,
) -> "np.ndarray":
    """:meth:`Models.tokenize` with the default models (or ``models``)."""
    return _models(models).tokenize(image, levels=levels, max_side=max_side, rdo=rdo)


def detokenize(
    grid: Any,
    *,
    size: Optional[Tuple[int, int]] = None,
    models: Union[Models, PathLike, None] = None,
) -> "Image.Image":
    """:meth:`Models.detokenize` with the default models (or ``models``)."""
    return _models(models).detokenize(grid, size=size)


def encode(
    image: ImageLike,
    *,
    quality: int = 1,
    max_bytes: Optional[int] = None,
    max_side: int = 1024,
    rdo: float = RDO,
    models: Union[Models, PathLike, None] = None,
) -> bytes:
    """:meth:`Models.encode` with the default models (or ``models``)."""
    return _models(models).encode(
        image, quality=quality, max_bytes=max_bytes, max_side=max_side, rdo=rdo
    )


def decode(
    data: Union[bytes, bytearray, memoryview],
    *,
    levels: int = 0,
    models: Union[Models, PathLike, None] = None,
) -> "Image.Image":
    """:meth:`Models.decode` with the default models (or ``models``)."""
    return _models(models).decode(data, levels=levels)
