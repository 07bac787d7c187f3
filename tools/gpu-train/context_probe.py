"""How much do a token's neighbours after it (right, below) tell about it, beyond those before it?

A model-agnostic probe for the masked model's target. It trains the same small network (shared
token embeddings of a fixed neighbourhood, concatenated, then an MLP over the codebook) three
times, on three neighbourhoods of each cell:

* `none`: no neighbour (the unigram distribution);
* `causal`: the cells a raster scan has already coded near it: two to the left, and the five
  cells of each of the two rows above within two columns (12 cells);
* `full`: `causal` plus its mirror image, the cells after it (two to the right, and the two rows
  below; 24 cells, every cell within two rows and columns).

For the choice of scan order, `raster`, `serpentine` (rows alternate direction) and `hilbert`
(the Hilbert curve over the smallest power-of-two square holding the grid) give the network the
24 cells of `full`, each replaced by the padding token unless that order codes it before the
cell. Every order leaves half of a cell's neighbours available on average; what differs is which.
`raster` holds the same information as `causal` (its other 12 slots are always padding).

Cells outside the grid read a padding token. Each network trains on the training grids (with
horizontal flips), keeps the step with the best loss on the validation grids, and reports bits per
token on the evaluation grids. `full / causal` estimates what context on every side can save a
token over the raster context near it: the same quantity as the `checker` scenario of
`unimic bench codec`, measured without the masked model. Grids come from `unimic tokenize`
(`UMTG`, docs/CODING.md section 5).

    unimic tokenize --scale 0.8 -o runs/s15/bsds-tv ../shared/data/bsds500/train ../shared/data/bsds500/val
    unimic tokenize --scale 0.8 -o runs/s15/bsds-test ../shared/data/bsds500/test
    python3 tools/gpu-train/context_probe.py --train runs/s15/bsds-tv-*.umtg --eval runs/s15/bsds-test-*.umtg

One line of JSON per neighbourhood. Needs PyTorch and NumPy; CPU is enough (a few minutes each).
"""

import argparse
import json
import math
import time

import numpy as np
import torch
import torch.nn as nn

from train_entropy import read_umtg


def offsets(kind):
    """(dr, dc) of the neighbourhood `kind`."""
    causal = [(0, -2), (0, -1)] + [(dr, dc) for dr in (-2, -1) for dc in range(-2, 3)]
    if kind == "none":
        return []
    if kind == "causal":
        return causal
    if kind == "full":
        return causal + [(-dr, -dc) for dr, dc in causal]
    raise ValueError(kind)


ORDERS = ("raster", "serpentine", "hilbert")


def hilbert_index(n, r, c):
    """Position of cell (r, c) along the Hilbert curve over an n × n square (n a power of two)."""
    d, s = 0, n // 2
    while s > 0:
        rx, ry = int(c & s > 0), int(r & s > 0)
        d += s * s * ((3 * rx) ^ ry)
        if ry == 0:
            if rx == 1:
                r, c = s - 1 - r, s - 1 - c
            r, c = c, r
        s //= 2
    return d


def scan_position(order, h, w):
    """(h, w) array: when `order` codes each cell."""
    r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    if order == "raster":
        return r * w + c
    if order == "serpentine":
        return r * w + np.where(r % 2 == 0, c, w - 1 - c)
    if order == "hilbert":
        n = 1 << max(0, (max(h, w) - 1).bit_length())
        return np.vectorize(lambda a, b: hilbert_index(n, a, b))(r, c)
    raise ValueError(order)


def before(order, h, w):
    """(h*w, 24) bool: is each `full` neighbour of a cell on the grid and coded before it?"""
    pos = scan_position(order, h, w)
    pad = np.full((h + 4, w + 4), np.iinfo(np.int64).max)
    pad[2:-2, 2:-2] = pos
    return np.stack([(pad[2 + dr:2 + dr + h, 2 + dc:2 + dc + w] < pos).reshape(-1)
                     for dr, dc in offsets("full")], axis=1)


