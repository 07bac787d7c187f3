"""Two probes behind the quality ladder's design (results in models/tokenizer-taef2/README.md).

`entropy`: how much a refinement level's tokens depend on the level below at the same cell.
Conditional counts H(level l | level l-1) are estimated on the training windows of
export_tokens.py (counts scaled down for the windows' overlap, additive smoothing towards the
level's order-0 distribution, the best of a small grid) and measured on the validation grids,
against order-0.

`fine`: what a refinement level at the latent's own resolution (one token per 8x8 pixels, the
residual after level 1 vector-quantized per latent position by k-means, K = 64/256/1024, up to
three residual stages) adds on Kodak 256 crops, through the shipped decoder and the pretrained
one, beside the shipped same-grid residual levels and the unquantized latent (the ceiling any
ladder has with that decoder). The k-means codebooks are fitted on training latents only.

    python3 tools/taef2/probe_ladder.py entropy --tokens runs/taef2/tokens
    python3 tools/taef2/probe_ladder.py fine --cache runs/taef2/cache.pt --ckpt runs/taef2/q2/latest.pt \
        --decoder models/tokenizer-taef2/decoder.safetensors --kodak ../shared/data/kodak \
        --recognizer ../shared/models/recognizers/efficientnet_lite0.onnx
"""
import argparse, os, sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "gpu-train"))


def entropy(a):
    from train_entropy import read_umtg
    L = {}
    for l in (1, 2, 3, 4):
        tr, (_, _, k) = read_umtg(os.path.join(a.tokens, f"L{l}", "train.umtg"))
        va, _ = read_umtg(os.path.join(a.tokens, f"L{l}", "val.umtg"))
        L[l] = (tr, va)
    for l in (2, 3, 4):
        (tr, va), (ptr, pva) = L[l], L[l - 1]
        u = np.bincount(tr.ravel(), minlength=k) + 0.5
        u = u / u.sum()
        order0 = -np.log2(u[va.ravel()]).mean()
        joint = np.zeros((k, k))
        np.add.at(joint, (ptr.ravel(), tr.ravel()), 1.0)
        best = None
        for scale in (1 / 64, 1 / 16, 1 / 4):
            j = joint * scale
            n = j.sum(1, keepdims=True)
            for A in (4, 16, 64, 256):
                p = (j + A * u[None]) / (n + A)
                h = -np.log2(p[pva.ravel(), va.ravel()]).mean()
                if best is None or h < best[0]:
                    best = (h, scale, A)
        print(f"level {l}: order-0 {order0:.3f} bits/token, given level {l - 1} at the same cell "
              f"{best[0]:.3f} (count scale {best[1]}, smoothing {best[2]})")


def fine(a):
    from PIL import Image
    from safetensors.torch import load_file
    from taef2 import Quantizer, load_taef2
    from train_quantizer import make_recognizer, psnr, windows
    from cache_latents import centre256, to_tensor
    torch.set_grad_enabled(False)
    gen = torch.Generator().manual_seed(1)
    ck = torch.load(a.ckpt)
    ar = ck["args"]
    q = Quantizer(ar["ch"], ar["dim"], ar["codes"], ar["levels"], ar["res"])
    q.load_state_dict(ck["q"])
    enc, dec0 = load_taef2(a.taef2)
    _, dec = load_taef2(a.taef2)
    dec.load_state_dict({k: v.float() for k, v in load_file(a.decoder).items()})
    train = [d for d in torch.load(a.cache)["train"] if min(d[1].shape[1:]) >= 16]
    z, _ = windows(train, 512, 16, gen)

    def level1(z):
        _, _, qs, _ = q.quantize(q.down(z), 1)
        return q.up(qs)

    r = z - torch.cat([level1(z[i:i + 64]) for i in range(0, len(z), 64)])
    rp = r.permute(0, 2, 3, 1).reshape(-1, 32)

    def km(x, K, iters=15):
        x = x[torch.randperm(x.shape[0], generator=gen)[:60000]]
        c = x[torch.randperm(x.shape[0], generator=gen)[:K]].clone()
        for _ in range(iters):
            i = Quantizer.nearest(x, c)
            s = torch.zeros_like(c).index_add_(0, i, x)
            cnt = torch.bincount(i, minlength=K).float()
            live = cnt > 0
            c[live] = s[live] / cnt[live, None]
        return c

    books = {K: km(rp, K) for K in (64, 256, 1024)}
    stages, res = [books[1024]], rp
    for _ in range(2):
        res = res - stages[-1][Quantizer.nearest(res, stages[-1])]
        stages.append(km(res, 1024))
    recog = make_recognizer(a.recognizer)
    out = {}

    def add(name, y, xf):
        y8 = (y.clamp(0, 1) * 255).round() / 255
        out.setdefault(name, []).append((psnr(y8, xf), recog(xf, y8)))

    for f in sorted(os.listdir(a.kodak)):
        x = to_tensor(centre256(Image.open(os.path.join(a.kodak, f)).convert("RGB")))
        xf = x[None].float() / 255
        zt = enc(xf)
        z1 = level1(zt)
        rr = (zt - z1).permute(0, 2, 3, 1).reshape(-1, 32)
        for name, d in (("shipped decoder", dec), ("pretrained decoder", dec0)):
            add(f"{name}: level 1", d(z1), xf)
            _, _, qs, _ = q.quantize(q.down(zt), 4)
            add(f"{name}: levels 1-4 (same grid)", d(q.up(qs)), xf)
            add(f"{name}: unquantized latent", d(zt), xf)
            for K, c in books.items():
                qq = c[Quantizer.nearest(rr, c)].view(1, 32, 32, 32).permute(0, 3, 1, 2)
                add(f"{name}: level 1 + fine K={K}", d(z1 + qq), xf)
            acc, left = torch.zeros_like(rr), rr
            for n, c in enumerate(stages, 1):
                pick = c[Quantizer.nearest(left, c)]
                acc, left = acc + pick, left - pick
                if n > 1:
                    qq = acc.view(1, 32, 32, 32).permute(0, 3, 1, 2)
                    add(f"{name}: level 1 + {n} fine K=1024 stages", d(z1 + qq), xf)
    for k, v in out.items():
        v = np.array(v)
        print(f"{k:50s} {v[:, 0].mean():6.2f} dB  cosine {v[:, 1].mean():.3f}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="probe", required=True)
    e = sub.add_parser("entropy")
    e.add_argument("--tokens", required=True, help="export_tokens.py --out folder")
    f = sub.add_parser("fine")
    f.add_argument("--cache", required=True)
    f.add_argument("--ckpt", required=True)
    f.add_argument("--decoder", required=True)
    f.add_argument("--taef2", default=os.path.join(os.path.dirname(__file__), "..", "..", "models", "taef2"))
    f.add_argument("--kodak", required=True)
    f.add_argument("--recognizer", required=True)
    a = ap.parse_args()
    entropy(a) if a.probe == "entropy" else fine(a)


if __name__ == "__main__":
    main()
