#!/usr/bin/env python3
"""Recognition agreement between original and decoded images (issue 17's semantic yardstick).

Runs the two pretrained recognizers of ``../shared/models/recognizers`` (see its README) on each
original and each decoded image and prints, per pair, one JSON object on a line:

    {"id": ..., "original": ..., "decoded": ...,
     "top1_agree": bool,            # classifier top-1 of decoded == top-1 of original
     "orig_top1_in_top3": bool,     # original's top-1 among the decoded image's top-3
     "prob_cosine": float,          # cosine of the two softmax probability vectors
     "orig_top1": str, "decoded_top1": str,          # ImageNet labels, for reading
     "orig_detections": int,        # YOLOX-nano detections of the original (score > 0.4)
     "decoded_detections": int,     # ... of the decoded image
     "matched_detections": int,     # original detections found again (same class, IoU >= 0.5)
     "detector_recall": float|null} # matched / orig_detections; null when the original has none

Input: a JSON list of pairs, from a file (``--pairs FILE``) or stdin; each pair is
``{"id": ..., "original": PATH, "decoded": PATH}`` (``id`` optional, defaults to the index) or a
two-element list ``[ORIGINAL, DECODED]``. Images are read with Pillow and converted to 8-bit RGB.
Each distinct original is run once.

Preprocessing, exactly as the README says:
* Classifier (``efficientnet_lite0.onnx``): RGB, NCHW float32, ``(v - 127) / 128``, at the image's
  own size (no resizing); softmax over the 1000 logits.
* Detector (``yolox_nano.onnx``): scale by ``r = min(416 / h, 416 / w)`` (Pillow bilinear) to
  ``(round-down w*r, h*r)``, paste at the top-left of a 416×416 canvas filled with 114 (YOLOX's own
  preprocessing), BGR, 0..255 as float32, NCHW. Output rows are decoded on the stride 8/16/32 grids
  (row-major, x fastest): ``cx = (tx + gx) * s``, ``cy = (ty + gy) * s``, ``w = exp(tw) * s``,
  ``h = exp(th) * s``, then divided by ``r`` (original pixel coordinates). Objectness and class
  scores leave the network already through a sigmoid; score = objectness × class score. For each
  class the anchors scoring above 0.4 go through greedy NMS at IoU 0.45 (YOLOX's demo threshold).
* Recall matching: the original's detections, by descending score, each take the unused decoded
  detection of the same class with the highest IoU, if that IoU >= 0.5.

``--threads`` sets onnxruntime's intra-op threads (default 1, one core).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

SCORE_THRESHOLD = 0.4
NMS_IOU = 0.45
MATCH_IOU = 0.5
YOLOX_SIZE = 416
YOLOX_STRIDES = (8, 16, 32)


def default_models_dir() -> Path:
    """``$UNIMIC_SHARED/models/recognizers``, else ``../shared/models/recognizers`` next to the checkout."""
    env = os.environ.get("UNIMIC_SHARED")
    if env:
        return Path(env) / "models" / "recognizers"
    return Path(__file__).resolve().parents[3] / "shared" / "models" / "recognizers"


def load_rgb(path) -> np.ndarray:
    """An image file as an HxWx3 uint8 RGB array."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max()
    e = np.exp(z)
    return e / e.sum()


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of box ``a`` (x0, y0, x1, y1) with each row of ``b``."""
    x0 = np.maximum(a[0], b[:, 0])
    y0 = np.maximum(a[1], b[:, 1])
    x1 = np.minimum(a[2], b[:, 2])
    y1 = np.minimum(a[3], b[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a + area_b - inter, 1e-12)


def nms(boxes: np.ndarray, scores: np.ndarray, thr: float) -> list[int]:
    """Greedy non-maximum suppression; indices kept, by descending score."""
    order = list(np.argsort(-scores, kind="stable"))
    keep = []
    while order:
        i = order.pop(0)
        keep.append(i)
        if not order:
            break
        rest = np.array(order)
        ious = iou(boxes[i], boxes[rest])
        order = [j for j, v in zip(order, ious) if v <= thr]
    return keep


class Recognizers:
    """The classifier and the detector, with the README's preprocessing."""

    def __init__(self, models_dir: Path, threads: int = 1):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        prov = ["CPUExecutionProvider"]
        self.cls = ort.InferenceSession(str(models_dir / "efficientnet_lite0.onnx"), opts, providers=prov)
        self.det = ort.InferenceSession(str(models_dir / "yolox_nano.onnx"), opts, providers=prov)
        self.labels = (models_dir / "imagenet_labels.txt").read_text().splitlines()
        self.coco = (models_dir / "coco_classes.txt").read_text().splitlines()
        grids, strides = [], []
        for s in YOLOX_STRIDES:
            n = YOLOX_SIZE // s
            gy, gx = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
            grids.append(np.stack([gx.ravel(), gy.ravel()], 1))
            strides.append(np.full((n * n, 1), s))
        self.grid = np.concatenate(grids).astype(np.float64)
        self.stride = np.concatenate(strides).astype(np.float64)

    def classify(self, rgb: np.ndarray) -> np.ndarray:
        """Softmax probabilities (1000) of an HxWx3 uint8 RGB image at its own size."""
        x = ((rgb.astype(np.float32) - 127.0) / 128.0).transpose(2, 0, 1)[None]
        logits = self.cls.run(["logits"], {"input": np.ascontiguousarray(x)})[0][0]
        return softmax(logits)

    def detect(self, rgb: np.ndarray):
        """Detections ``(boxes [n,4] x0y0x1y1 in image pixels, scores [n], classes [n])``."""
        h, w = rgb.shape[:2]
        r = min(YOLOX_SIZE / h, YOLOX_SIZE / w)
        nw, nh = int(w * r), int(h * r)
        canvas = np.full((YOLOX_SIZE, YOLOX_SIZE, 3), 114, dtype=np.uint8)
        resized = np.asarray(Image.fromarray(rgb).resize((nw, nh), Image.BILINEAR))
        canvas[:nh, :nw] = resized
        x = canvas[:, :, ::-1].astype(np.float32).transpose(2, 0, 1)[None]
        out = self.det.run(["output"], {"images": np.ascontiguousarray(x)})[0][0].astype(np.float64)
        cxy = (out[:, :2] + self.grid) * self.stride
        wh = np.exp(out[:, 2:4]) * self.stride
        boxes = np.concatenate([cxy - wh / 2, cxy + wh / 2], 1) / r
        scores = out[:, 4:5] * out[:, 5:]
        all_b, all_s, all_c = [], [], []
        for c in range(scores.shape[1]):
            idx = np.nonzero(scores[:, c] > SCORE_THRESHOLD)[0]
            if idx.size == 0:
                continue
            keep = nms(boxes[idx], scores[idx, c], NMS_IOU)
            all_b.append(boxes[idx][keep])
            all_s.append(scores[idx, c][keep])
            all_c.append(np.full(len(keep), c))
        if not all_b:
            return np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=int)
        return np.concatenate(all_b), np.concatenate(all_s), np.concatenate(all_c)

    def analyse(self, rgb: np.ndarray) -> dict:
        """Classifier probabilities and detections of one image."""
        return {"probs": self.classify(rgb), "dets": self.detect(rgb)}


