"""Teach a trained entropy model the grid positions its training never reached.

Every grid `unimic train entropy` trains on is 16x16, so rows and columns 16-63 of the position
tables (`row_emb`, `col_emb`, and the masked model's `known_row_emb`, `known_col_emb`) keep their
random initial values, and a larger grid (a photo at native size: Kodak is 48x32 tokens) is coded
with noise for positions. This script trains those rows only, on whole-image token grids of varied
sizes, with every other tensor frozen and rows 0-15 restored after each step: the model codes a
16x16 grid bit for bit as before, and larger grids get learned positions.

With `--all-tensors`, every tensor trains on those grids instead (the start's rows are kept as
they are unless `--rows-from` is given), so a 16x16 grid codes differently afterwards and the
record carries its new 16x16 validation loss.

Start: rows >= --from-row are set to a copy of row --from-row - 1 (the last trained row, which
measured better than any interior row or a mean), or, with `--rows-from FILE`, to those rows of
FILE (a model of the same architecture whose rows were trained before, such as the previous
version of a model fine-tuned since on 16x16 grids: its rows are a closer start). Then Adam (no
weight decay) on windows of random size (each side 16..the grid's, at least one side above 16) and
whole grids, one shape per batch. The best checkpoint by the large-grid validation loss is kept, with a `.train.json`
record beside it for `unimic train entropy --import` (which re-measures the 16x16 validation
loss with the candle networks and refuses a mismatch).

Data: token-grid files of whole images (docs/CODING.md section 5), one shape per file, as
`codec/examples/...` or `unimic bench` write them; validation: whole grids of held-out images
plus the 16x16 validation set of `unimic train entropy --export-data` (measured as
train_entropy.py measures it, captions included for the text model; it must stay unchanged).
"""

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_entropy import (Data, add_model_args, model_of, random_unknown, read_umtg,  # noqa: E402
                           validate)
from safetensors.torch import load_file, save_file  # noqa: E402

TABLES = {"generic": ["row_emb", "col_emb"], "text": ["row_emb", "col_emb"],
          "masked": ["row_emb", "col_emb", "known_row_emb", "known_col_emb"]}


def load_sets(paths, dev):
    out = []
    for p in paths:
        ids, (h, w, k) = read_umtg(p)
        out.append((torch.tensor(ids, device=dev), h, w, k))
    return out


def loss_on(net, ids, h, w, gen):
    if net.kind == "generic":
        return net.loss_generic(ids, h, w)
    if net.kind == "text":  # no caption: the image part's positions are what is trained
        none = torch.zeros(ids.shape[0], 0, dtype=torch.long, device=ids.device)
        return net.loss_text(ids, h, w, none, torch.zeros(ids.shape[0], dtype=torch.long))
    return net.loss_masked(ids, h, w, random_unknown(ids.shape[0], h, w, gen, ids.device))


@torch.no_grad()
def evaluate(net, sets, batch):
    """Mean bits per token over every grid of `sets` (masked: a fixed seed per pass)."""
    net.eval()
    g = torch.Generator(device=sets[0][0].device)
    g.manual_seed(0x76616C6964617465)
    total, count = 0.0, 0
    for ids, h, w, _ in sets:
        for i in range(0, len(ids), batch):
            x = ids[i:i + batch]
            total += loss_on(net, x, h, w, g).item() * x.numel()
            count += x.numel()
    net.train()
    return total / count


