"""Where night and low light lose a sign: one model's accuracy by the clean image's brightness, under each
fault at one severity and under the same fault with its sensor noise switched off.

    python scripts/dark_limit.py MODEL VAL_PACK [--severity 3] [--out dark_limit.json]

Why: the two dark faults plateau a little under 85% at severity 3 however long the recipe trains
(docs/training.md). If the misses sit on images that were dark before the fault, and vanish when the
noise is switched off, the limit is the signal left under the noise, not the darkening the network
has to undo. The noisy columns use ``signscale.corruptions`` with the evaluator's seeding, so they
equal ``signscale evaluate --corruptions night,low_light``; the noise-free ones repeat each fault's
formula without its random terms (night: gamma, gain and tint; low light: exposure, the 10-bit
sensor's rounding and the gain back), then the same 8-bit rounding.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from signscale.corruptions import low_light_exposure, night_levels
from signscale.data.stream import ShardStream, StreamConfig, StreamLoader
from signscale.evaluation.robustness import BRIGHTNESS_BINS, BRIGHTNESS_EDGES, brightness_bins, corrupt_batch
from signscale.serving.predict import Predictor


def load(url: str, predictor: Predictor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(uint8 NHWC images, labels in the model's space, sample ids) of a whole packed dataset."""
    stream = ShardStream(StreamConfig(datasets=(url,), batch_size=1024, shuffle=False, remainder="pad"),
                         label_space=predictor.label_space)
    xs, ys, ids = [], [], []
    for b in StreamLoader(stream, num_workers=0):
        keep = ~b["pad"]
        xs.append(b["image"][keep].numpy())
        ys.append(b["label"][keep].numpy())
        ids.append(b["id"][keep].numpy())
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(ids)


def to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(x * 255 + 0.5, 0, 255).astype(np.uint8)


def night_without_noise(x: np.ndarray, severity: int) -> np.ndarray:
    gamma, gain, tint = night_levels(severity)
    return to_uint8(gain * np.power(x, gamma) * tint)


def low_light_without_noise(x: np.ndarray, severity: int) -> np.ndarray:
    exposure = low_light_exposure(severity)
    signal = np.round(np.clip(np.power(x, 2.2) * exposure, 0, 1) * 1023) / 1023
    return to_uint8(np.power(np.clip(signal * 0.7 / exposure, 0, 1), 1 / 2.2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("data")
    ap.add_argument("--severity", type=int, default=3)
    ap.add_argument("--out", default="dark_limit.json")
    a = ap.parse_args()
    predictor = Predictor.load(a.model, threads=1)
    images, labels, ids = load(a.data, predictor)
    x = images.astype(np.float32) / 255

    def hits(batch: np.ndarray) -> np.ndarray:
        return predictor.probabilities(batch).argmax(1) == labels

    runs = {"clean": hits(images)}
    for kind, quiet in (("night", night_without_noise), ("low_light", low_light_without_noise)):
        runs[kind] = hits(corrupt_batch(images, ids, corruption=kind, severity=a.severity, seed=0))
        runs[f"{kind} without noise"] = hits(quiet(x, a.severity))
    bins = brightness_bins(images)  # the bins of `signscale evaluate`'s robustness.by_brightness
    edges = (0.0, *BRIGHTNESS_EDGES, 1.0)
    rows = []
    print(f"{'clean luma':>11} {'images':>6} " + " ".join(f"{k:>22}" for k in runs))
    for b, lo, hi in zip(range(BRIGHTNESS_BINS), edges, edges[1:]):
        m = bins == b
        rows.append({"lo": lo, "hi": hi, "count": int(m.sum()),
                     **{k: float(v[m].mean()) if m.any() else None for k, v in runs.items()}})
        print(f"{lo:4.2f}-{hi:4.2f}  {m.sum():6d} "
              + " ".join(f"{100 * v[m].mean():21.1f}%" if m.any() else " " * 22 for v in runs.values()))
    overall = {k: float(v.mean()) for k, v in runs.items()}
    print(f"{'all':>11} {len(labels):6d} " + " ".join(f"{100 * v:21.1f}%" for v in overall.values()))
    with open(a.out, "w") as f:
        json.dump({"model": a.model, "data": a.data, "severity": a.severity, "overall": overall, "bins": rows}, f,
                  indent=1)


if __name__ == "__main__":
    main()
