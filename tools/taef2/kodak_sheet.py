"""One JPEG sheet of `unimic bench tokenizer --out DIR` results: for every image, the original
beside one codec's decoding (default `taef2`, level 1), four pairs per row.

    python3 tools/taef2/kodak_sheet.py --bench runs/bench/k256 --codec taef2 --out docs/img/kodak256-level1.jpg
"""
import argparse
import os

from PIL import Image

ap = argparse.ArgumentParser()
ap.add_argument("--bench", required=True, help="the --out folder of `unimic bench tokenizer`")
ap.add_argument("--codec", default="taef2", help="file name under decoded/<image>/ (no .png)")
ap.add_argument("--out", required=True)
ap.add_argument("--per-row", type=int, default=4)
ap.add_argument("--quality", type=int, default=85)
a = ap.parse_args()
root = os.path.join(a.bench, "decoded")
names = sorted(n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n)))
pairs = []
for n in names:
    o = Image.open(os.path.join(root, n, "original.png")).convert("RGB")
    d = Image.open(os.path.join(root, n, f"{a.codec}.png")).convert("RGB")
    pairs.append((o, d))
w, h = pairs[0][0].size
gap, pad = 2, 6
cell_w = 2 * w + gap
rows = (len(pairs) + a.per_row - 1) // a.per_row
sheet = Image.new("RGB", (a.per_row * cell_w + (a.per_row - 1) * pad, rows * h + (rows - 1) * pad), "white")
for i, (o, d) in enumerate(pairs):
    x = (i % a.per_row) * (cell_w + pad)
    y = (i // a.per_row) * (h + pad)
    sheet.paste(o, (x, y))
    sheet.paste(d, (x + w + gap, y))
sheet.save(a.out, quality=a.quality)
print(a.out, sheet.size)
