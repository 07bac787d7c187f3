"""Package a train_quantizer.py checkpoint as a tokenizer directory the codec loads.

Writes OUT/quantizer.safetensors (f32), OUT/decoder.safetensors (f16, only when the checkpoint
fine-tuned the decoder; otherwise the manifest points at ../taef2/taef2_decoder.safetensors) and
OUT/manifest.json (format `unimic-taef2-tokenizer/1`, read by `codec/src/tokenizer/taef2.rs`).

    python package.py --ckpt runs/taef2/q2/latest.pt --out models/tokenizer-taef2 \
        --name unimic-taef2-rvq4-k1024 --record runs/taef2/record.json

`--decoder FILE` ships that decoder (f16 safetensors, e.g. one `train_decoder.py` wrote) instead
of the checkpoint's.
"""
import argparse, hashlib, json, os
import torch
from safetensors.torch import save_file

ap = argparse.ArgumentParser()
ap.add_argument("--ckpt", required=True)
ap.add_argument("--out", required=True)
ap.add_argument("--name", required=True)
ap.add_argument("--taef2-rel", default="../taef2", help="TAEF2 folder relative to --out")
ap.add_argument("--record", help="JSON file merged into the manifest's `training`")
ap.add_argument("--decoder", help="decoder safetensors to ship instead of the checkpoint's")
a = ap.parse_args()
ck = torch.load(a.ckpt)
ar = ck["args"]
os.makedirs(a.out, exist_ok=True)
sd = {k: v.detach().float().contiguous() for k, v in ck["q"].items()
      if k not in ("ema_count", "ema_sum", "last_used")}
save_file(sd, os.path.join(a.out, "quantizer.safetensors"))
files = {"quantizer": "quantizer.safetensors", "encoder": f"{a.taef2_rel}/taef2_encoder.safetensors"}
if a.decoder:
    with open(a.decoder, "rb") as src, open(os.path.join(a.out, "decoder.safetensors"), "wb") as dst:
        dst.write(src.read())
    files["decoder"] = "decoder.safetensors"
elif ck.get("dec"):
    save_file({k: v.detach().half().contiguous() for k, v in ck["dec"].items()},
              os.path.join(a.out, "decoder.safetensors"))
    files["decoder"] = "decoder.safetensors"
else:
    files["decoder"] = f"{a.taef2_rel}/taef2_decoder.safetensors"


def sha(rel):
    return hashlib.sha256(open(os.path.join(a.out, rel), "rb").read()).hexdigest()


training = {"checkpoint_step": ck["step"], "args": ar}
if a.record:
    training.update(json.load(open(a.record)))
manifest = {
    "format": "unimic-taef2-tokenizer/1",
    "name": a.name,
    "architecture": "taef2-rvq",
    "config": {k: ar[k] for k in ("ch", "dim", "codes", "levels", "res")},
    "files": {k: {"path": v, "sha256": sha(v)} for k, v in files.items()},
    "training": training,
}
with open(os.path.join(a.out, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=2)
    f.write("\n")
print(json.dumps(manifest["files"], indent=1))
