"""Scale benchmark: an index folder of N synthetic photos (catalog rows, float16 descriptor shards,
faiss index) built single-process and with Ray, then searched.

    python benchmarks/scale.py --sizes 1e6            # the issue-12 figures (about 10 min at 1 M)
    python benchmarks/scale.py --quick                 # 100 k photos, 1 000 queries

Descriptors are clustered (1 000 unit centres, noise of norm 0.7, renormalised), written shard by
shard through `DescriptorStore.append` so they never all sit in memory; catalog rows through
`Catalog.record_file` with photo-like paths. Prints per size: time and peak RSS of each phase
(train, add, Ray add with merging, repacking as fast-scan; VmHWM, reset between phases with /proc/self/clear_refs; for Ray's add the
largest task's too), bytes per photo of the folder (catalog + shards + faiss), recall@10 of the
index (raw, and after the exact rescoring `search.rank` does on the top 50) against exact search
of `--queries` noisy database vectors, and queries/s (batched, and one query at a time).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
from faiss.contrib.exhaustive_search import knn_ground_truth

from netvlad.catalog import Catalog
from netvlad.descriptorstore import DescriptorStore
from netvlad.exif import PhotoInfo
from netvlad.shardbuild import add_on_ray, add_partial, add_rows, as_type_of, partial_type, sample_ids
from netvlad.vectorindex import VectorIndex, choose_spec, training_size

CENTRES = 1_000
ROWS_PER_TX = 50_000
MB = 1 << 20


def peak_rss(reset: bool = False, field: str = "VmHWM") -> int:
    """This process's peak resident set (bytes) since the last reset (`field` VmRSS: the current
    one); `reset` starts a new peak."""
    if reset:
        Path("/proc/self/clear_refs").write_text("5")
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return 0


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def fill_folder(folder: Path, n: int, dim: int) -> DescriptorStore:
    """Catalog rows and descriptor shards of `n` synthetic photos."""
    catalog = Catalog(folder / "catalog.sqlite")
    store = DescriptorStore(folder / "descriptors", catalog, dim)
    info = PhotoInfo(width=4032, height=3024)
    for start in range(0, n, ROWS_PER_TX):
        with catalog.transaction():
            for i in range(start, min(n, start + ROWS_PER_TX)):
                catalog.record_file(f"{2000 + i % 25}/{i % 12 + 1:02d}/IMG_{i:08d}.jpg", "folder", 3_000_000 + i,
                                    1_700_000_000_000_000_000 + i, f"{i:064x}", info)
    centres = unit(np.random.default_rng(0).standard_normal((CENTRES, dim)))
    for start in range(0, n, store.shard_rows):
        rng = np.random.default_rng(start + 1)
        m = min(store.shard_rows, n - start)
        x = centres[rng.integers(0, CENTRES, m)] + 0.7 * unit(rng.standard_normal((m, dim)))
        store.append(np.arange(start + 1, start + m + 1), unit(x))
    catalog.connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return store


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def timed(label: str, fn, figures: dict):
    peak_rss(reset=True)
    start = time.perf_counter()
    result = fn()
    figures[label] = (time.perf_counter() - start, peak_rss())
    print(f"  {label:<22} {figures[label][0]:8.1f} s   peak RSS {figures[label][1] / MB:8.0f} MiB", flush=True)
    return result


def measured_add(empty, part, out):
    """Ray task: `add_partial`, writing the task's peak RSS beside the build folder (`<out>.rss`)."""
    peak_rss(reset=True)
    path = add_partial(empty, part, out)
    (Path(out).parent.parent / f"{Path(out).name}.rss").write_text(str(peak_rss()))
    return path


