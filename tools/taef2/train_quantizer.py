"""Train the unimic quantizer between TAEF2's frozen encoder and decoder, on cached latents.

Stage `latent`: latent MSE + commitment, EMA residual codebooks (k-means initialised, dead codes
restarted), quantizer dropout (half the batches use level 1 only, the rest 2..L levels) so every
prefix of the ladder decodes. Optional `--adv W`: a small latent-space discriminator (hinge loss)
pushes the reconstructed latents towards real latent statistics, so the decoder draws texture
instead of blur. Optional `--pixel W`: an L1 pixel loss through the frozen TAEF2 decoder on small
windows. Checkpoints (resumable) and a validation record every `--eval-every` steps.

    python train_quantizer.py --cache runs/taef2/cache.pt --taef2 models/taef2 --out runs/taef2/q1
"""
import argparse, json, math, os, time
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from taef2 import Quantizer, load_taef2


class Disc(nn.Module):
    def __init__(self, ch=64):
        super().__init__()
        sn = nn.utils.spectral_norm
        self.net = nn.Sequential(
            sn(nn.Conv2d(32, ch, 3, padding=1)), nn.LeakyReLU(0.2),
            sn(nn.Conv2d(ch, 2 * ch, 4, stride=2, padding=1)), nn.LeakyReLU(0.2),
            sn(nn.Conv2d(2 * ch, 2 * ch, 3, padding=1)), nn.LeakyReLU(0.2),
            sn(nn.Conv2d(2 * ch, 1, 3, padding=1)))

    def forward(self, z):
        return self.net(z)


def windows(data, n, side, gen):
    out_z, out_x = [], []
    for _ in range(n):
        x, z = data[int(torch.randint(0, len(data), (1,), generator=gen))]
        _, h, w = z.shape
        t = int(torch.randint(0, h - side + 1, (1,), generator=gen))
        l = int(torch.randint(0, w - side + 1, (1,), generator=gen))
        out_z.append(z[:, t:t + side, l:l + side].float())
        out_x.append(x[:, 8 * t:8 * (t + side), 8 * l:8 * (l + side)])
    return torch.stack(out_z), torch.stack(out_x)


