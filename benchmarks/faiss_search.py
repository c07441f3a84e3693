"""faiss index benchmark (docs/design.md §7): the index type `netvlad` chooses for N descriptors against
exact search — recall@10, queries/s and bytes per image.

Data: synthetic clustered descriptors standing in for NetVLAD's. `N / views` places, each a
random centre with a decaying spectrum (std of dimension j ∝ j^−½, like PCA-whitened-then-
truncated descriptors, not isotropic noise); every database image and every query is its own
view of a place: centre + `--noise` × a fresh draw of the same spectrum, L2-normalised.

Figures (queries are new views of random places):
* recall@10 (1-recall@10, faiss's convention): fraction of queries whose exact nearest neighbour
  is among the index's top 10 — the headline "recall@10 of the chosen index vs exact search";
* 10-recall@10: mean overlap of the index's top 10 with the exact top 10 (`Index.search`
  re-scores a larger candidate pool with the catalog's exact descriptors, which recovers the order);
* place recall@10: fraction of queries with a view of their own place in the top 10, for the
  index and for exact search, and their ratio;
* queries/s for a batch of queries (one call) and one query per call;
* bytes per image: the serialised index (codes, ids, lists, trained tables) ÷ N, and the
  marginal bytes of one more image (the trained tables excluded).

Usage: ``python benchmarks/faiss_search.py [--n 100000] [--dim 512] [--queries 2000]
[--index-type FACTORY]``. ``--n 1000000`` is the 1 M case (about 2 GB of float32 at 512 dims; run
it where there is memory and time). Prints one JSON object; exit status 0 whether or not the
targets (recall@10 ≥ 0.95, ≥ 2 000 queries/s on CPU, ≤ 64 bytes per image at 1 M) hold.
"""

from __future__ import annotations

import argparse
import json
import time

import faiss
import numpy as np

from netvlad.vectorindex import IndexSpec, VectorIndex, choose_spec, needs_training, training_size

TARGET_RECALL = 0.95
TARGET_QPS = 2000
TARGET_BYTES = 64
CHUNK = 50_000


def clustered(n: int, dim: int, views: int, noise: float, queries: int, seed: int):
    """Database (n, dim), its place ids (n,), queries (queries, dim) and theirs; float32, unit rows."""
    rng = np.random.default_rng(seed)
    spectrum = (np.arange(1, dim + 1) ** -0.5).astype(np.float32)
    places = max(1, n // views)
    centres = rng.standard_normal((places, dim), dtype=np.float32) * spectrum

    def draw(ids: np.ndarray) -> np.ndarray:
        out = np.empty((len(ids), dim), dtype=np.float32)
        for start in range(0, len(ids), CHUNK):
            part = ids[start : start + CHUNK]
            x = centres[part] + noise * rng.standard_normal((len(part), dim), dtype=np.float32) * spectrum
            out[start : start + CHUNK] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out

    db_place = np.arange(n) % places
    q_place = rng.integers(0, places, size=queries)
    return draw(db_place), db_place, draw(q_place), q_place


def exact_top(database: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    index = faiss.IndexFlatIP(database.shape[1])
    index.add(database)
    return index.search(queries, k)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="database descriptors")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--views", type=int, default=4, help="database views per place")
    parser.add_argument("--noise", type=float, default=0.6, help="view noise relative to the centres' spread")
    parser.add_argument("--index-type", help="faiss factory string (default: the automatic choice)")
    parser.add_argument("--single", type=int, default=500, help="queries timed one per call")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    database, db_place, queries, q_place = clustered(args.n, args.dim, args.views, args.noise, args.queries, args.seed)
    spec = IndexSpec.parse(args.index_type) if args.index_type else choose_spec(args.n, args.dim)
    ids = np.arange(args.n, dtype=np.int64)

    start = time.perf_counter()
    training = None
    if needs_training(spec, args.dim):
        sample = np.random.default_rng(args.seed).choice(args.n, training_size(spec, args.n), replace=False)
        training = database[np.sort(sample)]
    vectors = VectorIndex.create(args.dim, spec, training)
    train_s = time.perf_counter() - start
    fixed = int(faiss.serialize_index(vectors.index).size)  # trained tables, empty lists
    start = time.perf_counter()
    for first in range(0, args.n, CHUNK):
        vectors.add(ids[first : first + CHUNK], database[first : first + CHUNK])
    add_s = time.perf_counter() - start

    vectors.search(queries[:100], 10)  # warm-up
    start = time.perf_counter()
    _, found = vectors.search(queries, 10)
    batch_qps = len(queries) / (time.perf_counter() - start)
    single = queries[: args.single]
    start = time.perf_counter()
    for q in single:
        vectors.search(q[None], 10)
    single_qps = len(single) / (time.perf_counter() - start)

    start = time.perf_counter()
    exact = exact_top(database, queries, 10)
    exact_qps = len(queries) / (time.perf_counter() - start)
    nn_recall = float(np.mean([exact[i, 0] in found[i] for i in range(len(queries))]))
    overlap = float(np.mean([len(set(exact[i]) & set(found[i])) / 10 for i in range(len(queries))]))
    place_exact = float(np.mean((db_place[exact] == q_place[:, None]).any(axis=1)))
    place_index = float(np.mean((db_place[found] == q_place[:, None]).any(axis=1)))
    size = int(faiss.serialize_index(vectors.index).size)

    print(json.dumps({
        "n": args.n, "dim": args.dim, "queries": args.queries, "views_per_place": args.views, "noise": args.noise,
        "index_type": spec.factory, "search_params": spec.params, "threads": faiss.omp_get_max_threads(),
        "train_s": round(train_s, 1), "add_s": round(add_s, 1),
        "recall_at_10": round(nn_recall, 4), "overlap_10_at_10": round(overlap, 4),
        "place_recall_at_10": {"index": round(place_index, 4), "exact": round(place_exact, 4),
                               "ratio": round(place_index / place_exact, 4) if place_exact else None},
        "queries_per_s": {"batch": round(batch_qps), "single": round(single_qps), "exact_batch": round(exact_qps)},
        "bytes_per_image": round(size / args.n, 1), "marginal_bytes_per_image": round((size - fixed) / args.n, 1),
        "targets": {"recall_at_10": TARGET_RECALL, "queries_per_s": TARGET_QPS, "bytes_per_image_at_1M": TARGET_BYTES},
        "targets_met": {"recall_at_10": nn_recall >= TARGET_RECALL, "queries_per_s": batch_qps >= TARGET_QPS,
                        "bytes_per_image_at_1M": size / args.n <= TARGET_BYTES if args.n >= 1_000_000 else None},
    }, indent=1))


if __name__ == "__main__":
    main()
