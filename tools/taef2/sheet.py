"""Side-by-side sheet of validation crops: original | level 1 | ... | level L, from a checkpoint.

    python sheet.py --cache runs/taef2/cache.pt --quantizer runs/taef2/q1/latest.pt --out sheet.png
"""
import argparse
import numpy as np
import torch
from PIL import Image
from taef2 import Quantizer, load_taef2

ap = argparse.ArgumentParser()
ap.add_argument("--cache", required=True)
ap.add_argument("--quantizer", required=True)
ap.add_argument("--taef2", default="../../models/taef2")
ap.add_argument("--out", required=True)
ap.add_argument("--n", type=int, default=4)
ap.add_argument("--first", type=int, default=0)
a = ap.parse_args()
torch.set_grad_enabled(False)
ck = torch.load(a.quantizer)
ar = ck["args"]
q = Quantizer(ar["ch"], ar["dim"], ar["codes"], ar["levels"], ar["res"])
q.load_state_dict(ck["q"])
_, dec = load_taef2(a.taef2)
if ck.get("dec"):
    dec.load_state_dict(ck["dec"])
c = torch.load(a.cache)
rows = []
for x, z in c["val"][a.first:a.first + a.n]:
    tiles = [x.permute(1, 2, 0).numpy()]
    e = q.down(z[None].float())
    for n in range(1, q.levels + 1):
        _, _, qs, _ = q.quantize(e, n)
        y = dec(q.up(qs)).clamp(0, 1)[0]
        tiles.append((y * 255).round().byte().permute(1, 2, 0).numpy())
    tiles.append((dec(z[None].float()).clamp(0, 1)[0] * 255).round().byte().permute(1, 2, 0).numpy())
    rows.append(np.concatenate(tiles, 1))
Image.fromarray(np.concatenate(rows, 0)).save(a.out)
print("step", ck["step"], "->", a.out)
