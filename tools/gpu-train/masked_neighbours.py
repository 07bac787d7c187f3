"""Would the masked model code better if each coded cell saw its known neighbours after it directly?

An experiment, not a trainer of shipped weights. The masked model (`codec/src/entropy/masked.rs`)
reaches the known cells below and to the right of a token only through attention to its prefix,
located by learned absolute positions. This script adds, to the raster input of each cell, a
learned `d × d` map of the token embedding of each of its four known neighbours after it (right,
below-left, below, below-right; a neighbour that is unknown or off the grid adds nothing). The
maps start at zero, so the model starts exactly as the given checkpoint. With `--freeze` (the
default) only the maps train; `--no-freeze` fine-tunes every tensor as well, and `--control`
fine-tunes the unchanged model the same way, to separate the maps' effect from the fine-tune's.

It runs on the CPU (`--device` is ignored). It trains on whole-image token grids (`unimic tokenize`), on the random splits the trainers use,
and reports the `checker` and `inpaint25` scenarios of `unimic bench codec` on the evaluation
grids: the masked model's bits on the unknown tokens against the generic model's on the same
tokens (ideal code lengths, PyTorch arithmetic).

    python3 tools/gpu-train/masked_neighbours.py \\
      --generic models/entropy/unimic-entropy-generic-v6.safetensors \\
      --masked models/entropy/unimic-entropy-masked-v6.safetensors \\
      --train runs/s15/bsds-tv-*.umtg --eval runs/s15/bsds-test-*.umtg --steps 1200
"""

import argparse
import json
import math
import time

import torch
import torch.nn as nn
from safetensors.torch import load_file

import train_entropy as te

OFFSETS = [(0, 1), (1, -1), (1, 0), (1, 1)]


def grids(paths):
    out = []
    for p in paths:
        g, (h, w, k) = te.read_umtg(p)
        out.append(torch.from_numpy(g.reshape(-1, h, w)))
    return out, k


def load_net(kind, path, k, a):
    a.kind = kind
    net = te.model_of(a, k, 0.0)
    src = load_file(path)
    net.load_state_dict({name: src[name] for name in net.state_dict()})
    return net


class WithNeighbours(nn.Module):
    """A masked `te.Net` plus the neighbour maps (used when `maps` is true)."""

    def __init__(self, base, maps):
        super().__init__()
        d = base.tok_emb.embedding_dim
        self.base, self.maps = base, maps
        self.w = nn.Parameter(torch.zeros(len(OFFSETS), d, d))

    def neighbour_inputs(self, ids2d, unknown2d):
        b, h, w = ids2d.shape
        emb = self.base.tok_emb(ids2d)
        known = ~unknown2d
        add = torch.zeros_like(emb)
        for o, (dr, dc) in enumerate(OFFSETS):
            src = torch.zeros_like(emb)
            ok = torch.zeros(b, h, w, dtype=torch.bool)
            r0, r1, c0, c1 = max(0, -dr), min(h, h - dr), max(0, -dc), min(w, w - dc)
            src[:, r0:r1, c0:c1] = emb[:, r0 + dr:r1 + dr, c0 + dc:c1 + dc]
            ok[:, r0:r1, c0:c1] = known[:, r0 + dr:r1 + dr, c0 + dc:c1 + dc]
            add = add + (src @ self.w[o].T) * ok[..., None]
        return add.reshape(b, h * w, -1)

    def bits(self, ids2d, unknown2d):
        """Mean bits per unknown token."""
        b, h, w = ids2d.shape
        base, plain = self.base, self.base.raster
        if self.maps:
            extra = self.neighbour_inputs(ids2d, unknown2d)
            base.raster = lambda i, hh, ww: plain(i, hh, ww) + extra
        try:
            return base.loss_masked(ids2d.reshape(b, -1), h, w, unknown2d.reshape(b, -1))
        finally:
            base.raster = plain


def checker(h, w):
    r, c = torch.arange(h)[:, None], torch.arange(w)[None, :]
    return (r + c) % 2 == 0


def inpaint25(h, w):
    rh, rw = round(h * math.sqrt(0.25)), round(w * math.sqrt(0.25))
    r0, c0 = (h - rh) // 2, (w - rw) // 2
    m = torch.zeros(h, w, dtype=torch.bool)
    m[r0:r0 + rh, c0:c0 + rw] = True
    return m


@torch.no_grad()
def evaluate(model, generic, test, k):
    model.eval()
    out = {}
    for name, split in [("checker", checker), ("inpaint25", inpaint25)]:
        mb = gb = 0.0
        for g in test:
            for i in range(0, len(g), 16):
                x = g[i:i + 16]
                b, h, w = x.shape
                u = split(h, w).expand(b, h, w).contiguous()
                mb += model.bits(x, u).item() * u.sum().item()
                ids = x.reshape(b, -1)
                logits = generic.head(generic.body(generic.raster(ids, h, w), causal=True))
                nll = nn.functional.cross_entropy(logits.reshape(-1, k), ids.reshape(-1),
                                                  reduction="none") / math.log(2)
                gb += (nll * u.reshape(-1).float()).sum().item()
        out[name] = {"bits": mb, "bits_generic": gb, "ratio_vs_generic": mb / gb}
    model.train()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--generic", required=True)
    ap.add_argument("--masked", required=True)
    ap.add_argument("--train", nargs="+", required=True)
    ap.add_argument("--eval", nargs="+", required=True)
    ap.add_argument("--eval-grids", type=int, default=64, help="per evaluation file")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3, help="for the maps")
    ap.add_argument("--lr-base", type=float, default=1e-4, help="for the rest, unless frozen")
    ap.add_argument("--no-freeze", action="store_true")
    ap.add_argument("--control", action="store_true", help="no maps (with --no-freeze)")
    ap.add_argument("--seed", type=int, default=1)
    te.add_model_args(ap)
    a = ap.parse_args()
    torch.manual_seed(a.seed)

    train, k = grids(a.train)
    test, _ = grids(a.eval)
    test = [t[:a.eval_grids] for t in test]
    generic = load_net("generic", a.generic, k, a).eval()
    model = WithNeighbours(load_net("masked", a.masked, k, a), maps=not a.control)
    groups = [{"params": [model.w], "lr": a.lr if model.maps else 0.0}]
    if a.no_freeze:
        groups.append({"params": model.base.parameters(), "lr": a.lr_base})
    else:
        model.base.requires_grad_(False)
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    run = {"maps": model.maps, "frozen": not a.no_freeze, "steps": a.steps}
    print(json.dumps({**run, "step": 0, **evaluate(model, generic, test, k)}), flush=True)
    gen = torch.Generator().manual_seed(a.seed)
    t0 = time.time()
    for step in range(1, a.steps + 1):
        g = train[step % len(train)]
        x = g[torch.randint(0, len(g), (a.batch_size,), generator=gen)]
        if torch.rand(1, generator=gen).item() < 0.5:
            x = x.flip(2)
        b, h, w = x.shape
        u = te.random_unknown(b, h, w, gen, "cpu").reshape(b, h, w)
        loss = model.bits(x, u)
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(json.dumps({**run, "step": a.steps, "seconds": round(time.time() - t0),
                      **evaluate(model, generic, test, k)}), flush=True)


if __name__ == "__main__":
    main()