def window_batch(sets, weights, batch, min_side, gen):
    """`batch` windows of one random shape from one grid file (whole grids half the time)."""
    j = torch.multinomial(weights, 1, generator=gen).item()
    ids, h, w, _ = sets[j]
    if torch.rand(1, generator=gen).item() < 0.5:
        wh, ww = h, w
    else:
        while True:
            wh = int(torch.randint(min(min_side, h), h + 1, (1,), generator=gen))
            ww = int(torch.randint(min(min_side, w), w + 1, (1,), generator=gen))
            if max(wh, ww) > min_side:
                break
    pick = torch.randint(0, len(ids), (batch,), generator=gen)
    r0 = torch.randint(0, h - wh + 1, (batch,), generator=gen)
    c0 = torch.randint(0, w - ww + 1, (batch,), generator=gen)
    r = r0[:, None, None] + torch.arange(wh)[None, :, None]
    c = c0[:, None, None] + torch.arange(ww)[None, None, :]
    cells = (r * w + c).reshape(batch, -1).to(ids.device)
    return ids[pick.to(ids.device)].gather(1, cells), wh, ww


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kind", choices=sorted(TABLES), required=True)
    ap.add_argument("--init", required=True, help="the trained model's .safetensors")
    ap.add_argument("--grids", action="append", required=True,
                    help="token-grid file of whole training images (repeatable)")
    ap.add_argument("--val-grids", action="append", required=True,
                    help="token-grid file of whole held-out images (repeatable)")
    ap.add_argument("--val16", required=True,
                    help="folder from `unimic train entropy --export-data` (its val.umtg)")
    ap.add_argument("--out", required=True, help="output .safetensors")
    ap.add_argument("--from-row", type=int, default=16)
    ap.add_argument("--rows-from",
                    help="start rows >= --from-row from this .safetensors (same tables and shapes)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--time-budget", type=float, default=0.0,
                    help="seconds of training: the first 30 steps are timed and --steps is fixed"
                         " to what fits (evaluations included, estimated at 10%%); the record"
                         " names the number")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--all-tensors", action="store_true",
                    help="train every tensor on the whole-image grids (rows < --from-row too), not"
                         " only the position rows beyond --from-row: a 16x16 grid then codes"
                         " differently, and the record carries the new 16x16 validation loss")
    ap.add_argument("--weight-decay", type=float, default=0.0,
                    help="AdamW weight decay (with --all-tensors)")
    ap.add_argument("--dropout", type=float, default=0.0, help="dropout (with --all-tensors)")
    add_model_args(ap)
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    torch.manual_seed(a.seed)
    train = load_sets(a.grids, dev)
    val = load_sets(a.val_grids, dev)
    val16 = Data([a.val16], a.kind == "text", a.text_vocab, a.max_text, dev)
    k = train[0][3]
    if any(s[3] != k for s in train + val) or val16.k != k:
        sys.exit("token-grid files disagree on the codebook size")
    if max(max(s[1], s[2]) for s in train) <= a.from_row:
        sys.exit(f"no training grid has a side above {a.from_row}: nothing to learn")

    net = model_of(a, k, a.dropout if a.all_tensors else 0.0).to(dev)
    src = load_file(a.init)
    net.load_state_dict({n: t.to(dev) for n, t in src.items()}, strict=True)
    tables = [getattr(net, t).weight for t in TABLES[a.kind]]
    rows_src = load_file(a.rows_from) if a.rows_from else None
    with torch.no_grad():
        for name, t in zip(TABLES[a.kind], tables):
            if rows_src is None and a.all_tensors:
                continue  # every tensor trains on: the start's rows are kept as they are
            if rows_src is None:
                t[a.from_row:] = t[a.from_row - 1]
                continue
            r = rows_src.get(name + ".weight")
            if r is None or tuple(r.shape) != tuple(t.shape):
                sys.exit(f"{a.rows_from} has no {name}.weight of shape {tuple(t.shape)}")
            t[a.from_row:] = r[a.from_row:].to(t.dtype).to(dev)
    frozen = [t[:a.from_row].clone() for t in tables]
    for p in net.parameters():
        p.requires_grad_(a.all_tensors)
    for t in tables:
        t.requires_grad_(True)
    trained = [p for p in net.parameters() if p.requires_grad]

    v16 = validate(net, val16, 256, 64)
    v0 = evaluate(net, val, 8)
    print(json.dumps({"kind": a.kind, "train_files": len(train),
                      "train_grids": sum(len(s[0]) for s in train),
                      "val_grids": sum(len(s[0]) for s in val), "val16": v16,
                      "val0_after_copy": v0, "rows_from": a.rows_from}), flush=True)
    # Files whose grids reach no row or column >= --from-row teach nothing: never drawn.
    weights = torch.tensor([float(len(s[0]) * s[1] * s[2]) if max(s[1], s[2]) > a.from_row
                            else 0.0 for s in train])
    opt = torch.optim.AdamW(trained, lr=a.lr, betas=(0.9, 0.95), weight_decay=a.weight_decay)
    gen = torch.Generator()
    gen.manual_seed(a.seed)
    mgen = torch.Generator(device=dev)
    mgen.manual_seed(a.seed + 1)
    t0 = time.time()
    best = (v0, 0)
    window = []
    descs = " + ".join(f"{os.path.basename(p)} ({len(s[0])} grids of {s[1]}x{s[2]})"
                       for p, s in zip(a.grids, train))
    vdescs = " + ".join(f"{os.path.basename(p)} ({len(s[0])} grids of {s[1]}x{s[2]})"
                        for p, s in zip(a.val_grids, val))

    def save(step, train_bits, val_bits):
        v16_now = validate(net, val16, 256, 64) if a.all_tensors else v16
        tensors = {n: v.detach().float().contiguous().cpu() for n, v in net.state_dict().items()}
        save_file(tensors, a.out)
        record = {"steps": step, "batch_size": a.batch_size, "seed": a.seed,
                  "data": ((f"every tensor of {os.path.basename(a.init)} trained on whole-image"
                            f" grids (`unimic tokenize`): {descs}; whole-grid validation"
                            f" ({vdescs}): {val_bits:.4f} bits/token") if a.all_tensors else
                           f"position rows >= {a.from_row} trained on whole-image grids"
                           f" (`unimic tokenize`): {descs};"
                           f" other tensors from {os.path.basename(a.init)}; whole-grid"
                           f" validation ({vdescs}): {val_bits:.4f} bits/token"),
                  "train_bits_per_token": train_bits, "val_bits_per_token": v16_now,
                  "val_large_bits_per_token": val_bits,
                  "command": "python3 " + " ".join(sys.argv),
                  "device": "cpu" if dev.type == "cpu" else f"cuda: {torch.cuda.get_device_name(dev)}",
                  "wall_s": round(time.time() - t0, 1), "planned_steps": a.steps}
        with open(a.out.rsplit(".safetensors", 1)[0] + ".train.json", "w") as f:
            json.dump(record, f, indent=2)

    # Step 0 keeps the start: its training loss is that of the run that wrote --init, when its
    # record lies beside it, else the 16x16 validation loss stands in (JSON has no NaN, and
    # `--import` needs a number).
    init_record = a.init.rsplit(".safetensors", 1)[0] + ".train.json"
    start_train = (json.load(open(init_record)).get("train_bits_per_token", v16)
                   if os.path.exists(init_record) else v16)
    save(0, start_train, v0)
    step, t_loop = 0, time.time()
    while step < a.steps:
        step += 1
        if a.time_budget > 0 and step == 31:
            a.steps = max(31, int(a.time_budget * 0.9 / ((time.time() - t_loop) / 30)))
            print(json.dumps({"planned_steps": a.steps}), flush=True)
        lr = a.lr * 0.5 * (1.0 + math.cos(math.pi * (step - 1) / a.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        ids, wh, ww = window_batch(train, weights, a.batch_size, a.from_row, gen)
        loss = loss_on(net, ids, wh, ww, mgen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if not a.all_tensors:
            for t in tables:
                t.grad[:a.from_row] = 0
        opt.step()
        if not a.all_tensors:
            with torch.no_grad():
                for t, f in zip(tables, frozen):
                    t[:a.from_row] = f
        window.append(loss.item())
        if step % a.eval_every == 0 or step == a.steps:
            tb = sum(window) / len(window)
            window = []
            vb = evaluate(net, val, 8)
            if vb < best[0]:
                best = (vb, step)
                save(step, tb, vb)
            print(json.dumps({"step": step, "train": round(tb, 4), "val": round(vb, 4),
                              "best": round(best[0], 4), "best_step": best[1],
                              "s": round(time.time() - t0, 1)}), flush=True)
    check = validate(net, val16, 256, 64)
    print(json.dumps({"done": a.out, "best": best[0], "best_step": best[1], "val16_end": check,
                      "val16_unchanged": abs(check - v16) < 1e-6}), flush=True)


if __name__ == "__main__":
    main()
