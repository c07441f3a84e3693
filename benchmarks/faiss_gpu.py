"""faiss on the GPU against faiss on the CPU (docs/design.md §7): exact search queries/s and
recall@10 at `--n` synthetic descriptors (default 1 M, 512 dims; the clustered data of
benchmarks/faiss_search.py).

CPU: a `faiss.IndexFlatIP` searched with all cores. GPU: `netvlad.vectorindex.VectorIndex` with the
exact type ("Flat"), which searches its `index_cpu_to_all_gpus` copy when faiss has GPUs. Recall@10
is the fraction of queries whose CPU nearest neighbour is in the GPU top 10; overlap@10 the mean
share of the CPU top 10 found in the GPU top 10 (both 1.0 but for float ties).

Usage: ``python benchmarks/faiss_gpu.py [--n 1000000] [--dim 512] [--queries 2000]``. Prints one
JSON object; without faiss-gpu or a GPU it prints {"skipped": why} and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from faiss_search import clustered  # noqa: E402  (a sibling benchmark script)

from netvlad.vectorindex import IndexSpec, VectorIndex, faiss_has_gpu  # noqa: E402

K = 10


def timed_search(search, queries: np.ndarray) -> tuple[np.ndarray, float]:
    """(ids (m, K), queries/s) of `search(queries, K)` after one warm-up call on a few queries."""
    search(queries[:8], K)
    start = time.perf_counter()
    _, ids = search(queries, K)
    return ids, len(queries) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="database descriptors")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not faiss_has_gpu():
        print(json.dumps({"skipped": "faiss has no GPU (install the gpu extra, faiss-gpu, on a CUDA machine)"}))
        return
    database, _, queries, _ = clustered(args.n, args.dim, 4, 0.6, args.queries, args.seed)
    cpu = faiss.IndexFlatIP(args.dim)
    cpu.add(database)
    cpu_ids, cpu_qps = timed_search(cpu.search, queries)
    gpu = VectorIndex.create(args.dim, IndexSpec("Flat", "ip"))
    gpu.add(np.arange(args.n, dtype=np.int64), database)
    gpu_ids, gpu_qps = timed_search(gpu.search, queries)
    recall = float(np.mean([cpu_ids[i, 0] in gpu_ids[i] for i in range(len(queries))]))
    overlap = float(np.mean([len(np.intersect1d(cpu_ids[i], gpu_ids[i])) / K for i in range(len(queries))]))
    print(json.dumps({
        "n": args.n, "dim": args.dim, "queries": args.queries, "gpus": faiss.get_num_gpus(),
        "cpu_queries_per_s": round(cpu_qps, 1), "gpu_queries_per_s": round(gpu_qps, 1),
        "speedup": round(gpu_qps / cpu_qps, 2), "recall@10": recall, "overlap@10": overlap,
    }, indent=1))


if __name__ == "__main__":
    main()
