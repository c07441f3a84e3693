"""Ray indexing benchmark (issue 12): photos/s of `netvlad index --ray` ÷ photos/s of the
single-machine path (`netvlad index`) on the same photos, in one run.

Both measurements run `netvlad.indexing.index_folder` on a fresh index folder with the same model
(walk, hash, describe, catalog transactions, faiss save): once with the torch DataLoader path
(`--workers` decoding processes), once with `ray=RayOptions(...)` on a Ray started beforehand
with `--ray-cpus` CPUs, as an operator's `--ray ADDRESS` joins a running cluster (its start-up is
printed apart, not counted). The time to each path's first commit shows its fixed start. The
single-machine path runs before and after the Ray one (load on a shared machine drifts) and the
ratio uses their mean.

Photos: `--count` distinct JPEGs of `--size` cut from `data/photos` (`benchmarks/extraction.py`'s
`make_photos`); 960 by default, because the Ray run pays a fixed start of about 6 s on two cores
(each actor process imports torch and netvlad and loads the model) that a real run of thousands
of photos spreads thin, while a run of a few hundred does not. Model: `--model` (default: the
shipped `default` model).

Usage: ``python benchmarks/ray_indexing.py [--count 960] [--size 1024x768] [--batch-size 16]
[--ray-cpus N] [--concurrency N]``. Prints one JSON object; exit status 0 whether or not the
target (ratio ≥ 0.9) holds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a one-machine Ray on 127.0.0.1
import ray  # noqa: E402

from netvlad.imageio import find_photos
from netvlad.index import Index
from netvlad.indexing import index_folder
from netvlad.indexing_ray import RayOptions

sys.path.insert(0, str(Path(__file__).resolve().parent))
from extraction import add_photo_options, make_photos  # noqa: E402

TARGET_RATIO = 0.9


def rate(model: str, folder: Path, index_dir: Path, batch_size: int, workers: int,
         ray_options: RayOptions | None) -> tuple[float, float, dict]:
    """(photos/s of `index_folder` on `folder` into a new index (its creation not timed), seconds
    until its first descriptors were committed, its report)."""
    first: list[float] = []
    store = Index.store_descriptors

    def timed(self, ids, descriptors):
        first.append(first[0] if first else time.perf_counter())
        return store(self, ids, descriptors)

    Index.store_descriptors = timed
    try:
        with Index.create(index_dir, model, device="cpu") as index:
            start = time.perf_counter()
            report = index_folder(index, folder, batch_size=batch_size, workers=workers, progress=False,
                                  ray=ray_options)
            seconds = time.perf_counter() - start
    finally:
        Index.store_descriptors = store
    return report.described / seconds, first[0] - start, report.to_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_photo_options(parser)  # --count --size --photos --batch-size (both paths) --workers (single-machine)
    parser.set_defaults(count=960)
    parser.add_argument("--ray-cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray")
    parser.add_argument("--concurrency", type=int, default=None, help="describe actors (default: RayOptions')")
    parser.add_argument("--model", default="default", help="model file or built-in name")
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.lower().split("x"))
    options = RayOptions("local", args.concurrency, args.batch_size)
    with tempfile.TemporaryDirectory(prefix="netvlad-ray-bench-") as tmp:
        work = Path(tmp)
        folder = work / "photos"
        make_photos(sorted(find_photos([args.photos])), folder, args.count, size)
        before, single_first, single = rate(args.model, folder, work / "single-before", args.batch_size, args.workers, None)
        start = time.perf_counter()
        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
        startup = time.perf_counter() - start
        try:
            on_ray, ray_first, report = rate(args.model, folder, work / "ray", args.batch_size, args.workers, options)
        finally:
            ray.shutdown()
        after, _, _ = rate(args.model, folder, work / "single-after", args.batch_size, args.workers, None)
    single_rate = (before + after) / 2
    ratio = on_ray / single_rate
    print(json.dumps({
        "cpu_count": os.cpu_count(), "photos": args.count, "photo_size": args.size, "model": args.model,
        "batch_size": args.batch_size, "single_workers": args.workers, "ray_cpus": args.ray_cpus,
        "concurrency": args.concurrency, "ray_startup_s": round(startup, 2),
        "single_photos_per_s": round(single_rate, 2), "single_before_after": [round(before, 2), round(after, 2)],
        "ray_photos_per_s": round(on_ray, 2), "ratio": round(ratio, 3), "target": TARGET_RATIO,
        "first_commit_s": {"single": round(single_first, 2), "ray": round(ray_first, 2)},
        "target_met": ratio >= TARGET_RATIO,
        "reports": {name: {k: r[k] for k in ("described", "failed", "seconds")} for name, r in
                    (("single", single), ("ray", report))},
    }, indent=1))


if __name__ == "__main__":
    main()
