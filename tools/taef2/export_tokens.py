"""Token grids of the trained quantizer for the entropy-model trainers (docs/CODING.md §5 `.umtg`).

Reads the latent cache of cache_latents.py, runs the quantizer's `down` and residual VQ, and writes
for every level l (1..L) `DIR/L<l>/train.umtg`, `DIR/L<l>/val.umtg` and `DIR/L<l>/static.umstatic` (the
level's order-0 token counts as a static entropy model): 16x16 grids from 32x32
latent windows (stride --stride latents) of every cached training image large enough, and the
validation crops (BSDS test, 256x256). Level 1 is what `train_entropy.py --data DIR/L1` takes.

    python export_tokens.py --cache runs/taef2/cache.pt --quantizer runs/taef2/q/latest.pt --out runs/taef2/tokens
"""
import argparse, os, struct
import numpy as np
import torch
from taef2 import Quantizer


def write_umtg(path, grids, k):
    n, h, w = grids.shape
    with open(path, "wb") as f:
        f.write(b"UMTG" + struct.pack("<HIIII", 1, h, w, k, n))
        f.write(grids.astype("<u2").tobytes())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", required=True)
    ap.add_argument("--quantizer", required=True, help="train_quantizer.py checkpoint (.pt)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--stride", type=int, default=8)
    ap.add_argument("--side", type=int, default=32, help="latent window side (2x the grid side)")
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    ck = torch.load(a.quantizer)
    ar = ck["args"]
    q = Quantizer(ar["ch"], ar["dim"], ar["codes"], ar["levels"], ar["res"])
    q.load_state_dict(ck["q"])
    cache = torch.load(a.cache)
    s = a.side

    def tokens(zs):
        out = []
        for i in range(0, len(zs), 32):
            z = torch.stack(zs[i:i + 32]).float()
            idx, _, _, _ = q.quantize(q.down(z), q.levels)
            out.append(torch.stack(idx, 1).numpy())  # (B, L, h, w)
        return np.concatenate(out)

    wins = []
    for _, z in cache["train"]:
        _, h, w = z.shape
        if h < s or w < s:
            continue
        for t in sorted(set(list(range(0, h - s + 1, a.stride)) + [h - s])):
            for l in sorted(set(list(range(0, w - s + 1, a.stride)) + [w - s])):
                wins.append(z[:, t:t + s, l:l + s])
    tr = tokens(wins)
    va = tokens([z for _, z in cache["val"] if z.shape[1] == s and z.shape[2] == s])
    for lv in range(q.levels):
        d = os.path.join(a.out, f"L{lv + 1}")
        os.makedirs(d, exist_ok=True)
        write_umtg(os.path.join(d, "train.umtg"), tr[:, lv], q.codes)
        write_umtg(os.path.join(d, "val.umtg"), va[:, lv], q.codes)
        counts = np.bincount(tr[:, lv].ravel(), minlength=q.codes)
        # the order-0 model of this level (codec/src/entropy/static_model.rs file format)
        with open(os.path.join(d, "static.umstatic"), "wb") as f:
            f.write(b"UMSTATIC" + struct.pack("<II", 1, q.codes) + counts.astype("<u4").tobytes())
        p = counts[counts > 0] / counts.sum()
        print(f"level {lv + 1}: {len(tr)} train / {len(va)} val grids, unigram entropy {-(p * np.log2(p)).sum():.3f} bits, {int((counts > 0).sum())} codes used")


if __name__ == "__main__":
    main()
