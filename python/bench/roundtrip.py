"""A Python turn against the Rust client's, on loopback, against the same server.

Starts `unimic serve --agent echo` (the Rust server, its own process), then alternates rounds
of the same turns sent by the Rust client (`cargo run --example turns`, its own process) and by
the Python client (`unimic.Client`, in this process), and prints per round the median round
trip of each (from sending the turn to the end of its reply) and their ratio, and the median
over rounds:

    python python/bench/roundtrip.py                  # release builds of the Rust side
    python python/bench/roundtrip.py --turns 500 --rounds 7 --json

Turns: `text` (a 5-word question; the echo replies with it), `grid` (the question and the
256×256 centre crop of samples/kodim23.png as its 16×16 token grid, coded with the generic
transformer; the echo replies with both), and with `--photo` also `photo` (the same crop as
pixels, tokenized by the client every turn). Both clients connect alike: the shipped models,
context reuse on; neither detokenizes the reply's image.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

from PIL import Image, ImageOps

import unimic

REPO = Path(__file__).resolve().parents[2]
QUESTION = "What is in this photo?"


def build(profile: str) -> Dict[str, Path]:
    args = ["cargo", "build", "--quiet", "--message-format=json-render-diagnostics",
            "-p", "unimic-cli", "--bin", "unimic", "-p", "unimic-examples", "--example", "turns"]
    if profile == "release":
        args.append("--release")
    out = subprocess.run(args, cwd=REPO, check=True, stdout=subprocess.PIPE).stdout.decode()
    paths = {}
    for line in out.splitlines():
        m = json.loads(line)
        if m.get("reason") == "compiler-artifact" and m.get("executable"):
            paths[m["target"]["name"]] = Path(m["executable"])
    return paths


def start_server(unimic_bin: Path, log: Path) -> Tuple[subprocess.Popen, str, str]:
    """`unimic serve --agent echo` on a loopback port, its output going to `log` (not to a pipe
    this process would have to drain: a thread reading it would compete for the GIL with the
    Python client being measured)."""
    out = open(log, "w")
    p = subprocess.Popen([str(unimic_bin), "serve", "--listen", "127.0.0.1:0", "--agent", "echo"],
                         stdout=out, stderr=subprocess.STDOUT)
    out.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = log.read_text()
        addr = re.search(r"listening on (\S+)", text)
        pin = re.search(r"^pin (\S+)", text, re.M)
        if addr and pin:
            return p, addr.group(1), pin.group(1)
        if p.poll() is not None:
            break
        time.sleep(0.05)
    p.kill()
    raise SystemExit(f"unimic serve printed no address and pin:\n{log.read_text()}")


def rust_round(turns_bin: Path, addr: str, pin: str, kind: str, image: Path, n: int,
               warmup: int) -> List[float]:
    args = [str(turns_bin), addr, pin, "--text", QUESTION, "--turns", str(n),
            "--warmup", str(warmup)]
    if kind == "grid":
        args += ["--grid", str(image)]
    elif kind == "photo":
        args += ["--image", str(image)]
    out = subprocess.run(args, check=True, stdout=subprocess.PIPE).stdout.decode()
    return [json.loads(l)["us"] for l in out.splitlines() if '"turn"' in l]


async def python_round(addr: str, pin: str, kind: str, image: Path, n: int,
                       warmup: int) -> List[float]:
    client = await unimic.Client.connect(addr, pin=pin)
    grid = unimic.tokenize(image) if kind == "grid" else None
    times = []
    for i in range(warmup + n):
        t = time.perf_counter()
        if kind == "text":
            reply = await client.send(QUESTION)
        elif kind == "grid":
            reply = await client.send(QUESTION, grids=[grid], decode_images=False)
        else:
            reply = await client.send(QUESTION, images=[image], decode_images=False)
        async for _ in reply:
            pass
        if i >= warmup:
            times.append((time.perf_counter() - t) * 1e6)
    await client.close()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--turns", type=int, default=300, help="turns per round and client")
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--profile", choices=["release", "dev"], default="release",
                    help="build of the Rust server and client (match the Python extension's)")
    ap.add_argument("--photo", action="store_true", help="also the photo-as-pixels turn")
    ap.add_argument("--only", choices=["text", "grid", "photo"],
                    help="run only this kind of turn")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    bins = build(a.profile)
    tmp = Path(tempfile.mkdtemp(prefix="unimic-bench-"))
    crop = tmp / "kodim23-256.png"
    with Image.open(REPO / "samples" / "kodim23.png") as f:
        ImageOps.fit(f.convert("RGB"), (256, 256), Image.Resampling.BICUBIC).save(crop)
    server, addr, pin = start_server(bins["unimic"], tmp / "serve.log")
    kinds = [a.only] if a.only else ["text", "grid"] + (["photo"] if a.photo else [])
    results = {}
    try:
        for kind in kinds:
            n = a.turns if kind != "photo" else max(5, a.turns // 30)
            w = a.warmup if kind != "photo" else 2
            rows = []
            for r in range(a.rounds):
                # Alternate which client goes first, so neither always runs on a warmer machine.
                order = ["rust", "python"] if r % 2 == 0 else ["python", "rust"]
                got = {}
                for who in order:
                    if who == "rust":
                        got[who] = rust_round(bins["turns"], addr, pin, kind, crop, n, w)
                    else:
                        got[who] = asyncio.run(python_round(addr, pin, kind, crop, n, w))
                rust_p50 = statistics.median(got["rust"])
                py_p50 = statistics.median(got["python"])
                rows.append({"round": r + 1, "rust_p50_us": rust_p50, "python_p50_us": py_p50,
                             "rust_mean_us": statistics.mean(got["rust"]),
                             "python_mean_us": statistics.mean(got["python"]),
                             "ratio_p50": py_p50 / rust_p50})
                if not a.json:
                    print(f"{kind:5} round {r + 1}: rust p50 {rust_p50:9.1f} us, "
                          f"python p50 {py_p50:9.1f} us, ratio {py_p50 / rust_p50:.3f}",
                          flush=True)
            results[kind] = {
                "turns_per_round": n,
                "rounds": rows,
                "median_ratio_p50": statistics.median(r["ratio_p50"] for r in rows),
                "median_rust_p50_us": statistics.median(r["rust_p50_us"] for r in rows),
                "median_python_p50_us": statistics.median(r["python_p50_us"] for r in rows),
            }
    finally:
        server.terminate()
        server.wait(10)
    if a.json:
        print(json.dumps({"profile": a.profile, "results": results}, indent=1))
    else:
        for kind, r in results.items():
            print(f"{kind:5}: median over {a.rounds} rounds of {r['turns_per_round']} turns: "
                  f"rust p50 {r['median_rust_p50_us']:.1f} us, python p50 "
                  f"{r['median_python_p50_us']:.1f} us, python/rust {r['median_ratio_p50']:.3f}")


if __name__ == "__main__":
    sys.exit(main())
