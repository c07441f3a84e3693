"""Extraction benchmark (docs/design.md §7): end-to-end images/s of `netvlad index` ÷ backbone-only
images/s on the same decoded tensors.

* end-to-end — `netvlad.indexing.index_folder` on a fresh index folder, exactly what
  `netvlad index PHOTOS --index DIR` runs after start-up: walk, hash and EXIF, DataLoader decoding
  and preprocessing in worker processes, the whole network (backbone, NetVLAD, whitening), the
  catalog transactions and the faiss index save;
* backbone-only — the same photos decoded and preprocessed beforehand (not timed), grouped into
  batches of the same shapes and size, and only `model.backbone` run on them, with the same
  autocast setting.

Photos: `--count` distinct JPEGs of `--size` pixels cut from the project's real photos (crops
at several offsets and flips of `data/photos`, as `make photos` fetches it). The model is a fresh
`--backbone` with `--clusters` and `--max-side` (random weights: timing does not depend on their
values) unless `--model` names a model file.

Usage: ``python benchmarks/extraction.py [--count 96] [--size 1024x768] [--batch-size 16]
[--workers N] [--amp] [--model FILE]``. Prints one JSON object; exit status 0 whether or not the
target (ratio ≥ 0.9 on CPU) holds.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageOps

from netvlad.batching import default_workers, shape_batches
from netvlad.devices import amp_dtype
from netvlad.imageio import find_photos, load_image
from netvlad.index import Index
from netvlad.indexing import index_folder
from netvlad.model import build_model
from netvlad.modelfile import load_model

TARGET_RATIO = 0.9
REPO = Path(__file__).resolve().parents[1]


def make_photos(sources: list[Path], folder: Path, count: int, size: tuple[int, int]) -> list[Path]:
    """`count` distinct JPEGs of `size` (width, height): crops at different offsets (and mirror
    images) of the source photos, upscaled where a source is smaller."""
    folder.mkdir(parents=True, exist_ok=True)
    width, height = size
    paths = []
    for i in range(count):
        source = sources[i % len(sources)]
        variant = i // len(sources)
        with Image.open(source) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")
        scale = max(width / image.width, height / image.height) * (1.0 + 0.1 * (variant // 2))
        image = image.resize((round(image.width * scale), round(image.height * scale)))
        if variant % 2:
            image = ImageOps.mirror(image)
        left = (image.width - width) * ((variant * 37) % 100) // 100
        top = (image.height - height) * ((variant * 61) % 100) // 100
        path = folder / f"photo-{i:05d}.jpg"
        image.crop((left, top, left + width, top + height)).save(path, quality=90)
        paths.append(path)
    return paths


@torch.inference_mode()
def backbone_rate(model, photos: list[Path], batch_size: int, amp: bool) -> float:
    """Images/s of `model.backbone` alone on the photos' preprocessed tensors, batched like the indexer."""
    tensors = [model.preprocess(load_image(p)) for p in photos]
    batches = shape_batches([tuple(t.shape[1:]) for t in tensors], batch_size)
    device = model.device
    model.eval()
    start = time.perf_counter()
    for batch in batches:
        images = torch.stack([tensors[i] for i in batch]).to(device)
        with torch.autocast(device.type, dtype=amp_dtype(device), enabled=amp):
            model.backbone(images)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(tensors) / (time.perf_counter() - start)


def end_to_end_rate(model, folder: Path, work: Path, batch_size: int, workers: int, amp: bool) -> tuple[float, dict]:
    """Images/s of `index_folder` on `folder` into a new index (creation not timed) and its report."""
    with Index.create(work / "index", model, amp=amp) as index:
        start = time.perf_counter()
        report = index_folder(index, folder, batch_size=batch_size, workers=workers, progress=False)
        seconds = time.perf_counter() - start
    return report.described / seconds, report.to_dict()


def add_photo_options(parser: argparse.ArgumentParser) -> None:
    """The options of the indexing benchmarks: photos made (count, size, sources) and batching."""
    parser.add_argument("--count", type=int, default=96, help="photos to index")
    parser.add_argument("--size", default="1024x768", help="photo size WIDTHxHEIGHT")
    parser.add_argument("--photos", type=Path, default=REPO / "data" / "photos", help="source photos folder (`make photos`)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=default_workers(), help="decoding processes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_photo_options(parser)
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast for both measurements")
    parser.add_argument("--model", help="model file (default: a fresh model built from the options below)")
    parser.add_argument("--backbone", default="resnet18-layer3")
    parser.add_argument("--clusters", type=int, default=64)
    parser.add_argument("--max-side", type=int, default=640)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.lower().split("x"))
    sources = sorted(find_photos([args.photos]))
    if args.model:
        model = load_model(args.model, device=args.device)
    else:
        model = build_model(args.backbone, args.clusters, max_side=args.max_side).to(args.device).eval()
    with tempfile.TemporaryDirectory(prefix="netvlad-extraction-") as tmp:
        work = Path(tmp)
        photos = make_photos(sources, work / "photos", args.count, size)
        backbone_rate(model, photos[: args.batch_size], args.batch_size, args.amp)  # warm-up
        before = backbone_rate(model, photos, args.batch_size, args.amp)
        end_to_end, report = end_to_end_rate(model, work / "photos", work, args.batch_size, args.workers, args.amp)
        after = backbone_rate(model, photos, args.batch_size, args.amp)  # before and after: load drifts
    backbone = (before + after) / 2
    ratio = end_to_end / backbone
    print(json.dumps({
        "device": args.device, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "photos": args.count, "photo_size": args.size, "batch_size": args.batch_size, "workers": args.workers,
        "amp": args.amp, "model": args.model or f"{args.backbone} K={args.clusters} max_side={args.max_side}",
        "backbone_images_per_s": round(backbone, 2), "backbone_before_after": [round(before, 2), round(after, 2)], "end_to_end_images_per_s": round(end_to_end, 2),
        "ratio": round(ratio, 3), "target": TARGET_RATIO, "target_met": ratio >= TARGET_RATIO,
        "index_report": {k: report[k] for k in ("files", "described", "failed", "index_type", "seconds")},
    }, indent=1))


if __name__ == "__main__":
    main()