def ray_build(trained: faiss.Index, parts, work: Path, workers: int, figures: dict) -> faiss.Index:
    """The Ray build of `netvlad.shardbuild`: partials added by `workers` tasks, merged as they
    finish, then repacked as fast-scan when `trained` is; the largest task's peak RSS recorded."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a one-machine session on 127.0.0.1
    import ray

    empty = faiss.serialize_index(partial_type(trained))
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    try:
        merged = timed("ray add+merge (2 w.)", lambda: add_on_ray(empty, parts, work, task=measured_add), figures)
    finally:
        ray.shutdown()
    peaks = list(work.glob("*.rss"))
    worker_peak = max(int(f.read_text()) for f in peaks)
    for f in peaks:
        f.unlink()
    print(f"  {'':<22} largest Ray task's peak RSS {worker_peak / MB:8.0f} MiB", flush=True)
    return timed("repack (driver)", lambda: as_type_of(merged, trained), figures)


def recall_at_10(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)]))


def run(n: int, dim: int, n_queries: int, work: Path, workers: int) -> None:
    print(f"\n== {n:,} photos, dim {dim}, {n_queries:,} queries", flush=True)
    figures: dict = {}
    folder = work / f"index-{n}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    store = timed("catalog + shards", lambda: fill_folder(folder, n, dim), figures)
    parts = store.live_rows()
    rng = np.random.default_rng(1)
    qids = np.sort(rng.choice(np.arange(1, n + 1), n_queries, replace=False))
    queries = unit(store.descriptors(qids) + 0.3 * unit(rng.standard_normal((n_queries, dim))))
    blocks = (np.asarray(np.load(p.path, mmap_mode="r"), dtype=np.float32) for p in parts)
    _, truth = timed("exact search (truth)", lambda: knn_ground_truth(queries, blocks, 10, faiss.METRIC_INNER_PRODUCT), figures)
    truth = truth + 1  # positions in shard order → catalog ids
    spec = choose_spec(n, dim)
    print(f"  index type {spec.factory} ({spec.params})")
    trained = timed("train", lambda: VectorIndex.create(
        dim, spec, store.descriptors(sample_ids(parts, training_size(spec, n)))), figures)
    empty = faiss.serialize_index(trained.index)

    def add_single():
        index = faiss.deserialize_index(empty)
        for part in parts:
            add_rows(index, part)
        return index

    single = VectorIndex(timed("add (1 process)", add_single, figures), spec)
    merged = VectorIndex(ray_build(trained.index, parts, folder, workers, figures), spec)
    assert np.array_equal(single.ids(), merged.ids()) and len(merged) == n, "Ray build holds other ids"
    faiss_bytes = single.save(folder / "vectors.faiss")

    _, found = merged.search(queries, 10)
    _, single_found = single.search(queries, 10)
    _, pool = merged.search(queries, 50)
    pool_x = store.descriptors(np.unique(pool)).astype(np.float32)
    where = np.searchsorted(np.unique(pool), pool)
    rescored = np.take_along_axis(pool, np.argsort(-np.einsum("qkd,qd->qk", pool_x[where], queries), axis=1)[:, :10], 1)
    start = time.perf_counter()
    merged.search(queries, 10)
    batched = n_queries / (time.perf_counter() - start)
    start = time.perf_counter()
    for q in queries[:500]:
        merged.search(q[None], 10)
    one = 500 / (time.perf_counter() - start)

    total = folder_bytes(folder)
    catalog_bytes = (folder / "catalog.sqlite").stat().st_size
    shard_bytes = folder_bytes(folder / "descriptors")
    train_s, add_s = figures["train"][0], figures["add (1 process)"][0]
    print(f"  build time: single process {train_s + add_s:.1f} s (train {train_s:.1f} + add {add_s:.1f})")
    ray_s = figures["ray add+merge (2 w.)"][0] + figures["repack (driver)"][0]
    print(f"  build time: Ray 2 workers {train_s + ray_s:.1f} s (train {train_s:.1f} + add, merge and repack {ray_s:.1f})")
    print(f"  bytes/photo: {total / n:.0f} (catalog {catalog_bytes / n:.0f}, descriptors {shard_bytes / n:.0f}, "
          f"faiss {faiss_bytes / n:.0f}); target 2 x dim + 400 = {2 * dim + 400}; folder {total / 1e9:.2f} GB")
    print(f"  final faiss index {faiss_bytes / MB:.0f} MiB")
    print(f"  recall@10 vs exact: faiss {recall_at_10(found, truth):.3f} (single-process build "
          f"{recall_at_10(single_found, truth):.3f}), after exact rescoring of the top 50 {recall_at_10(rescored, truth):.3f}")
    print(f"  queries/s: {batched:.0f} batched ({n_queries} at once), {one:.0f} one at a time ({faiss.omp_get_max_threads()} threads)")
    store.catalog.close()
    shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e6,1e7", help="comma-separated photo counts (default 1e6,1e7)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2, help="Ray workers (CPUs of the local Ray session)")
    parser.add_argument("--quick", action="store_true", help="100 k photos, 1 000 queries")
    parser.add_argument("--workdir", type=Path, default=None, help="where the folders go (default: a temp folder)")
    args = parser.parse_args()
    sizes, n_queries = ([100_000], 1_000) if args.quick else ([int(float(s)) for s in args.sizes.split(",")], args.queries)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="netvlad-scale-"))
    print(f"{os.cpu_count()} CPUs, faiss {faiss.__version__}, work folder {work}; RSS at start "
          f"{peak_rss(field='VmRSS') / MB:.0f} MiB (Python, torch, faiss: every peak below includes it)")
    for n in sizes:
        run(n, args.dim, n_queries, work, args.workers)


if __name__ == "__main__":
    main()