def match_count(orig_dets, dec_dets) -> int:
    """How many original detections the decoded detections recall (same class, IoU >= 0.5)."""
    ob, os_, oc = orig_dets
    db, _, dc = dec_dets
    used = np.zeros(len(db), dtype=bool)
    matched = 0
    for i in np.argsort(-os_, kind="stable"):
        cand = np.nonzero((dc == oc[i]) & ~used)[0]
        if cand.size == 0:
            continue
        ious = iou(ob[i], db[cand])
        j = int(np.argmax(ious))
        if ious[j] >= MATCH_IOU:
            used[cand[j]] = True
            matched += 1
    return matched


def compare(rec: Recognizers, orig: dict, dec: dict) -> dict:
    """The agreement measures of one (original, decoded) pair of :meth:`Recognizers.analyse` results."""
    po, pd = orig["probs"], dec["probs"]
    t_o = int(np.argmax(po))
    top3 = np.argsort(-pd, kind="stable")[:3]
    cos = float(np.dot(po, pd) / (np.linalg.norm(po) * np.linalg.norm(pd)))
    n_o = len(orig["dets"][1])
    m = match_count(orig["dets"], dec["dets"])
    return {
        "top1_agree": bool(int(top3[0]) == t_o),
        "orig_top1_in_top3": bool(t_o in top3.tolist()),
        "prob_cosine": cos,
        "orig_top1": rec.labels[t_o],
        "decoded_top1": rec.labels[int(top3[0])],
        "orig_detections": n_o,
        "decoded_detections": len(dec["dets"][1]),
        "matched_detections": m,
        "detector_recall": (m / n_o) if n_o else None,
    }


def parse_pairs(data) -> list[dict]:
    """Normalises the input list to ``{"id", "original", "decoded"}`` dictionaries."""
    if not isinstance(data, list):
        raise ValueError("expected a JSON list of pairs")
    out = []
    for i, p in enumerate(data):
        if isinstance(p, dict):
            out.append({"id": p.get("id", i), "original": p["original"], "decoded": p["decoded"]})
        elif isinstance(p, (list, tuple)) and len(p) == 2:
            out.append({"id": i, "original": p[0], "decoded": p[1]})
        else:
            raise ValueError(f"pair {i}: expected an object or a two-element list")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", help="JSON file of pairs (default: stdin)")
    ap.add_argument("--models", type=Path, default=None, help="recognizers directory")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    args = ap.parse_args()
    text = Path(args.pairs).read_text() if args.pairs else sys.stdin.read()
    pairs = parse_pairs(json.loads(text))
    rec = Recognizers(args.models or default_models_dir(), args.threads)
    cache: dict[str, dict] = {}
    for p in pairs:
        o = p["original"]
        if o not in cache:
            cache[o] = rec.analyse(load_rgb(o))
        res = {"id": p["id"], "original": o, "decoded": p["decoded"]}
        res.update(compare(rec, cache[o], rec.analyse(load_rgb(p["decoded"]))))
        print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
