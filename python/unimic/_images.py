"""Images and token grids between Python (PIL, numpy, paths, encoded bytes) and the bytes the
native module takes."""

from __future__ import annotations

import io
import os
from typing import Any, Tuple, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ContentError

ImageLike = Union["Image.Image", "os.PathLike[str]", str, bytes, "np.ndarray"]
"""What is accepted as an image: a PIL image, a path to an image file, the bytes of one (PNG,
JPEG, WebP, ...), or a numpy array of pixels: ``(height, width, 3)`` RGB or ``(height, width,
4)`` RGBA (alpha dropped) or ``(height, width)`` grey, of dtype ``uint8``."""


def to_rgb(image: Any) -> Tuple[int, int, bytes]:
    """``(width, height, RGB bytes)`` of an image given any way :data:`ImageLike` allows."""
    if isinstance(image, Image.Image):
        img = image
    elif isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as f:
                img = f.convert("RGB")
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise ContentError(f"cannot read an image from {os.fspath(image)!r}: {e}") from e
    elif isinstance(image, (bytes, bytearray, memoryview)):
        try:
            with Image.open(io.BytesIO(bytes(image))) as f:
                img = f.convert("RGB")
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise ContentError(f"the bytes are not an image file: {e}") from e
    elif isinstance(image, np.ndarray):
        a = image
        if a.dtype != np.uint8:
            raise ContentError(
                f"an image array must be uint8 pixels, not {a.dtype} (token grids go to "
                "grids=... / unimic.detokenize)"
            )
        if a.ndim == 2:
            a = np.stack([a, a, a], axis=-1)
        elif a.ndim == 3 and a.shape[2] == 4:
            a = a[:, :, :3]
        elif not (a.ndim == 3 and a.shape[2] == 3):
            raise ContentError(
                f"an image array is (height, width, 3), (height, width, 4) or (height, width); "
                f"got shape {a.shape}"
            )
        h, w = a.shape[:2]
        if h == 0 or w == 0:
            raise ContentError("the image has a zero dimension")
        return w, h, np.ascontiguousarray(a).tobytes()
    else:
        raise ContentError(
            f"not an image: {type(image).__name__} (give a PIL image, a path, image file bytes "
            "or a uint8 numpy array)"
        )
    if img.mode != "RGB":
        img = img.convert("RGB")
    w, h = img.size
    if w == 0 or h == 0:
        raise ContentError("the image has a zero dimension")
    return w, h, img.tobytes()


def from_rgb(width: int, height: int, rgb: bytes) -> "Image.Image":
    """A PIL RGB image of the bytes."""
    return Image.frombytes("RGB", (width, height), rgb)


def grid_bytes(grid: Any) -> Tuple[int, int, bytes]:
    """``(height, width, little-endian u32 ids)`` of a token grid: a 2-D array of non-negative
    integers (numpy or nested lists)."""
    a = np.asarray(grid)
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ContentError(f"a token grid is a non-empty 2-D array; got shape {a.shape}")
    if a.dtype.kind not in "iu":
        raise ContentError(f"a token grid holds integers, not {a.dtype}")
    if a.size and (a.min() < 0 or a.max() > 0xFFFFFFFF):
        raise ContentError("token ids are between 0 and 2^32 - 1")
    h, w = a.shape
    return h, w, np.ascontiguousarray(a, dtype="<u4").tobytes()


def grid_array(height: int, width: int, ids: bytes, levels: int = 1) -> "np.ndarray":
    """The token grid(s) as a ``uint32`` array: ``(height, width)``, or ``(levels, height,
    width)`` for several levels."""
    a = np.frombuffer(ids, dtype="<u4").astype(np.uint32)
    if levels == 1:
        return a.reshape(height, width)
    return a.reshape(levels, height, width)
