"""Search service under concurrent load: p50/p99 latency and requests/s of POST /v1/search at 1, 4
and 16 concurrent clients (real uvicorn process, loopback), the same searches in-process, the
HTTP overhead ratio (target ≤ 1.2×) and the micro-batching gain (batching on vs off).

Run: .venv/bin/python benchmarks/service_load.py [--model default|FILE] [--requests 48] [--photos DIR]
Without a model file (and no shipped model) a small one is built (ResNet18-layer3, K=16, grey,
long side 256 px). Every request is one photo, cycling through the indexed photos: 4:3 centre
crops at 1024×768 (JPEG), like photos from one camera, so that concurrent queries have the same
input shape and can share a forward pass; `--mixed-shapes` sends the photo files as they are
(9 or so shapes: a batch then splits into one pass per shape). top_k=10. "in-process" runs
`Index.search` on the same bytes sequentially in this process (decode + describe + search), from
the main thread and from a worker thread; the overhead ratio uses the faster of the two.
p99 of a few dozen requests is close to their maximum. Client and server share this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import ImageOps

import netvlad
from netvlad.errors import ModelFileError
from netvlad.imageio import find_photos
from netvlad.index import Index

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from server_process import ServiceProcess  # noqa: E402  (the tests' server harness)

LEVELS = (1, 4, 16)


def summary(latencies: list[float], wall: float) -> dict:
    ms = np.asarray(latencies) * 1000
    return {"n": len(ms), "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "rps": len(ms) / wall}


def camera_like(path: Path, size: tuple[int, int] = (1024, 768)) -> bytes:
    """A 4:3 centre crop of the photo at `size`, as JPEG bytes."""
    buffer = io.BytesIO()
    ImageOps.fit(netvlad.load_image(path), size).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def model_for(args, photos: list[Path], workdir: Path):
    """The model to index with: --model, else the shipped one, else a small one built on the photos."""
    try:
        return netvlad.load_model(args.model, device="cpu")
    except ModelFileError as exc:
        print(f"({exc}; building a small model)")
    model = netvlad.build_model("resnet18-layer3", 16, input_mode="grey", max_side=256)
    netvlad.init_model(model, photos, per_image=100)
    netvlad.save_model(model, workdir / "model.pt")
    return model


def in_process(index_dir: Path, payloads: list[bytes], requests: int, worker_thread: bool) -> dict:
    """Sequential `Index.search` calls from this (main) thread or from one worker thread, as the
    service's inference runs. Both are measured: on a machine with more busy threads than cores,
    torch's intra-op threads driven from the main thread can be several times slower."""
    def run() -> dict:
        for data in payloads[:2]:
            index.search([data], k=10)  # warm-up
        latencies = []
        start = time.perf_counter()
        for i in range(requests):
            t = time.perf_counter()
            index.search([payloads[i % len(payloads)]], k=10)
            latencies.append(time.perf_counter() - t)
        return summary(latencies, time.perf_counter() - start)

    with Index.open(index_dir, device="cpu") as index:
        if not worker_thread:
            return run()
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(run).result()


async def http_load(url: str, payloads: list[tuple[str, bytes]], clients: int, requests: int) -> dict:
    latencies: list[float] = []
    issued = 0
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=clients)) as client:

        async def one(i: int) -> float:
            name, data = payloads[i % len(payloads)]
            t = time.perf_counter()
            response = await client.post("/v1/search", files=[("images", (name, data, "image/jpeg"))],
                                         data={"top_k": "10"})
            response.raise_for_status()
            return time.perf_counter() - t

        async def worker() -> None:
            nonlocal issued
            while issued < requests:
                issued += 1
                latencies.append(await one(issued))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return summary(latencies, time.perf_counter() - start)


def forward_passes(url: str) -> tuple[float, float, float]:
    """(passes, photos, seconds in passes) so far, from the server's metrics."""
    text = httpx.get(url + "/metrics").text
    value = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
             if line.startswith(("netvlad_batch_photos_count", "netvlad_batch_photos_sum", "netvlad_batch_seconds_sum"))}
    return value["netvlad_batch_photos_count"], value["netvlad_batch_photos_sum"], value["netvlad_batch_seconds_sum"]


