"""PSNR and recognizer cosine of train_quantizer.py checkpoints on the Kodak 256x256 centre crops.

A quick PyTorch check between checkpoints (levels 1 and L); `unimic bench tokenizer` is the
reference measurement of the shipped tokenizer.

    python eval_kodak.py --kodak ../shared/data/kodak --taef2 models/taef2 \
        --recognizer ../shared/models/recognizers/efficientnet_lite0.onnx runs/taef2/q2/latest.pt ...
"""
import argparse, os
import torch
from PIL import Image
from taef2 import Quantizer, load_taef2
from train_quantizer import evaluate, make_recognizer
from cache_latents import centre256, to_tensor

ap = argparse.ArgumentParser()
ap.add_argument("--kodak", required=True)
ap.add_argument("--taef2", required=True)
ap.add_argument("--recognizer", required=True)
ap.add_argument("checkpoints", nargs="+")
a = ap.parse_args()
torch.set_grad_enabled(False)
enc, _ = load_taef2(a.taef2)
val = []
for f in sorted(os.listdir(a.kodak)):
    x = to_tensor(centre256(Image.open(os.path.join(a.kodak, f)).convert("RGB")))
    val.append((x, enc(x[None].float() / 255)[0]))
recog = make_recognizer(a.recognizer)
for path in a.checkpoints:
    ck = torch.load(path)
    ar = ck["args"]
    q = Quantizer(ar["ch"], ar["dim"], ar["codes"], ar["levels"], ar["res"])
    q.load_state_dict(ck["q"])
    _, dec = load_taef2(a.taef2)
    if ck.get("dec"):
        dec.load_state_dict(ck["dec"])
    print(path, ck["step"], evaluate(q, dec, val, [1, ar["levels"]], recog), flush=True)
