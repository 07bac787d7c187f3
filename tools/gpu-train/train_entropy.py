#!/usr/bin/env python3
"""Trains unimic's transformer entropy models in PyTorch, for a GPU.

The same three networks as `codec/src/entropy/train/` (candle), tensor for tensor and formula for
formula: token, row and column embeddings summed; pre-norm blocks (RMS norm, eps 1e-5, learned
scale; one `qkv` projection, scaled dot-product attention, `out` projection; MLP fc1, SiLU, fc2);
a final RMS norm and the `head`. Tensor names and shapes are those of the manifests, so the
weights written here load into the deterministic coder after `unimic train entropy --import`,
which measures their validation loss with candle and refuses a generic or text model whose loss
differs from the one recorded here (proof that this file computes the same function).

Data comes from `unimic train entropy ... --export-data DIR` (`train.umtg[.gz]`, `val.umtg[.gz]`,
`texts.json` for captions): the same grids, crops, windows and captions as the candle trainer.
`--data` may repeat: training grids are pooled, validation comes from the first folder.

The optimiser matches the candle trainer: AdamW (betas 0.9/0.95, eps 1e-8, weight decay on
matrices only), gradient norm clipped at 1, linear warm-up then cosine decay to 10% of the peak.
Additions for long runs: optional dropout on the residual branches (training only: inference is
unchanged), a wall-clock budget (`--time-budget S` times the first steps and fixes the step count
that fits; the record names it as `--steps N`), and the best validation checkpoint is kept.

Writes OUT (safetensors, the best checkpoint, rewritten at each improvement) and the record
`OUT.train.json` (`steps`, `batch_size`, `seed`, `data`, `train_bits_per_token`,
`val_bits_per_token`, `command`, `device`) that `--import` reads. Runs on CPU too (slowly).
"""

import argparse
import gzip
import json
import math
import os
import struct
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

RMS_EPS = 1e-5
LN2 = math.log(2.0)


# ----------------------------------------------------------------------------------------- data

def read_umtg(path):
    """Grids of a token-grid file (docs/CODING.md §5) as an (N, h*w) int64 array, and (h, w, K)."""
    for p in (path, path + ".gz"):
        if os.path.exists(p):
            opener = gzip.open if p.endswith(".gz") else open
            with opener(p, "rb") as f:
                raw = f.read()
            break
    else:
        raise FileNotFoundError(path)
    if raw[:4] != b"UMTG":
        raise ValueError(f"{path}: not a token-grid file")
    (version,) = struct.unpack_from("<H", raw, 4)
    h, w, k, n = struct.unpack_from("<IIII", raw, 6)
    if version != 1:
        raise ValueError(f"{path}: version {version}")
    ids = np.frombuffer(raw, dtype="<u2", offset=22, count=n * h * w).astype(np.int64)
    return ids.reshape(n, h * w), (h, w, k)


