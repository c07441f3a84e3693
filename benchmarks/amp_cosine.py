"""AMP against float32 descriptors (docs/design.md §7): the cosine between each photo's descriptor
computed in autocast (`netvlad.devices.amp_dtype`: bfloat16, or float16 on GPUs without it) and in
float32, by the same model on the same device. Target: every cosine ≥ 0.999.

Usage: ``python benchmarks/amp_cosine.py [--model default] [--count 32] [--device cuda]``. Prints
one JSON object; exit status 0 whether or not the target holds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from netvlad.devices import amp_dtype, resolve_device
from netvlad.imageio import find_photos
from netvlad.modelfile import load_model

TARGET = 0.999
REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="model file or built-in name")
    parser.add_argument("--count", type=int, default=32, help="photos described")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--photos", type=Path, default=REPO / "data" / "photos")
    args = parser.parse_args()
    device = resolve_device(args.device)
    model = load_model(args.model, device=device)
    photos = sorted(find_photos([args.photos]))[: args.count]
    full = model.describe(photos, amp=False)
    mixed = model.describe(photos, amp=True)
    cosine = np.sum(full * mixed, axis=1)  # both unit norm
    print(json.dumps({
        "device": str(device), "amp_dtype": str(amp_dtype(device)).removeprefix("torch."), "photos": len(photos),
        "min_cosine": round(float(cosine.min()), 6), "mean_cosine": round(float(cosine.mean()), 6),
        "target": TARGET, "target_met": bool(cosine.min() >= TARGET),
    }, indent=1))


if __name__ == "__main__":
    main()
