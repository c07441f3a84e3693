"""Memory of the service under large uploads, measured on a real uvicorn process.

Sends `--clients` concurrent searches, each with `--photos` PNGs of `--side`² pixels that
compress to a few hundred kB (decompression-bomb shaped, under the pixel limit), and reads the
server's resident memory from /proc: before (after one warm-up search), its peak during the
burst (VmHWM, reset first), and after. Prints the figures; `--decode-memory` sets the service's
decode budget (NETVLAD_DECODE_MEMORY_BYTES) to compare.

    .venv/bin/python benchmarks/service_memory.py [--side 7000] [--clients 16] [--photos 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from photo_support import large_png  # noqa: E402  (the tests' helpers)
from server_process import ServiceProcess, search_burst_memory  # noqa: E402

import netvlad  # noqa: E402
from netvlad.index import Index  # noqa: E402

MIB = 1 << 20


def small_index(folder: Path, photos: list[Path]) -> Path:
    """An index of 8 photos with a small model (ResNet18-layer3, K=16, grey, 256 px)."""
    model = netvlad.build_model("resnet18-layer3", 16, input_mode="grey", max_side=256)
    netvlad.init_model(model, photos[:4], per_image=50)
    with Index.create(folder / "index", model, device="cpu") as index:
        index.set_root(photos[0].parent)
        index.add(photos[:8])
        index.save()
    return folder / "index"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=7000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--photos", type=int, default=1)
    parser.add_argument("--photos-dir", type=Path, default=Path("data/photos"))
    parser.add_argument("--decode-memory", type=int, default=None, help="NETVLAD_DECODE_MEMORY_BYTES")
    args = parser.parse_args()
    pngs = [large_png(args.side, seed) for seed in range(args.photos)]
    env = {"NETVLAD_DEVICE": "cpu", "NETVLAD_MAX_REQUEST_BYTES": 200_000_000}
    if args.decode_memory:
        env["NETVLAD_DECODE_MEMORY_BYTES"] = args.decode_memory
    with tempfile.TemporaryDirectory() as tmp:
        env["NETVLAD_INDEX_DIR"] = small_index(Path(tmp), sorted(args.photos_dir.glob("*.jpg")))
        with ServiceProcess(env) as server:
            burst = search_burst_memory(server, pngs, args.clients)
    result = {
        "png_bytes": len(pngs[0]), "side": args.side, "clients": args.clients, "photos_per_search": args.photos,
        "statuses": burst["statuses"], "seconds": round(burst["seconds"], 2),
        "rss_before_mib": round(burst["before"] / MIB), "peak_rss_mib": round(burst["peak"] / MIB),
        "rss_after_mib": round(burst["after"] / MIB),
        "peak_increase_mib": round((burst["peak"] - burst["before"]) / MIB),
        "after_increase_mib": round((burst["after"] - burst["before"]) / MIB),
    }
    print(json.dumps(result, indent=1))
    print(f"peak RSS increase {result['peak_increase_mib']} MiB (target < 500), "
          f"after the burst {result['after_increase_mib']} MiB above the start")


if __name__ == "__main__":
    main()