def load_level(server: ServiceProcess, payloads, clients: int, requests: int, label: str) -> dict:
    asyncio.run(http_load(server.url, payloads, clients, clients))  # warm-up: connections, shapes
    before = forward_passes(server.url)
    line = asyncio.run(http_load(server.url, payloads, clients, max(requests, 2 * clients)))
    passes, photos, seconds = (b - a for a, b in zip(before, forward_passes(server.url)))
    line.update(photos_per_pass=photos / passes, forward_ms_per_photo=1000 * seconds / photos)
    print(f"  {label:<13} {clients:>2} clients: p50 {line['p50_ms']:7.1f} ms  p99 {line['p99_ms']:7.1f} ms  "
          f"{line['rps']:6.2f} req/s  ({line['photos_per_pass']:.1f} photos per forward pass, "
          f"{line['forward_ms_per_photo']:.0f} ms per photo in it)", flush=True)
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="model file or built-in name")
    parser.add_argument("--photos", type=Path, default=Path("data/photos"))
    parser.add_argument("--index-photos", type=int, default=16, help="photos indexed (and used as queries)")
    parser.add_argument("--requests", type=int, default=48, help="timed requests per concurrency level")
    parser.add_argument("--max-batch", type=int, default=None, help="NETVLAD_MAX_BATCH of the server")
    parser.add_argument("--threads", type=int, default=None, help="torch threads, here and in the server")
    parser.add_argument("--mixed-shapes", action="store_true", help="query with the photo files as they are")
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    photos = sorted(find_photos([args.photos]))[: args.index_photos]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"{len(photos)} photos, {args.requests} requests per level")
    with tempfile.TemporaryDirectory(prefix="netvlad-load-") as tmp:
        workdir = Path(tmp)
        model = model_for(args, photos, workdir)
        with Index.create(workdir / "index", model, device="cpu") as index:
            index.add(photos)
            index.save()
        payloads = [(p.name, p.read_bytes() if args.mixed_shapes else camera_like(p)) for p in photos]
        shapes = {tuple(model.preprocess(netvlad.load_image(data)).shape) for _, data in payloads}
        print(f"model {model.config.backbone} K={model.config.clusters} dim={model.dim}, "
              f"max_side {model.config.max_side}: {len(shapes)} distinct input shapes among the queries")

        local = {}
        for where in ("main thread", "worker thread"):
            line = local[where] = in_process(workdir / "index", [data for _, data in payloads], args.requests,
                                             where == "worker thread")
            print(f"  in-process, {where:<13}: p50 {line['p50_ms']:7.1f} ms  p99 {line['p99_ms']:7.1f} ms  "
                  f"{line['rps']:6.2f} req/s", flush=True)
        # Both servers run side by side (read-only: same index) and take turns, so that a change
        # in the machine's load hits both alike.
        env = {"NETVLAD_INDEX_DIR": workdir / "index", "NETVLAD_DEVICE": "cpu", "NETVLAD_ALLOW_WRITES": "false",
               "OMP_NUM_THREADS": torch.get_num_threads()}
        if args.max_batch:
            env["NETVLAD_MAX_BATCH"] = args.max_batch
        on, off = {}, {}
        with ServiceProcess({**env, "NETVLAD_MICRO_BATCHING": "true"}, log=workdir / "on.log") as server_on, \
                ServiceProcess({**env, "NETVLAD_MICRO_BATCHING": "false"}, log=workdir / "off.log") as server_off:
            for clients in LEVELS:
                on[clients] = load_level(server_on, payloads, clients, args.requests, "batching on")
                off[clients] = load_level(server_off, payloads, clients, args.requests, "batching off")

    best = min(line["p50_ms"] for line in local.values())
    print(f"\noverhead (HTTP p50 at 1 client / best in-process p50): {on[1]['p50_ms'] / best:.2f}× with batching on, "
          f"{off[1]['p50_ms'] / best:.2f}× off (target ≤ 1.2×)")
    for clients in LEVELS:
        print(f"micro-batching gain at {clients:>2} clients: {on[clients]['rps'] / off[clients]['rps']:.2f}× req/s, "
              f"p50 {on[clients]['p50_ms']:.0f} vs {off[clients]['p50_ms']:.0f} ms")
    if args.json:
        print(json.dumps({"in_process": local, "batching_on": on, "batching_off": off}))


if __name__ == "__main__":
    main()
