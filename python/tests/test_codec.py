"""The codec alone: tokenize / detokenize (token grids as numpy arrays), encode / decode (the
bytes of `.umic` files, interchangeable with `unimic encode` / `unimic decode`)."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

import unimic
from conftest import SAMPLE, gradient


def psnr(a: Image.Image, b: Image.Image) -> float:
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    mse = float(np.mean((x - y) ** 2))
    return 10 * np.log10(255.0**2 / mse)


def test_tokenize_gives_a_uint32_grid_of_one_token_per_16_pixels(models, photo):
    grid = unimic.tokenize(photo)
    assert grid.dtype == np.uint32
    w, h = photo.size
    assert grid.shape == (-(-h // 16), -(-w // 16))
    assert int(grid.max()) < models.tokenizer["codebook_size"]
    ladder = unimic.tokenize(photo, levels=4)
    assert ladder.shape == (4,) + grid.shape
    assert np.array_equal(ladder[0], grid)


def test_every_image_input_gives_the_same_grid(tmp_path: Path, photo):
    path = tmp_path / "p.png"
    photo.save(path)
    rgba = np.concatenate(
        [np.asarray(photo), np.full(np.asarray(photo).shape[:2] + (1,), 7, np.uint8)], axis=2
    )
    want = unimic.tokenize(photo)
    for form in (str(path), path, path.read_bytes(), np.asarray(photo), rgba):
        assert np.array_equal(unimic.tokenize(form), want), type(form)


def test_encode_decode_round_trip_matches_detokenize(photo):
    data = unimic.encode(photo)
    assert data[:4] == b"UMIC"
    assert len(data) < 200, len(data)
    back = unimic.decode(data)
    assert back.size == photo.size
    # The file holds exactly the tokenizer's grid: decoding it is detokenizing that grid.
    direct = unimic.detokenize(unimic.tokenize(photo), size=photo.size)
    assert np.array_equal(np.asarray(back), np.asarray(direct))
    # And it is the photo, soft: far closer to it than its mean colour is.
    mean = Image.new("RGB", photo.size, tuple(int(c) for c in np.asarray(photo).mean((0, 1))))
    assert psnr(back, photo) > psnr(mean, photo) + 2, (psnr(back, photo), psnr(mean, photo))


def test_the_quality_ladder_and_byte_budgets():
    img = gradient(64, 64)
    q1 = unimic.encode(img, quality=1)
    q4 = unimic.encode(img, quality=4)
    assert len(q4) > len(q1)
    # The first level of a four-level file is the one-level file's image.
    assert np.array_equal(np.asarray(unimic.decode(q4, levels=1)), np.asarray(unimic.decode(q1)))
    fitted = unimic.encode(img, max_bytes=len(q4) - 1)
    assert len(q1) <= len(fitted) < len(q4)
    with pytest.raises(unimic.ContentError, match="even level 1"):
        unimic.encode(img, max_bytes=len(q1) - 1)
    with pytest.raises(unimic.ContentError):
        unimic.encode(img, quality=9)


def test_large_photos_are_scaled_to_max_side(tmp_path):
    big = Image.new("RGB", (2048, 1536), (200, 30, 30))
    grid = unimic.tokenize(big, max_side=256)
    assert grid.shape == (12, 16)
    assert unimic.decode(unimic.encode(big, max_side=128)).size == (128, 96)


def test_rdo_trades_a_little_distance_for_bytes(tmp_path: Path, rust_bins):
    """`rdo` weighs the level-1 codes' bits: 0 gives the nearest codes, more saves bytes; the
    files are the CLI's with the same `--rdo`, and decode like any other."""
    with Image.open(SAMPLE) as im:
        photo = ImageOps.fit(im.convert("RGB"), (256, 256))
    assert unimic.RDO == 0.02
    sizes = {}
    for rdo in (0.0, unimic.RDO, 0.2):
        data = unimic.encode(photo, rdo=rdo)
        sizes[rdo] = len(data)
        grid = unimic.tokenize(photo, rdo=rdo)
        back = unimic.decode(data)
        direct = unimic.detokenize(grid, size=photo.size)
        assert np.array_equal(np.asarray(back), np.asarray(direct)), rdo
    assert sizes[0.0] > sizes[unimic.RDO] > sizes[0.2], sizes
    assert np.array_equal(unimic.tokenize(photo), unimic.tokenize(photo, rdo=unimic.RDO))
    assert not np.array_equal(unimic.tokenize(photo, rdo=0), unimic.tokenize(photo, rdo=0.2))
    src = tmp_path / "p.png"
    photo.save(src)
    g = tmp_path / "cli0.umic"
    subprocess.run([str(rust_bins["unimic"]), "encode", str(src), "-o", str(g), "--rdo", "0"],
                   check=True, stdout=subprocess.DEVNULL, timeout=300)
    assert g.read_bytes() == unimic.encode(photo, rdo=0)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(unimic.ContentError, match="rdo"):
            unimic.encode(photo, rdo=bad)
        with pytest.raises(unimic.ContentError, match="rdo"):
            unimic.tokenize(photo, rdo=bad)


