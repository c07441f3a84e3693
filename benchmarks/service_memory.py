"""Memory of the service under large uploads, measured on a real uvicorn process.

Sends `--clients` concurrent searches, each with `--photos` PNGs of `--side`² pixels that
compress to a few hundred kB (decompression-bomb shaped, under the pixel limit), and reads the
server's resident memory from /proc: before (after one warm-up search), its peak during the
burst (VmHWM, reset first), and after. Prints the figures and the increase ratios.

    .venv/bin/python benchmarks/service_memory.py [--side 7000] [--clients 16] [--photos 1]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from server_process import ServiceProcess, memory_of  # noqa: E402

import netvlad  # noqa: E402
from netvlad.index import Index  # noqa: E402


def large_png(side: int, seed: int) -> bytes:
    """A `side`×`side` RGB PNG that compresses well (flat colour, a noisy corner)."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (side, side), tuple(int(v) for v in rng.integers(0, 255, 3)))
    image.paste(Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)), (0, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def small_index(folder: Path, photos: list[Path]) -> Path:
    model = netvlad.build_model("resnet18-layer3", 16, input_mode="grey", max_side=256)
    netvlad.init_model(model, photos[:4], per_image=50)
    with Index.create(folder / "index", model, device="cpu") as index:
        index.set_root(photos[0].parent)
        index.add(photos[:8])
        index.checkpoint()
    return folder / "index"


def measure(index_dir: Path, side: int, clients: int, photos: int, settings: dict) -> dict:
    pngs = [large_png(side, seed) for seed in range(photos)]
    env = {"NETVLAD_INDEX_DIR": index_dir, "NETVLAD_DEVICE": "cpu", **settings}
    with ServiceProcess(env) as server, httpx.Client(base_url=server.url, timeout=300) as client:
        warm = client.post("/v1/search", files=[("images", ("warm.png", pngs[0], "image/png"))])
        assert warm.status_code == 200, warm.text
        time.sleep(1.0)
        before = memory_of(server.process.pid, reset_peak=True)

        def one(i: int) -> int:
            files = [("images", (f"big-{i}-{j}.png", data, "image/png")) for j, data in enumerate(pngs)]
            return client.post("/v1/search", files=files).status_code

        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            statuses = list(pool.map(one, range(clients)))
        seconds = time.perf_counter() - start
        time.sleep(2.0)
        after = memory_of(server.process.pid)
    mib = 1 << 20
    return {
        "png_bytes": len(pngs[0]), "side": side, "clients": clients, "photos_per_search": photos,
        "statuses": sorted(set(statuses)), "seconds": round(seconds, 2),
        "rss_before_mib": round(before["rss"] / mib), "peak_rss_mib": round(after["peak"] / mib),
        "rss_after_mib": round(after["rss"] / mib),
        "peak_increase_mib": round((after["peak"] - before["rss"]) / mib),
        "after_increase_mib": round((after["rss"] - before["rss"]) / mib),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=7000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--photos", type=int, default=1)
    parser.add_argument("--photos-dir", type=Path, default=Path("data/photos"))
    parser.add_argument("--decode-memory", type=int, default=None, help="NETVLAD_DECODE_MEMORY_BYTES")
    args = parser.parse_args()
    photos = sorted(args.photos_dir.glob("*.jpg"))
    settings = {"NETVLAD_MAX_REQUEST_BYTES": 200_000_000}
    if args.decode_memory:
        settings["NETVLAD_DECODE_MEMORY_BYTES"] = args.decode_memory
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(small_index(Path(tmp), photos), args.side, args.clients, args.photos, settings)
    print(json.dumps(result, indent=1))
    print(f"peak RSS increase {result['peak_increase_mib']} MiB (target < 500), "
          f"after the burst {result['after_increase_mib']} MiB above the start")


if __name__ == "__main__":
    main()
