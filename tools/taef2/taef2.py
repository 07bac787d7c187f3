"""TAEF2 (tiny autoencoder distilled from the FLUX.2 VAE) and the unimic quantizer, in PyTorch.

Written from the architecture description in ../../models/taef2/README.md; parameter names follow the
upstream `nn.Sequential` indices so the shipped safetensors load unchanged. The Rust implementation
(`codec/src/tokenizer/taef2.rs`) mirrors this file tensor for tensor.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file


def conv3(cin, cout, bias=True, stride=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=bias)


class Block(nn.Module):
    """conv-ReLU-conv-ReLU-conv plus identity skip, then ReLU; optional global branch first."""

    def __init__(self, ch=64, pool=False):
        super().__init__()
        self.conv = nn.Sequential(conv3(ch, ch), nn.ReLU(), conv3(ch, ch), nn.ReLU(), conv3(ch, ch))
        self.pool = None
        if pool:
            self.pool = nn.Sequential(nn.Conv2d(ch, 4 * ch, 1, bias=False), nn.GroupNorm(4, 4 * ch),
                                      nn.ReLU(), nn.Conv2d(4 * ch, ch, 1, bias=False))

    def forward(self, x):
        if self.pool is not None:
            x = x + self.pool(x)
        return F.relu(self.conv(x) + x)


class Clamp(nn.Module):
    def forward(self, x):
        return torch.tanh(x / 3) * 3


def encoder():
    s2 = lambda: conv3(64, 64, bias=False, stride=2)
    return nn.Sequential(
        conv3(3, 64), Block(),
        s2(), Block(), Block(), Block(),
        s2(), Block(), Block(), Block(),
        s2(), Block(pool=True), Block(pool=True), Block(pool=True),
        conv3(64, 32))


def decoder():
    up = lambda: nn.Upsample(scale_factor=2, mode="nearest")
    c = lambda: conv3(64, 64, bias=False)
    return nn.Sequential(
        Clamp(), conv3(32, 64), nn.ReLU(),
        Block(pool=True), Block(pool=True), Block(pool=True), up(), c(),
        Block(), Block(), Block(), up(), c(),
        Block(), Block(), Block(), up(), c(),
        Block(), conv3(64, 3))


def load_taef2(model_dir):
    enc, dec = encoder(), decoder()
    enc.load_state_dict({k: v.float() for k, v in load_file(f"{model_dir}/taef2_encoder.safetensors").items()})
    dec.load_state_dict({k: v.float() for k, v in load_file(f"{model_dir}/taef2_decoder.safetensors").items()})
    return enc.eval(), dec.eval()


# ---------------------------------------------------------------------------------------------
# The quantizer between them: 32-channel latents at 1/8 -> a token grid at 1/16 -> back.

class Res(nn.Module):
    """x + conv3(silu(conv3(silu(x))))."""

    def __init__(self, ch):
        super().__init__()
        self.conv1 = conv3(ch, ch)
        self.conv2 = conv3(ch, ch)

    def forward(self, x):
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


class Quantizer(nn.Module):
    """down: conv3 32->C, n Res, 2x2 stride-2 conv C->C, n Res, silu, 1x1 C->d.
    L residual codebooks of K entries in d dimensions (nearest by squared L2).
    up: 1x1 d->C, n Res, nearest 2x, conv3 C->C, n Res, silu, conv3 C->32."""

    def __init__(self, ch=128, dim=32, codes=1024, levels=4, res=2):
        super().__init__()
        self.dim, self.codes, self.levels = dim, codes, levels
        self.down_in = conv3(32, ch)
        self.down_a = nn.Sequential(*[Res(ch) for _ in range(res)])
        self.down_s = nn.Conv2d(ch, ch, 2, stride=2)
        self.down_b = nn.Sequential(*[Res(ch) for _ in range(res)])
        self.down_out = nn.Conv2d(ch, dim, 1)
        self.up_in = nn.Conv2d(dim, ch, 1)
        self.up_a = nn.Sequential(*[Res(ch) for _ in range(res)])
        self.up_s = conv3(ch, ch)
        self.up_b = nn.Sequential(*[Res(ch) for _ in range(res)])
        self.up_out = conv3(ch, 32)
        # codebooks: buffers updated by EMA, not by the optimiser
        self.register_buffer("codebooks", torch.randn(levels, codes, dim) * 0.1)
        self.register_buffer("ema_count", torch.ones(levels, codes))
        self.register_buffer("ema_sum", self.codebooks.clone())
        self.register_buffer("last_used", torch.zeros(levels, codes))

    def down(self, z):
        h = self.down_b(self.down_s(self.down_a(self.down_in(z))))
        return self.down_out(F.silu(h))

    def up(self, e):
        h = self.up_a(self.up_in(e))
        h = F.interpolate(h, scale_factor=2, mode="nearest")
        h = self.up_b(self.up_s(h))
        return self.up_out(F.silu(h))

    @staticmethod
    def nearest(x, cb):
        # x: (N, d), cb: (K, d) -> indices (N,)
        d = (x * x).sum(1, keepdim=True) - 2 * x @ cb.t() + (cb * cb).sum(1)[None]
        return d.argmin(1)

    def quantize(self, e, levels):
        """e: (B, d, h, w) -> list of per-level indices (B, h, w) and the sum of the first `levels`
        codewords (straight-through), plus flat residual inputs per level for the EMA update."""
        B, d, h, w = e.shape
        flat = e.permute(0, 2, 3, 1).reshape(-1, d)
        r = flat
        q = torch.zeros_like(flat)
        idx, inputs = [], []
        for l in range(levels):
            cb = self.codebooks[l]
            i = self.nearest(r.detach(), cb)
            c = cb[i]
            inputs.append((l, r.detach(), i))
            idx.append(i.view(B, h, w))
            q = q + c
            r = r - c
        qs = q.view(B, h, w, d).permute(0, 3, 1, 2)
        return idx, e + (qs - e).detach(), qs, inputs

    @torch.no_grad()
    def ema_update(self, inputs, step, decay=0.99, restart_after=200):
        for l, x, i in inputs:
            onehot = F.one_hot(i, self.codes).float()
            cnt = onehot.sum(0)
            s = onehot.t() @ x
            self.ema_count[l].mul_(decay).add_(cnt, alpha=1 - decay)
            self.ema_sum[l].mul_(decay).add_(s, alpha=1 - decay)
            n = self.ema_count[l].sum()
            c = (self.ema_count[l] + 1e-5) / (n + self.codes * 1e-5) * n
            self.codebooks[l].copy_(self.ema_sum[l] / c[:, None])
            self.last_used[l][cnt > 0] = step
            dead = (step - self.last_used[l]) > restart_after
            nd = int(dead.sum())
            if nd > 0:
                pick = x[torch.randint(0, x.shape[0], (nd,))]
                pick = pick + 0.01 * pick.std() * torch.randn_like(pick)
                self.codebooks[l][dead] = pick
                self.ema_sum[l][dead] = pick
                self.ema_count[l][dead] = 1.0
                self.last_used[l][dead] = step
        return

    def forward(self, z, levels):
        e = self.down(z)
        idx, q_st, q, inputs = self.quantize(e, levels)
        return self.up(q_st), e, q, idx, inputs

    def decode_indices(self, idx):
        """idx: list of (B, h, w) per level -> latents."""
        q = sum(self.codebooks[l][i] for l, i in enumerate(idx)).permute(0, 3, 1, 2)
        return self.up(q)
