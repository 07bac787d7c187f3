#!/usr/bin/env python3
"""Checks agreement.py against the anchors in ../shared/models/recognizers/README.md.

Builds the 24 Kodak 256×256 centre crops the README's anchors use (shorter side resized to 256
with Pillow's Lanczos, centre crop), makes the decoded variants (Pillow JPEG at quality 90/20/5,
Gaussian blur σ = 2 and σ = 6 with Pillow's GaussianBlur and with scipy.ndimage.gaussian_filter
when scipy is installed), and prints for each: bpp, top-1 agreement, original top-1 in decoded
top-3, mean probability cosine, and detector recall (matched / original detections).

    python tools/recognizers/anchors.py [--kodak ../shared/data/kodak] [--models DIR]
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

import agreement as ag

ANCHORS = {  # README: top-1 agree, top-1 in top-3, cosine (of 24)
    "jpeg q90": (16, 22, 0.929),
    "jpeg q20": (13, 18, 0.737),
    "jpeg q5": (5, 13, 0.445),
    "blur sigma 2 (PIL)": (5, 10, 0.528),
    "blur sigma 2 (scipy)": (5, 10, 0.528),
}


def crop256(im: Image.Image) -> Image.Image:
    w, h = im.size
    s = 256 / min(w, h)
    nw, nh = max(256, round(w * s)), max(256, round(h * s))
    r = im.resize((nw, nh), Image.LANCZOS)
    x, y = (nw - 256) // 2, (nh - 256) // 2
    return r.crop((x, y, x + 256, y + 256))


def jpeg(im: Image.Image, q: int):
    b = io.BytesIO()
    im.save(b, format="JPEG", quality=q)
    return Image.open(io.BytesIO(b.getvalue())).convert("RGB"), len(b.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kodak", type=Path, default=ag.default_models_dir().parents[1] / "data" / "kodak")
    ap.add_argument("--models", type=Path, default=None)
    args = ap.parse_args()
    rec = ag.Recognizers(args.models or ag.default_models_dir())
    paths = sorted(args.kodak.glob("*.png"))
    crops = [crop256(Image.open(p).convert("RGB")) for p in paths]
    orig = [rec.analyse(np.asarray(c)) for c in crops]
    n_det = sum(len(o["dets"][1]) for o in orig)
    print(f"{len(crops)} crops; detections on the originals (score > 0.4): {n_det}")
    variants = {}
    for q in (90, 20, 5):
        variants[f"jpeg q{q}"] = [jpeg(c, q) for c in crops]
    for s in (2, 6):
        variants[f"blur sigma {s} (PIL)"] = [(c.filter(ImageFilter.GaussianBlur(s)), None) for c in crops]
        try:
            from scipy.ndimage import gaussian_filter

            variants[f"blur sigma {s} (scipy)"] = [
                (Image.fromarray(np.clip(np.round(gaussian_filter(np.asarray(c, dtype=np.float64), (s, s, 0))), 0, 255).astype(np.uint8)), None)
                for c in crops
            ]
        except ImportError:
            pass
    print("| decoded | bpp | top-1 agree | orig top-1 in top-3 | prob. cosine | detector recall | README anchor |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, items in variants.items():
        res = [ag.compare(rec, o, rec.analyse(np.asarray(d))) for o, (d, _) in zip(orig, items)]
        n = len(res)
        t1 = sum(r["top1_agree"] for r in res)
        t3 = sum(r["orig_top1_in_top3"] for r in res)
        cos = np.mean([r["prob_cosine"] for r in res])
        m = sum(r["matched_detections"] for r in res)
        o = sum(r["orig_detections"] for r in res)
        bpp = "–" if items[0][1] is None else f"{np.mean([b * 8 / 65536 for _, b in items]):.2f}"
        a = ANCHORS.get(name)
        anchor = f"{a[0]}/24, {a[1]}/24, {a[2]:.3f}" if a else ""
        print(f"| {name} | {bpp} | {t1}/{n} | {t3}/{n} | {cos:.3f} | {m}/{o} | {anchor} |")


if __name__ == "__main__":
    main()
