"""Encode the training photos once with the TAEF2 encoder and cache the latents (and the pixels).

Never Kodak. Train: bsds500/train + bsds500/val (each at three scales, the larger two also mirrored) and the
first 600 Flickr images (by name); validation: the first 60 images of bsds500/test at 256x256 centre
crops (shorter side resized to 256, as `unimic bench tokenizer --size 256` prepares Kodak).

    python cache_latents.py --data ../../../shared/data --taef2 ../../models/taef2 --out runs/taef2/cache.pt
"""
import argparse, os, time
import numpy as np
import torch
from PIL import Image
from taef2 import load_taef2


def to_tensor(im):
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)


def fit16(im):
    w, h = im.size
    return im.crop((0, 0, w - w % 16, h - h % 16))


def centre256(im):
    w, h = im.size
    s = 256 / min(w, h)
    im = im.resize((max(256, round(w * s)), max(256, round(h * s))), Image.BICUBIC)
    w, h = im.size
    l, t = (w - 256) // 2, (h - 256) // 2
    return im.crop((l, t, l + 256, t + 256))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--taef2", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--scales", default="0.8,0.6,0.45")
    ap.add_argument("--flickr", type=int, default=600)
    ap.add_argument("--save-every", type=int, default=400)
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    enc, _ = load_taef2(a.taef2)
    train, val = [], []
    bsds = [os.path.join(a.data, "bsds500", s, f) for s in ("train", "val")
            for f in sorted(os.listdir(os.path.join(a.data, "bsds500", s))) if f.endswith(".jpg")]
    fl_dir = os.path.join(a.data, "flickr8k-1000", "images")
    flickr = [os.path.join(fl_dir, f) for f in sorted(os.listdir(fl_dir))][:900]
    test_dir = os.path.join(a.data, "bsds500", "test")
    tests = [os.path.join(test_dir, f) for f in sorted(os.listdir(test_dir)) if f.endswith(".jpg")][:60]
    scales = [float(s) for s in a.scales.split(",")]
    # mirrored copies of every scale but the smallest; Flickr (200 px) as it is; a fixed shuffle so
    # that a partial cache (written every --save-every jobs) already mixes every source
    jobs = [(p, s, fl) for p in bsds for s in scales for fl in ((False, True) if s != scales[-1] else (False,))]
    jobs += [(p, 1.0, False) for p in flickr[:a.flickr]]
    jobs = [jobs[i] for i in torch.randperm(len(jobs), generator=torch.Generator().manual_seed(0))]
    for p in tests:
        x = to_tensor(centre256(Image.open(p).convert("RGB")))
        val.append((x, enc(x[None].float() / 255)[0].half()))
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    t0 = time.time()
    for n, (p, s, fl) in enumerate(jobs):
        if n % a.save_every == 0 and n > 0:
            torch.save({"train": train, "val": val, "partial": True}, a.out + ".partial")
        im = Image.open(p).convert("RGB")
        if s != 1.0:
            im = im.resize((round(im.size[0] * s), round(im.size[1] * s)), Image.BICUBIC)
        if fl:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        im = fit16(im)
        x = to_tensor(im)
        z = enc(x[None].float() / 255)[0]
        train.append((x, z.half()))
        if n % 100 == 0:
            print(f"{n}/{len(jobs)} {time.time() - t0:.0f}s", flush=True)
    torch.save({"train": train, "val": val, "sources": {"bsds": len(bsds), "flickr": a.flickr,
                "scales": scales, "val": len(tests)}}, a.out)
    print("done", len(train), len(val), f"{time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