def splitmix64(x):
    """SplitMix64 of a uint64 array (the text model's bucket hash, `codec/src/nn/weights.rs`)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


class Data:
    """Training grids (pooled over folders), validation grids and, for text, captions."""

    def __init__(self, dirs, text, text_vocab, max_text, device):
        trains, self.val = [], None
        caps_all, lists_train, lists_val = [], [], []
        shape = None
        for i, d in enumerate(dirs):
            tr, sh = read_umtg(os.path.join(d, "train.umtg"))
            if shape is not None and sh != shape:
                raise ValueError(f"{d}: grids {sh} differ from {shape}")
            shape = sh
            trains.append(tr)
            if i == 0:
                self.val, vsh = read_umtg(os.path.join(d, "val.umtg"))
                if vsh != sh:
                    raise ValueError(f"{d}: validation grids {vsh} differ from {sh}")
            if text:
                with open(os.path.join(d, "texts.json")) as f:
                    t = json.load(f)
                base = len(caps_all)
                caps_all += t["captions"]
                lists_train += [[base + c for c in l] for l in t["train"]]
                if i == 0:
                    lists_val = [[base + c for c in l] for l in t["val"]]
        self.h, self.w, self.k = shape
        self.train = torch.from_numpy(np.concatenate(trains)).to(device)
        self.val = torch.from_numpy(self.val).to(device)
        self.text = text
        if text:
            if len(lists_train) != len(self.train) or len(lists_val) != len(self.val):
                raise ValueError("texts.json does not match the grids")
            # Every caption cut to max_text, hashed to buckets, right-aligned in a (C, L) table.
            L = max_text
            table = np.zeros((len(caps_all), L), dtype=np.int64)
            lens = np.zeros(len(caps_all), dtype=np.int64)
            for c, ids in enumerate(caps_all):
                ids = np.array(ids[:L], dtype=np.uint64)
                if len(ids):
                    b = (splitmix64(ids) % np.uint64(text_vocab)).astype(np.int64)
                    table[c, L - len(b):] = b
                lens[c] = len(ids)
            self.cap_table = torch.from_numpy(table).to(device)
            self.cap_lens = torch.from_numpy(lens).to(device)

            def pad(lists):
                m = max(1, max(len(l) for l in lists))
                a = np.zeros((len(lists), m), dtype=np.int64)
                n = np.zeros(len(lists), dtype=np.int64)
                for i, l in enumerate(lists):
                    a[i, : len(l)] = l
                    n[i] = len(l)
                return torch.from_numpy(a).to(device), torch.from_numpy(n).to(device)

            self.lists_train, self.n_train = pad(lists_train)
            self.lists_val, self.n_val = pad(lists_val)

    def captions(self, idx, train, gen):
        """(B, L) buckets and (B,) lengths: a uniformly drawn caption of each training grid, or
        the first caption of each validation grid. A grid without captions gets length 0."""
        lists, n = (self.lists_train, self.n_train) if train else (self.lists_val, self.n_val)
        if train:
            r = torch.rand(len(idx), device=idx.device, generator=gen)
            pick = (r * n[idx].clamp(min=1)).long().clamp(max=lists.shape[1] - 1)
        else:
            pick = torch.zeros_like(idx)
        cap = lists[idx, pick]
        has = n[idx] > 0
        lens = torch.where(has, self.cap_lens[cap], torch.zeros_like(cap))
        return self.cap_table[cap], lens


# -------------------------------------------------------------------------------------- network

class RmsNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS) * self.weight


class Attn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)


class Mlp(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.fc1 = nn.Linear(d, f)
        self.fc2 = nn.Linear(f, d)


class Block(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.norm1 = RmsNorm(d)
        self.attn = Attn(d)
        self.norm2 = RmsNorm(d)
        self.mlp = Mlp(d, f)


class Net(nn.Module):
    """One of the three models; `kind` picks the extra tables and the sequence layout."""

    def __init__(self, kind, k, max_side, d, layers, heads, f, text_vocab, max_text, dropout):
        super().__init__()
        self.kind, self.k, self.max_side, self.heads = kind, k, max_side, heads
        self.max_text, self.dropout = max_text, dropout
        emb = lambda n: nn.Embedding(n, d)
        self.tok_emb = emb(k + 1)
        self.row_emb = emb(max_side)
        self.col_emb = emb(max_side)
        if kind == "masked":
            self.known_row_emb = emb(max_side)
            self.known_col_emb = emb(max_side)
        if kind == "text":
            self.text_emb = emb(text_vocab)
            self.text_pos = emb(max(1, max_text))
        self.blocks = nn.ModuleList([Block(d, f) for _ in range(layers)])
        self.norm_f = RmsNorm(d)
        self.head = nn.Linear(d, k)

    def body(self, x, mask=None, causal=False):
        b, t, d = x.shape
        nh = self.heads
        hd = d // nh
        p = self.dropout if self.training else 0.0
        for blk in self.blocks:
            q, kk, v = blk.attn.qkv(blk.norm1(x)).split(d, dim=-1)
            q, kk, v = (z.view(b, t, nh, hd).transpose(1, 2) for z in (q, kk, v))
            o = F.scaled_dot_product_attention(q, kk, v, attn_mask=mask, is_causal=causal)
            o = o.transpose(1, 2).reshape(b, t, d)
            x = x + F.dropout(blk.attn.out(o), p, self.training)
            h = F.silu(blk.mlp.fc1(blk.norm2(x)))
            x = x + F.dropout(blk.mlp.fc2(h), p, self.training)
        return self.norm_f(x)

    def raster(self, ids, h, w):
        """Embedded raster inputs: begin token K, then each grid shifted right by one."""
        b, n = ids.shape
        prev = torch.cat([torch.full((b, 1), self.k, device=ids.device), ids[:, :-1]], 1)
        pos = torch.arange(n, device=ids.device)
        return self.tok_emb(prev) + self.row_emb(pos // w) + self.col_emb(pos % w)

    def bits(self, logits, targets, weight=None):
        """Mean bits per token over the weighted positions (all when `weight` is None)."""
        nll = F.cross_entropy(logits.reshape(-1, self.k).float(), targets.reshape(-1),
                              reduction="none")
        if weight is None:
            return nll.mean() / LN2
        weight = weight.reshape(-1).float()
        return (nll * weight).sum() / weight.sum().clamp(min=1.0) / LN2

    def loss_generic(self, ids, h, w):
        x = self.raster(ids, h, w)
        return self.bits(self.head(self.body(x, causal=True)), ids)

    def loss_text(self, ids, h, w, caps, lens):
        """`caps` (B, L): buckets right-aligned (left padding), `lens` (B,): real lengths."""
        b, n = ids.shape
        L = caps.shape[1]
        dev = ids.device
        lt = int(lens.max().item()) if L else 0
        img = self.raster(ids, h, w)
        if lt == 0:
            return self.bits(self.head(self.body(img, causal=True)), ids)
        caps = caps[:, L - lt:]
        slot = torch.arange(lt, device=dev)
        pad = (lt - lens)[:, None]  # padding slots are 0..pad
        is_pad = slot[None, :] < pad
        pos = (slot[None, :] - pad).clamp(min=0)
        txt = self.text_emb(torch.where(is_pad, torch.zeros_like(caps), caps)) + self.text_pos(pos)
        x = torch.cat([txt, img], 1)
        t = lt + n
        q = torch.arange(t, device=dev)
        allowed = q[None, :] <= q[:, None]  # (T, T) causal
        key_pad = torch.cat([is_pad, torch.zeros(b, n, dtype=torch.bool, device=dev)], 1)
        mask = allowed[None] & ~key_pad[:, None, :]
        mask = mask | torch.eye(t, dtype=torch.bool, device=dev)[None]
        hidden = self.body(x, mask=mask[:, None])[:, lt:]
        return self.bits(self.head(hidden), ids)

    def loss_masked(self, ids, h, w, unknown):
        """`unknown` (B, n) bool. Sequence: prefix slots (the known cells after the first
        unknown one, raster order, padded to the longest), then the raster part over the whole
        grid; loss on the raster rows of unknown cells."""
        b, n = ids.shape
        dev = ids.device
        cell = torch.arange(n, device=dev)
        first = unknown.float().argmax(1)
        is_pre = (cell[None, :] > first[:, None]) & ~unknown
        p = is_pre.sum(1)
        pmax = int(p.max().item())
        raster = self.raster(ids, h, w)
        if pmax == 0:
            hidden = self.body(raster, causal=True)
            return self.bits(self.head(hidden), ids, unknown)
        key = torch.where(is_pre, cell[None, :], cell[None, :] + n)
        cells = key.argsort(1)[:, :pmax]
        valid = torch.arange(pmax, device=dev)[None, :] < p[:, None]
        tok = torch.where(valid, ids.gather(1, cells), torch.full_like(cells, self.k))
        pre = self.tok_emb(tok) + self.known_row_emb(cells // w) + self.known_col_emb(cells % w)
        x = torch.cat([pre, raster], 1)
        t = pmax + n
        q = torch.arange(t, device=dev)
        key_ok = torch.cat([valid, torch.ones(b, n, dtype=torch.bool, device=dev)], 1)
        is_raster_q = q >= pmax
        # Prefix queries see valid prefix keys; raster query i sees valid prefix keys and raster
        # keys up to itself; a padding slot sees only itself.
        see = (q[None, :] < pmax) | (is_raster_q[:, None] & (q[None, :] <= q[:, None]))
        mask = see[None] & key_ok[:, None, :]
        mask = mask | torch.eye(t, dtype=torch.bool, device=dev)[None]
        hidden = self.body(x, mask=mask[:, None])[:, pmax:]
        return self.bits(self.head(hidden), ids, unknown)


def random_unknown(b, h, w, gen, dev):
    """Random unknown regions as the candle trainer draws them (`random_unknown`): whole grid
    25%, a rectangle (inpainting) 30%, everything but a rectangle (outpainting) 20%, independent
    cells at a rate uniform in [0.05, 1) 25%; never empty."""
    n = h * w
    u = torch.rand(b, device=dev, generator=gen)
    rh = 1 + (torch.rand(b, device=dev, generator=gen) * h).long().clamp(max=h - 1)
    rw = 1 + (torch.rand(b, device=dev, generator=gen) * w).long().clamp(max=w - 1)
    r0 = (torch.rand(b, device=dev, generator=gen) * (h - rh + 1)).long()
    c0 = (torch.rand(b, device=dev, generator=gen) * (w - rw + 1)).long()
    cell = torch.arange(n, device=dev)
    r, c = (cell // w)[None, :], (cell % w)[None, :]
    inside = ((r >= r0[:, None]) & (r < (r0 + rh)[:, None])
              & (c >= c0[:, None]) & (c < (c0 + rw)[:, None]))
    rate = 0.05 + 0.95 * torch.rand(b, device=dev, generator=gen)
    rand_cells = torch.rand(b, n, device=dev, generator=gen) < rate[:, None]
    m = torch.where((u < 0.25)[:, None], torch.ones_like(inside),
        torch.where((u < 0.55)[:, None], inside,
        torch.where((u < 0.75)[:, None], ~inside, rand_cells)))
    empty = ~m.any(1)
    if empty.any():
        j = (torch.rand(b, device=dev, generator=gen) * n).long().clamp(max=n - 1)
        m[empty, j[empty]] = True
    return m


# ------------------------------------------------------------------------------------- training

def add_model_args(ap):
    """The architecture flags (the shipped shape by default) and the device, which every trainer
    here takes."""
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--d-ff", type=int, default=384)
    ap.add_argument("--max-side", type=int, default=64)
    ap.add_argument("--text-vocab", type=int, default=4096)
    ap.add_argument("--max-text", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def model_of(a, k, dropout):
    """The network `a.kind` of the shape `add_model_args` parsed, over a `k`-entry codebook."""
    return Net(a.kind, k, a.max_side, a.d_model, a.layers, a.heads, a.d_ff, a.text_vocab,
               a.max_text, dropout)


def lr_at(step, steps, warmup, lr):
    if step < warmup:
        return lr * (step + 1) / warmup
    span = max(1, steps - warmup)
    p = min(1.0, (step - warmup) / span)
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * p)))


def loss_of(net, data, idx, train, gen, unknown_gen=None):
    ids = (data.train if train else data.val)[idx]
    if net.kind == "generic":
        return net.loss_generic(ids, data.h, data.w)
    if net.kind == "text":
        caps, lens = data.captions(idx, train, gen)
        return net.loss_text(ids, data.h, data.w, caps, lens)
    unk = random_unknown(len(idx), data.h, data.w, unknown_gen or gen, ids.device)
    return net.loss_masked(ids, data.h, data.w, unk)


@torch.no_grad()
def validate(net, data, val_samples, batch):
    net.eval()
    n = min(len(data.val), max(1, val_samples))
    # Masked: a fixed seed per validation pass, so passes compare.
    g = torch.Generator(device=data.val.device)
    g.manual_seed(0x76616C6964617465)
    total, count = 0.0, 0
    for i in range(0, n, batch):
        idx = torch.arange(i, min(n, i + batch), device=data.val.device)
        total += loss_of(net, data, idx, False, g, g).item() * len(idx)
        count += len(idx)
    net.train()
    return total / count


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kind", choices=["generic", "masked", "text"], required=True)
    ap.add_argument("--data", action="append", required=True,
                    help="folder from `unimic train entropy --export-data` (repeatable)")
    ap.add_argument("--out", required=True, help="output .safetensors")
    ap.add_argument("--init", help="start from the tensors of this file with the same name and shape")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--time-budget", type=float, default=0.0,
                    help="seconds: fix --steps from the speed of the first steps")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--val-samples", type=int, default=256)
    ap.add_argument("--seed", type=int, default=1)
    add_model_args(ap)
    ap.add_argument("--check-only", action="store_true",
                    help="print the validation loss of --init and exit")
    a = ap.parse_args()

    dev = torch.device(a.device)
    torch.manual_seed(a.seed)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    data = Data(a.data, a.kind == "text", a.text_vocab, a.max_text, dev)
    net = model_of(a, data.k, a.dropout).to(dev)
    for name, p in net.named_parameters():  # the candle trainer's initial scales
        if name.endswith(".bias"):
            nn.init.zeros_(p)
        elif "norm" not in name:
            scale = 1.0 / math.sqrt(2 * a.layers) if ("attn.out" in name or "mlp.fc2" in name) else 1.0
            nn.init.normal_(p, 0.0, 0.02 * scale)
    if a.init:
        src = load_file(a.init)
        own = net.state_dict()
        copied = 0
        for name, t in src.items():
            if name in own and tuple(own[name].shape) == tuple(t.shape):
                own[name].copy_(t.to(own[name].dtype))
                copied += 1
        if copied == 0:
            sys.exit(f"{a.init} holds no tensor of this model's names and shapes")
        print(f"init: {copied}/{len(own)} tensors from {a.init}", flush=True)
    descs = []
    for d in a.data:
        p = os.path.join(d, "data.txt")
        descs.append(open(p).read().strip() if os.path.exists(p) else d)
    data_desc = ("pooled training grids of: " + " || ".join(descs)
                 + "; validation: the first set's") if len(descs) > 1 else descs[0]
    vbatch = min(a.batch_size, 64)
    v0 = validate(net, data, a.val_samples, vbatch)
    print(json.dumps({"kind": a.kind, "train_grids": len(data.train), "val_grids": len(data.val),
                      "params": sum(p.numel() for p in net.parameters()), "val0": v0,
                      "device": str(dev)}), flush=True)
    if a.check_only:
        return

    decay = [p for n, p in net.named_parameters() if p.dim() == 2]
    other = [p for n, p in net.named_parameters() if p.dim() != 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                             {"params": other, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator(device=dev)
    gen.manual_seed(a.seed)
    steps = a.steps
    t0 = time.time()
    best = (v0, 0, float("nan"))
    window = []
    record = None

    def save(step, train_bits, val_bits):
        nonlocal record
        tensors = {k: v.detach().float().contiguous().cpu() for k, v in net.state_dict().items()}
        save_file(tensors, a.out)
        argv = list(sys.argv)
        if "--time-budget" in argv:  # the record names the resolved step count
            i = argv.index("--time-budget")
            del argv[i:i + 2]
            argv += ["--steps", str(steps)]
        record = {"steps": step, "batch_size": a.batch_size, "seed": a.seed, "data": data_desc,
                  "train_bits_per_token": train_bits, "val_bits_per_token": val_bits,
                  "command": "python3 " + " ".join(argv),
                  "device": (f"cuda: {torch.cuda.get_device_name(dev)}" if dev.type == "cuda"
                             else "cpu"),
                  "wall_s": round(time.time() - t0, 1), "planned_steps": steps}
        with open(a.out.rsplit(".safetensors", 1)[0] + ".train.json", "w") as f:
            json.dump(record, f, indent=2)

    step = 0
    while step < steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, a.warmup, a.lr)
        idx = torch.randint(0, len(data.train), (a.batch_size,), device=dev, generator=gen)
        loss = loss_of(net, data, idx, True, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        step += 1
        window.append(loss.detach())
        if a.time_budget and step == 30:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            per = (time.time() - t0) / 30
            steps = max(31, int(a.time_budget / per * 0.97))
            print(f"{per * 1000:.1f} ms/step: {steps} steps fit in {a.time_budget:.0f} s", flush=True)
        if step % a.eval_every == 0 or step == steps:
            tb = torch.stack(window).mean().item()
            window = []
            vb = validate(net, data, a.val_samples, vbatch)
            improved = vb < best[0]
            if improved:
                best = (vb, step, tb)
                save(step, tb, vb)
            print(json.dumps({"step": step, "train": round(tb, 4), "val": round(vb, 4),
                              "best": round(best[0], 4), "s": round(time.time() - t0, 1)}),
                  flush=True)
    if record is None:
        print(f"no step improved on the initial validation {v0:.4f}; nothing written", flush=True)
    else:
        print(json.dumps({"done": a.out, **record}), flush=True)


if __name__ == "__main__":
    main()