def test_files_interchange_with_the_cli(tmp_path: Path, rust_bins, photo):
    """A file Python encodes, `unimic decode` decodes to the same pixels, and the other way."""
    data = unimic.encode(photo, quality=2)
    f = tmp_path / "p.umic"
    f.write_bytes(data)
    out = tmp_path / "cli.png"
    subprocess.run([str(rust_bins["unimic"]), "decode", str(f), "-o", str(out)], check=True,
                   stdout=subprocess.DEVNULL, timeout=300)
    with Image.open(out) as cli:
        assert np.array_equal(np.asarray(cli.convert("RGB")), np.asarray(unimic.decode(data)))
    src = tmp_path / "p.png"
    photo.save(src)
    g = tmp_path / "cli.umic"
    subprocess.run([str(rust_bins["unimic"]), "encode", str(src), "-o", str(g)], check=True,
                   stdout=subprocess.DEVNULL, timeout=300)
    assert g.read_bytes() == unimic.encode(photo)


def test_a_file_coded_with_an_earlier_shipped_model_still_decodes():
    """`kodim23-128-generic-v7.umic` was written by `unimic encode samples/kodim23.png --size 128`
    when `unimic-entropy-generic-v7` was the shipped generic model; the file names that model,
    which the package still carries so that such files decode."""
    data = (Path(__file__).parent / "data" / "kodim23-128-generic-v7.umic").read_bytes()
    assert b"unimic-entropy-generic-v7" in data
    back = unimic.decode(data)
    assert back.size == (128, 128)
    photo = ImageOps.fit(Image.open(SAMPLE).convert("RGB"), (128, 128), Image.LANCZOS)
    mean = Image.new("RGB", photo.size, tuple(int(c) for c in np.asarray(photo).mean((0, 1))))
    assert psnr(back, photo) > psnr(mean, photo) + 2, (psnr(back, photo), psnr(mean, photo))
    # A generic model the package does not hold is named in the error (the file's last 4 bytes
    # are a SHA-256 checksum of the rest, docs/UMIC_FILE.md).
    other = data[:-4].replace(b"generic-v7", b"generic-v9")
    with pytest.raises(unimic.CodecError, match="unimic-entropy-generic-v9"):
        unimic.decode(other + hashlib.sha256(other).digest()[:4])


def test_bad_input_raises_the_documented_errors(tmp_path: Path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    for bad in (str(text), b"not an image either", 42, np.zeros((4, 4), np.float32),
                np.zeros((0, 4, 3), np.uint8), str(tmp_path / "missing.png")):
        with pytest.raises(unimic.ContentError):
            unimic.tokenize(bad)
    assert issubclass(unimic.ContentError, ValueError)
    for bad in (b"", b"UMIC", b"garbage" * 20, unimic.encode(gradient())[:-3]):
        with pytest.raises(unimic.CodecError):
            unimic.decode(bad)
    with pytest.raises(unimic.ContentError):
        unimic.decode("a string")  # type: ignore[arg-type]
    with pytest.raises(unimic.ContentError, match="codebook|1024"):
        unimic.detokenize(np.full((2, 2), 5000, np.uint32))
    with pytest.raises(unimic.ContentError):
        unimic.detokenize(np.zeros(4, np.uint32))
    with pytest.raises(unimic.CodecError, match="tokenizer"):
        unimic.Models(tmp_path).load()


def test_models_are_found_in_the_documented_order(tmp_path, monkeypatch):
    assert unimic.models_path(tmp_path) == tmp_path
    monkeypatch.setenv("UNIMIC_MODELS", str(tmp_path / "x"))
    assert unimic.models_path() == tmp_path / "x"
    monkeypatch.delenv("UNIMIC_MODELS")
    default = unimic.models_path()
    assert (default / "tokenizer-taef2" / "manifest.json").is_file(), default
