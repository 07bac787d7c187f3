"""Record golden outputs of the *reference* TAEF2 implementation for the Rust tests.

Runs upstream `taesd.py` (madebyollin/taesd, commit 5cccb12; not part of this repository: pass the
path of a checkout) with its own `taef2_*.pth` files, checks that this folder's re-implementation
with the shipped safetensors agrees, and writes a 64x64 crop of samples/kodim23.png, its latents and
the decoded image (f32) to codec/tests/data/taef2-golden.safetensors.

    python record_golden.py --upstream /path/to/taesd --out ../../codec/tests/data/taef2-golden.safetensors
"""
import argparse, importlib.util, os
import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from taef2 import load_taef2

ap = argparse.ArgumentParser()
ap.add_argument("--upstream", required=True, help="directory with taesd.py and taef2_*.pth")
ap.add_argument("--out", required=True)
a = ap.parse_args()
here = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("taesd", os.path.join(a.upstream, "taesd.py"))
ref = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ref)
torch.set_grad_enabled(False)
model = ref.TAESD(os.path.join(a.upstream, "taef2_encoder.pth"), os.path.join(a.upstream, "taef2_decoder.pth")).float()
im = Image.open(os.path.join(here, "../../samples/kodim23.png")).convert("RGB")
w, h = im.size
im = im.crop((w // 2 - 32, h // 2 - 32, w // 2 + 32, h // 2 + 32))
x8 = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)[None]
x = x8.float() / 255
z = model.encoder(x)
y = model.decoder(z)
enc, dec = load_taef2(os.path.join(here, "../../models/taef2"))
z2, y2 = enc(x), dec(z)
print("ours vs reference: latent max diff", (z - z2).abs().max().item(), "image max diff", (y - y2).abs().max().item())
assert (z - z2).abs().max() < 1e-4 and (y - y2).abs().max() < 1e-4
save_file({"input_rgb8": x8[0].contiguous(), "latent": z[0].contiguous(), "decoded": y[0].contiguous()}, a.out)
print("wrote", a.out, tuple(z.shape), tuple(y.shape))