def cells(paths, flip):
    """(ids, neighbours over the `full` set, grid number, {order: neighbour coded before}) for
    every cell of every grid in `paths`, and K; a flipped copy keeps its grid's number."""
    full = offsets("full")
    ys, xs, gs, base = [], [], [], 0
    avail = {o: [] for o in ORDERS}
    for p in paths:
        grids, (h, w, k) = read_umtg(p)
        grids = grids.reshape(-1, h, w).astype(np.int64)
        number = base + np.arange(len(grids))
        base += len(grids)
        if flip:
            grids = np.concatenate([grids, grids[:, :, ::-1]])
            number = np.concatenate([number, number])
        pad = np.full((grids.shape[0], h + 4, w + 4), k, dtype=np.int64)
        pad[:, 2:-2, 2:-2] = grids
        ys.append(grids.reshape(-1))
        xs.append(np.stack([pad[:, 2 + dr:2 + dr + h, 2 + dc:2 + dc + w].reshape(-1)
                            for dr, dc in full], axis=1))
        gs.append(np.repeat(number, h * w))
        for o in ORDERS:
            avail[o].append(np.tile(before(o, h, w), (grids.shape[0], 1)))
    avail = {o: torch.from_numpy(np.concatenate(v)) for o, v in avail.items()}
    return (torch.from_numpy(np.concatenate(ys)), torch.from_numpy(np.concatenate(xs)),
            torch.from_numpy(np.concatenate(gs)), avail, k)


class Probe(nn.Module):
    def __init__(self, k, n_ctx, d, hidden, dropout):
        super().__init__()
        self.emb = nn.Embedding(k + 1, d)
        self.pos = nn.Parameter(torch.zeros(max(n_ctx, 1), d))
        self.mlp = nn.Sequential(nn.Linear(max(n_ctx, 1) * d, hidden), nn.GELU(),
                                 nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Dropout(dropout), nn.Linear(hidden, k))
        self.n_ctx = n_ctx

    def forward(self, ctx):
        if self.n_ctx == 0:
            x = self.pos.expand(ctx.shape[0], 1, -1)
        else:
            x = self.emb(ctx) + self.pos
        return self.mlp(x.flatten(1))


def bits(net, x, y, bs=8192):
    net.eval()
    tot = 0.0
    with torch.no_grad():
        for i in range(0, len(y), bs):
            tot += nn.functional.cross_entropy(net(x[i:i + bs]), y[i:i + bs],
                                               reduction="sum").item()
    net.train()
    return tot / len(y) / math.log(2)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", nargs="+", required=True)
    ap.add_argument("--eval", nargs="+", required=True)
    ap.add_argument("--val-fraction", type=float, default=0.1,
                    help="share of the training grids kept for choosing the best step")
    ap.add_argument("--kinds", default="none,causal,full",
                    help="comma-separated: none, causal, full, raster, serpentine, hilbert")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--d", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--dropout", type=float, default=0.3)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    y, x, grid, avail, k = cells(a.train, flip=True)
    ey, ex, _, eavail, _ = cells(a.eval, flip=False)
    g = torch.Generator().manual_seed(a.seed)
    # Whole grids (with their flipped copies) go to validation, not single cells.
    n_grids = int(grid.max()) + 1
    val_grids = torch.randperm(n_grids, generator=g)[:max(1, int(n_grids * a.val_fraction))]
    is_val = torch.isin(grid, val_grids)
    vi, ti = is_val.nonzero()[:, 0], (~is_val).nonzero()[:, 0]
    full = offsets("full")
    for kind in a.kinds.split(","):
        if kind in ORDERS:
            cols = list(range(len(full)))
            x_k = torch.where(avail[kind], x, k)
            ex_k = torch.where(eavail[kind], ex, k)
        else:
            cols = [full.index(o) for o in offsets(kind)]
            x_k, ex_k = x, ex
        sel = lambda t: t[:, cols] if cols else t[:, :0]
        tx, ty, vx, vy = sel(x_k[ti]), y[ti], sel(x_k[vi]), y[vi]
        torch.manual_seed(a.seed)
        net = Probe(k, len(cols), a.d, a.hidden, a.dropout)
        opt = torch.optim.AdamW(net.parameters(), lr=a.lr, weight_decay=0.01)
        best, best_state, best_step, t0 = float("inf"), None, 0, time.time()
        for step in range(1, a.steps + 1):
            b = torch.randint(0, len(ty), (a.batch,), generator=g)
            loss = nn.functional.cross_entropy(net(tx[b]), ty[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % a.eval_every == 0 or step == a.steps:
                v = bits(net, vx, vy)
                if v < best:
                    best, best_step = v, step
                    best_state = {n: p.clone() for n, p in net.state_dict().items()}
        net.load_state_dict(best_state)
        print(json.dumps({"kind": kind, "neighbours": len(cols), "train_cells": len(ty),
                          "eval_cells": len(ey), "best_step": best_step,
                          "val_bits_per_token": best,
                          "eval_bits_per_token": bits(net, sel(ex_k), ey),
                          "seconds": round(time.time() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
