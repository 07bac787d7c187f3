"""Fine-tune TAEF2's decoder on quantized latents so that it keeps the pretrained decoder's
texture while its colours and large shapes follow the photo.

The loss splits every image into a low-pass part (a Gaussian blur of std `--sigma` px) and the
rest (the detail):
    L1(blur(D(z_q)), blur(x))                  colour and layout from the photo
  + detail * L1(D(z_q) - blur(D(z_q)), T - blur(T)),   T = pretrained decoder(z_q) (frozen)
so the decoder is pulled towards the photo where z_q knows it (low frequencies) and towards the
pretrained decoder's own rendering of z_q elsewhere, instead of towards the blur an L1/MSE loss on
the whole image gives. The quantizer is frozen: level-1 tokens do not change. Starts from the
pretrained decoder (or --init). Validation: the cache's val crops (bsds500/test), PSNR and the
recognizer's probability cosine at level 1 and at all levels.

  python3 tools/taef2/train_decoder.py --cache runs/taef2/cache.pt --taef2 models/taef2 \
    --quantizer runs/taef2/q2/latest.pt --out runs/taef2/d1 --steps 1500 \
    --recognizer ../shared/models/recognizers/efficientnet_lite0.onnx
"""
import argparse, json, math, os, sys, time

import torch
import torch.nn.functional as F
from safetensors.torch import save_file, load_file

sys.path.insert(0, os.path.dirname(__file__))
from taef2 import Quantizer, load_taef2  # noqa: E402
from train_quantizer import windows, make_recognizer, psnr  # noqa: E402


def blur(y, s):
    r = max(1, int(math.ceil(3 * s)))
    t = torch.arange(-r, r + 1, dtype=y.dtype)
    k = torch.exp(-t * t / (2 * s * s))
    k = k / k.sum()
    c = y.shape[1]
    y = F.pad(y, (r, r, r, r), mode="replicate")
    y = F.conv2d(y, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(y, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def ssim(a, b):
    """Mean SSIM on luma (0.299 R + 0.587 G + 0.114 B, 0..255), 11-tap Gaussian window of std
    1.5, valid positions only: the definition of `codec/src/tokenizer/metrics.rs`."""
    w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    x, y = (t.mul(255).mul(w).sum(1, keepdim=True).double() for t in (a, b))
    g = torch.exp(-((torch.arange(11) - 5.0) ** 2) / (2 * 1.5 ** 2)).double()
    g = g / g.sum()

    def f(t):
        t = F.conv2d(t, g.view(1, 1, 1, -1))
        return F.conv2d(t, g.view(1, 1, -1, 1))
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = f(x), f(y)
    vx, vy, cxy = f(x * x) - mx * mx, f(y * y) - my * my, f(x * y) - mx * my
    m = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return m.mean().item()


@torch.no_grad()
def quantized(q, z, n):
    _, _, qs, _ = q.quantize(q.down(z), n)
    return q.up(qs)


@torch.no_grad()
def evaluate(q, dec, val, levels, recog):
    out = {}
    for n in levels:
        ps, cs, ss = [], [], []
        for x, z in val:
            xf = x[None].float() / 255
            y = dec(quantized(q, z[None].float(), n)).clamp(0, 1)
            y8 = (y * 255).round() / 255
            ps.append(psnr(y8, xf))
            ss.append(ssim(y8, xf))
            if recog:
                cs.append(recog(xf, y8))
        out[f"L{n}"] = {"psnr": sum(ps) / len(ps), "ssim": sum(ss) / len(ss)}
        if cs:
            out[f"L{n}"]["cosine"] = sum(cs) / len(cs)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", required=True)
    ap.add_argument("--taef2", required=True)
    ap.add_argument("--quantizer", required=True, help="train_quantizer.py checkpoint (frozen)")
    ap.add_argument("--init", default="", help="decoder safetensors to start from (default: pretrained)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--side", type=int, default=16, help="latent window side (8 px each)")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--sigma", type=float, default=2.0)
    ap.add_argument("--detail", type=float, default=1.0)
    ap.add_argument("--level1-frac", type=float, default=0.5)
    ap.add_argument("--eval-every", type=int, default=150)
    ap.add_argument("--val-limit", type=int, default=24)
    ap.add_argument("--recognizer", default="")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    os.makedirs(a.out, exist_ok=True)
    c = torch.load(a.cache)
    train = [(x, z) for x, z in c["train"] if z.shape[1] >= a.side and z.shape[2] >= a.side]
    val = c["val"][:a.val_limit]
    ck = torch.load(a.quantizer)
    ar = ck["args"]
    q = Quantizer(ar["ch"], ar["dim"], ar["codes"], ar["levels"], ar["res"])
    q.load_state_dict(ck["q"])
    q.eval()
    for p in q.parameters():
        p.requires_grad_(False)
    _, teacher = load_taef2(a.taef2)
    for p in teacher.parameters():
        p.requires_grad_(False)
    _, dec = load_taef2(a.taef2)
    if a.init:
        dec.load_state_dict({k: v.float() for k, v in load_file(a.init).items()})
    opt = torch.optim.AdamW(dec.parameters(), lr=a.lr, betas=(0.9, 0.99), weight_decay=0.0)
    step = 0
    state = os.path.join(a.out, "latest.pt")
    if os.path.exists(state):
        s = torch.load(state)
        dec.load_state_dict(s["dec"])
        opt.load_state_dict(s["opt"])
        step = s["step"]
        print("resumed at", step, flush=True)
    recog = make_recognizer(a.recognizer) if a.recognizer else None
    if step == 0:
        ev = evaluate(q, dec, val, [1, q.levels], recog)
        print("EVAL", json.dumps({"step": 0, **ev}), flush=True)
    t0 = time.time()
    while step < a.steps:
        lr = a.lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / a.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        z, x = windows(train, a.batch, a.side, gen)
        n = 1 if torch.rand(1, generator=gen).item() < a.level1_frac else \
            int(torch.randint(2, q.levels + 1, (1,), generator=gen))
        zq = quantized(q, z, n)
        xf = x.float() / 255
        with torch.no_grad():
            t = teacher(zq)
            t_hp = t - blur(t, a.sigma)
        y = dec(zq)
        y_lp = blur(y, a.sigma)
        l_lp = F.l1_loss(y_lp, blur(xf, a.sigma))
        l_hp = F.l1_loss(y - y_lp, t_hp)
        loss = l_lp + a.detail * l_hp
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dec.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 25 == 0:
            print(json.dumps({"step": step, "s": round(time.time() - t0), "lr": round(lr, 7), "n": n,
                              "lp": round(l_lp.item(), 4), "hp": round(l_hp.item(), 4)}), flush=True)
        if step % a.eval_every == 0 or step == a.steps:
            ev = evaluate(q, dec, val, [1, q.levels], recog)
            rec = {"step": step, "s": round(time.time() - t0), **ev}
            print("EVAL", json.dumps(rec), flush=True)
            with open(os.path.join(a.out, "history.jsonl"), "a") as f:
                f.write(json.dumps(rec) + "\n")
            torch.save({"dec": dec.state_dict(), "opt": opt.state_dict(), "step": step, "args": vars(a)}, state)
            save_file({k: v.detach().half().contiguous() for k, v in dec.state_dict().items()},
                      os.path.join(a.out, f"decoder-step{step}.safetensors"))


if __name__ == "__main__":
    main()