@torch.no_grad()
def kmeans_init(q, data, gen, n=16384, iters=12):
    z, _ = windows(data, n // 64, 16, gen)
    e = q.down(z).permute(0, 2, 3, 1).reshape(-1, q.dim)
    r = e
    for l in range(q.levels):
        c = r[torch.randperm(r.shape[0], generator=gen)[:q.codes]].clone()
        for _ in range(iters):
            i = q.nearest(r, c)
            s = torch.zeros_like(c).index_add_(0, i, r)
            cnt = torch.bincount(i, minlength=q.codes).float()
            live = cnt > 0
            c[live] = s[live] / cnt[live, None]
        q.codebooks[l].copy_(c)
        q.ema_sum[l].copy_(c)
        q.ema_count[l].fill_(1.0)
        r = r - c[q.nearest(r, c)]


def psnr(a, b):
    mse = ((a - b) ** 2).mean().item()
    return 10 * math.log10(1.0 / max(mse, 1e-12))


@torch.no_grad()
def evaluate(q, dec, val, levels_list, recog=None):
    res = {}
    for n in levels_list:
        ps, cos = [], []
        for x, z in val:
            e = q.down(z[None].float())
            idx, _, qs, _ = q.quantize(e, n)
            y = dec(q.up(qs)).clamp(0, 1)
            xf = x[None].float() / 255
            y8 = (y * 255).round() / 255
            ps.append(psnr(y8, xf))
            if recog is not None:
                cos.append(recog(xf, y8))
        res[f"L{n}"] = {"psnr": float(np.mean(ps))}
        if cos:
            res[f"L{n}"]["cosine"] = float(np.mean(cos))
    return res


def make_recognizer(path):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])

    def probs(x):
        v = (x * 255 - 127) / 128
        lo = s.run(None, {"input": v.numpy().astype(np.float32)})[0][0]
        p = np.exp(lo - lo.max())
        return p / p.sum()

    def cos(a, b):
        pa, pb = probs(a), probs(b)
        return float(pa @ pb / (np.linalg.norm(pa) * np.linalg.norm(pb)))
    return cos


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", required=True)
    ap.add_argument("--taef2", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--resume")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--side", type=int, default=16, help="latent window side")
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--ch", type=int, default=96)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--codes", type=int, default=1024)
    ap.add_argument("--levels", type=int, default=4)
    ap.add_argument("--res", type=int, default=2)
    ap.add_argument("--beta", type=float, default=0.25)
    ap.add_argument("--adv", type=float, default=0.0)
    ap.add_argument("--adv-start", type=int, default=0)
    ap.add_argument("--pixel", type=float, default=0.0)
    ap.add_argument("--pixel-side", type=int, default=8)
    ap.add_argument("--pixel-batch", type=int, default=0, help="windows of the batch that get the pixel loss (0: all)")
    ap.add_argument("--decoder-lr", type=float, default=0.0,
                    help="> 0: fine-tune the TAEF2 decoder too (on the pixel loss), at this rate")
    ap.add_argument("--freeze-quantizer", action="store_true",
                    help="train only the decoder (with --decoder-lr)")
    ap.add_argument("--level1-frac", type=float, default=0.5)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--val-limit", type=int, default=24)
    ap.add_argument("--recognizer", default="")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reload-every", type=int, default=0,
                    help="re-read the cache (or CACHE.partial, whichever is newer) every N steps, "
                         "so training can start while cache_latents.py still runs")
    ap.add_argument("--threads-after-cache", type=int, default=0,
                    help="torch threads once the complete cache is read (0: unchanged)")
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    os.makedirs(a.out, exist_ok=True)
    def load_cache():
        paths = [p for p in (a.cache, a.cache + ".partial") if os.path.exists(p)]
        path = max(paths, key=os.path.getmtime)
        c = torch.load(path)
        tr = [(x, z) for x, z in c["train"] if z.shape[1] >= a.side and z.shape[2] >= a.side]
        if path == a.cache and a.threads_after_cache:
            torch.set_num_threads(a.threads_after_cache)
        print(f"cache {path}: {len(tr)} training images, {torch.get_num_threads()} threads", flush=True)
        return tr, c["val"][:a.val_limit]

    train, val = load_cache()
    _, dec = load_taef2(a.taef2)
    for p in dec.parameters():
        p.requires_grad_(a.decoder_lr > 0)
    dec_opt = torch.optim.AdamW(dec.parameters(), lr=a.decoder_lr, betas=(0.9, 0.99),
                                weight_decay=0.0) if a.decoder_lr > 0 else None
    q = Quantizer(a.ch, a.dim, a.codes, a.levels, a.res)
    disc = Disc() if a.adv > 0 else None
    opt = torch.optim.AdamW(q.parameters(), lr=a.lr, betas=(0.9, 0.99), weight_decay=1e-4)
    dopt = torch.optim.AdamW(disc.parameters(), lr=a.lr, betas=(0.5, 0.9)) if disc else None
    step, hist, best = 0, [], None
    if a.resume:
        ck = torch.load(a.resume)
        q.load_state_dict(ck["q"])
        if ck.get("opt") and not ck.get("args", {}).get("ch") != a.ch:
            try:
                opt.load_state_dict(ck["opt"])
            except Exception as err:  # different param groups: fresh optimiser
                print("optimiser not resumed:", err)
        if disc is not None and ck.get("disc"):
            disc.load_state_dict(ck["disc"])
        if ck.get("dec"):
            dec.load_state_dict(ck["dec"])
        step = ck["step"]
        print("resumed at", step)
    else:
        kmeans_init(q, train, gen)
    recog = make_recognizer(a.recognizer) if a.recognizer else None
    t0 = time.time()
    last_ck = time.time()
    while step < a.steps:
        lr = a.lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / a.steps))))
        for g in opt.param_groups:
            g["lr"] = 0.0 if a.freeze_quantizer else lr
        if dec_opt is not None:
            for g in dec_opt.param_groups:
                g["lr"] = a.decoder_lr * lr / a.lr
        z, x = windows(train, a.batch, a.side, gen)
        n = 1 if torch.rand(1, generator=gen).item() < a.level1_frac else int(torch.randint(2, a.levels + 1, (1,), generator=gen))
        zh, e, qs, idx, inputs = q(z, n)
        l_lat = F.mse_loss(zh, z)
        l_com = F.mse_loss(e, qs.detach())
        loss = l_lat + a.beta * l_com
        logs = {"lat": l_lat.item(), "commit": l_com.item(), "n": n}
        use_adv = disc is not None and step >= a.adv_start
        if use_adv:
            # discriminator step
            dr = disc(z)
            df = disc(zh.detach())
            d_loss = F.relu(1 - dr).mean() + F.relu(1 + df).mean()
            dopt.zero_grad()
            d_loss.backward()
            dopt.step()
            g_adv = -disc(zh).mean()
            loss = loss + a.adv * g_adv
            logs.update(d=d_loss.item(), g=g_adv.item())
        if a.pixel > 0:
            ps = a.pixel_side
            t = int(torch.randint(0, a.side - ps + 1, (1,), generator=gen))
            l = int(torch.randint(0, a.side - ps + 1, (1,), generator=gen))
            pb = a.pixel_batch or a.batch
            y = dec(zh[:pb, :, t:t + ps, l:l + ps])
            xt = x[:pb, :, 8 * t:8 * (t + ps), 8 * l:8 * (l + ps)].float() / 255
            l_pix = F.l1_loss(y, xt)
            loss = loss + a.pixel * l_pix
            logs["pix"] = l_pix.item()
        opt.zero_grad()
        if dec_opt is not None:
            dec_opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(q.parameters(), 1.0)
        if not a.freeze_quantizer:
            opt.step()
            q.ema_update(inputs, step)
        if dec_opt is not None:
            torch.nn.utils.clip_grad_norm_(dec.parameters(), 1.0)
            dec_opt.step()
        step += 1
        if a.reload_every and step % a.reload_every == 0:
            train, _ = load_cache()
        if step % 25 == 0:
            used = [int((q.last_used[l] > step - 200).sum()) for l in range(a.levels)]
            print(json.dumps({"step": step, "s": round(time.time() - t0), "lr": lr, **{k: round(v, 4) if isinstance(v, float) else v for k, v in logs.items()}, "live": used}), flush=True)
        if step % a.eval_every == 0 or step == a.steps or time.time() - last_ck > 600:
            last_ck = time.time()
            ev = evaluate(q, dec, val, [1, a.levels], recog) if (step % a.eval_every == 0 or step == a.steps) else None
            ck = {"q": q.state_dict(), "opt": opt.state_dict(), "disc": disc.state_dict() if disc else None,
                  "dec": dec.state_dict() if dec_opt is not None else None, "step": step, "args": vars(a)}
            torch.save(ck, os.path.join(a.out, "latest.pt"))
            if ev is not None:
                rec = {"step": step, "s": round(time.time() - t0), **ev}
                hist.append(rec)
                print("EVAL", json.dumps(rec), flush=True)
                with open(os.path.join(a.out, "history.jsonl"), "a") as f:
                    f.write(json.dumps(rec) + "\n")
                torch.save(ck, os.path.join(a.out, f"step{step}.pt"))
    export(q, a, os.path.join(a.out, "quantizer.safetensors"))
    if dec_opt is not None:
        save_file({k: v.detach().half().contiguous() for k, v in dec.state_dict().items()},
                  os.path.join(a.out, "decoder.safetensors"))


def export(q, a, path):
    sd = {k: v.detach().float().contiguous() for k, v in q.state_dict().items()
          if k not in ("ema_count", "ema_sum", "last_used")}
    save_file(sd, path, metadata={"ch": str(a.ch), "dim": str(a.dim), "codes": str(a.codes),
                                  "levels": str(a.levels), "res": str(a.res)})
    print("exported", path)


if __name__ == "__main__":
    main()
