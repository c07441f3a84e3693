"""Place-recognition evaluation: Recall@N by exact faiss search, timing, per-query results and plots.

A query counts as recalled at N when at least one of its N most similar database descriptors
is a positive, i.e. a database image within the dataset's positive radius (docs/design.md §6.3).
Similarity is the cosine: exact inner-product search (`faiss.IndexFlatIP`) on L2-normalised
rows, which ranks unit-norm descriptors exactly as Euclidean distance does, and ranks a zero
descriptor (e.g. a photo without keypoints) neutrally instead of next to everything.

Queries without any positive: by default they count as misses and Recall@N divides by all
queries (``queries="all"``), the convention of the community's evaluation code
(pytorch-NetVlad, gmberton's deep-visual-geo-localization-benchmark and VPR-methods-evaluation),
so figures compare with published ones. ``queries="with-positives"`` leaves them out of the
denominator instead (reported as `skipped`). Either way `without_positives` counts them.
"""

from __future__ import annotations

import csv
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import faiss
import numpy as np
from matplotlib.figure import Figure

from netvlad.datasets.placeset import PlaceDataset
from netvlad.errors import DatasetError

DEFAULT_NS = (1, 5, 10, 20)
#: Which queries Recall@N divides by: all of them (community protocol, the default), or only
#: those with at least one positive.
QUERY_CONVENTIONS = ("all", "with-positives")


class Describer(Protocol):
    """Anything with `describe(images, progress=...) -> (N, dim) float32` (NetVLADModel, baselines)."""

    def describe(self, images: Sequence[Path], progress: bool = False) -> np.ndarray: ...


DescribeFn = Callable[[Sequence[Path]], np.ndarray]


def recall_at_n(
    db_desc: np.ndarray,
    q_desc: np.ndarray,
    positives: Sequence[np.ndarray],
    ns: Sequence[int] = DEFAULT_NS,
    per_query: bool = False,
    queries: str = "all",
) -> dict:
    """Recall@N of queries against a database by exact cosine-similarity search.

    db_desc: (Nd, D), q_desc: (Nq, D) descriptors; positives: Nq integer arrays of database
    indices; `queries`: one of QUERY_CONVENTIONS (see the module docstring). Returns
    {"recall": {N: fraction}, "queries": the denominator, "skipped": queries left out of it,
    "without_positives": queries without any positive, "convention": `queries`}; N larger than
    Nd behaves as Nd. With `per_query`, also
    "first_positive_rank" (Nq,) int64, the 1-based rank of the first positive among the
    k = max(ns) retrieved (-1: none in the top k, or no positives), and "top_ids" (Nq, k) int64
    database indices, most similar first.
    """
    db = _descriptors(db_desc, "database")
    q = _descriptors(q_desc, "query")
    if db.shape[1] != q.shape[1]:
        raise ValueError(f"database descriptors have {db.shape[1]} dims, query descriptors {q.shape[1]}")
    if len(positives) != len(q):
        raise ValueError(f"{len(positives)} positive sets for {len(q)} queries")
    ns = _check_ns(ns)
    if queries not in QUERY_CONVENTIONS:
        raise ValueError(f"queries must be one of {QUERY_CONVENTIONS}, not {queries!r}")
    if len(db) == 0:
        raise DatasetError("the database is empty")
    k = min(max(ns), len(db))
    index = faiss.IndexFlatIP(db.shape[1])
    index.add(db)
    _, top_ids = index.search(q, k)
    return recall_of_rankings(top_ids, positives, len(db), ns, per_query, queries)


def recall_of_rankings(
    top_ids: np.ndarray,
    positives: Sequence[np.ndarray],
    database: int,
    ns: Sequence[int] = DEFAULT_NS,
    per_query: bool = False,
    queries: str = "all",
) -> dict:
    """Recall@N of given rankings: `top_ids` (Nq, k) database indices per query, best first (-1:
    none); `positives` and the result as in `recall_at_n`; `database` the database size. Used
    directly for rankings that are not plain nearest-neighbour search (re-ranked shortlists)."""
    top_ids = np.asarray(top_ids, dtype=np.int64)
    if top_ids.ndim != 2 or len(top_ids) != len(positives):
        raise ValueError(f"{len(positives)} positive sets for rankings of shape {top_ids.shape}")
    ns = _check_ns(ns)
    counts = np.array([len(p) for p in positives], dtype=np.int64)
    evaluated = counts > 0
    if not evaluated.any():
        raise DatasetError(f"none of the {len(top_ids)} queries has a positive database image")

    # A retrieved id is a hit when (query, id) is one of the (query, positive) pairs.
    flat_positives = np.concatenate([np.asarray(p, dtype=np.int64).ravel() for p in positives])
    if flat_positives.min() < 0 or flat_positives.max() >= database:
        raise ValueError(f"positive indices must lie in [0, {database}), the database size")
    rows = np.arange(len(top_ids), dtype=np.int64)
    pair_keys = np.repeat(rows, counts) * database + flat_positives
    hits = np.isin(rows[:, None] * database + top_ids, pair_keys) & (top_ids >= 0)
    first = np.where(hits.any(axis=1), hits.argmax(axis=1) + 1, -1)

    found = first if queries == "all" else first[evaluated]  # no positive: first == -1, a miss
    result: dict = {
        "recall": {n: float(np.mean((found > 0) & (found <= n))) for n in ns},
        "queries": len(found),
        "skipped": len(first) - len(found),
        "without_positives": int((~evaluated).sum()),
        "convention": queries,
    }
    if per_query:
        result["first_positive_rank"] = first.astype(np.int64)
        result["top_ids"] = top_ids
    return result


def evaluate(
    describer: Describer | DescribeFn,
    dataset: PlaceDataset,
    ns: Sequence[int] = DEFAULT_NS,
    per_query: bool = False,
    progress: bool = False,
    queries: str = "all",
    keep_descriptors: bool = False,
) -> dict:
    """Describe the dataset's database and query photos, then `recall_at_n` on its positives
    (`queries`: which queries Recall@N divides by, see QUERY_CONVENTIONS); `keep_descriptors`
    adds them as "descriptors": (database (Nd, dim), queries (Nq, dim)).

    `describer` is an object with `.describe(images, progress=...)` (a NetVLADModel, a
    baseline) or a function of a list of paths returning (N, dim) descriptors. Adds to the
    result "dim", "database", "describe_s" (seconds for all database and query photos,
    decoding included) and "images_per_s".
    """
    describe = _describe_fn(describer, progress)
    db_paths, q_paths = dataset.db_paths(), dataset.q_paths()
    start = time.perf_counter()
    db_desc = describe(db_paths)
    q_desc = describe(q_paths)
    seconds = time.perf_counter() - start
    for what, desc, paths in (("database", db_desc, db_paths), ("query", q_desc, q_paths)):
        if len(desc) != len(paths):
            raise ValueError(f"the describer returned {len(desc)} {what} descriptors for {len(paths)} photos")
    result = recall_at_n(db_desc, q_desc, dataset.positives(), ns, per_query=per_query, queries=queries)
    result.update(
        dim=int(db_desc.shape[1]),
        database=len(db_paths),
        describe_s=seconds,
        images_per_s=(len(db_paths) + len(q_paths)) / seconds if seconds > 0 else float("inf"),
    )
    if keep_descriptors:
        result["descriptors"] = (db_desc, q_desc)
    return result


def plot_recall(results: Mapping[str, Mapping], path: str | os.PathLike, title: str = "") -> Path:
    """Write a Recall@N curve (one line per method: name → result of `recall_at_n`) to an image
    file (format from the suffix, e.g. .png, .svg); returns the path. Uses the Agg canvas, so no
    display is needed."""
    path = Path(path)
    figure = Figure(figsize=(6, 4), dpi=120, layout="constrained")
    axes = figure.add_subplot()
    ticks: set[int] = set()
    for name, result in results.items():
        ns = sorted(result["recall"])
        axes.plot(ns, [100 * result["recall"][n] for n in ns], marker="o", label=name)
        ticks.update(ns)
    axes.set_xticks(sorted(ticks))
    axes.set_xlabel("N (top-N retrieved database images)")
    axes.set_ylabel("Recall@N (%)")
    axes.set_ylim(0, 100)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower right")
    if title:
        axes.set_title(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def write_per_query_csv(path: str | os.PathLike, dataset: PlaceDataset, results: Mapping[str, Mapping]) -> Path:
    """Write one row per (method, query): method, query image, number of positives, 1-based rank
    of the first positive (-1: not in the top k) and the top-k database images (space-separated,
    most similar first). `results` map method names to results computed with `per_query=True`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    counts = [len(p) for p in dataset.positives()]
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["method", "query", "positives", "first_positive_rank", "top_images"])
        for name, result in results.items():
            if "top_ids" not in result:
                raise ValueError(f"result of '{name}' has no per-query data (evaluate with per_query=True)")
            for i, (rank, ids) in enumerate(zip(result["first_positive_rank"], result["top_ids"])):
                top = " ".join(dataset.db_images[j] for j in ids if j >= 0)
                writer.writerow([name, dataset.q_images[i], counts[i], int(rank), top])
    return path


def _describe_fn(describer: Describer | DescribeFn, progress: bool) -> DescribeFn:
    if hasattr(describer, "describe"):
        return lambda images: describer.describe(images, progress=progress)
    if callable(describer):
        return describer
    raise TypeError(f"expected an object with .describe() or a function, got {type(describer).__name__}")


def _descriptors(array: np.ndarray, what: str) -> np.ndarray:
    """(N, D) float32 copy with unit-norm rows (zero rows stay zero)."""
    desc = np.array(array, dtype=np.float32, order="C")
    if desc.ndim != 2:
        raise ValueError(f"{what} descriptors must be a 2-D array (N, D), got shape {desc.shape}")
    if not np.isfinite(desc).all():
        raise ValueError(f"{what} descriptors contain NaN or infinite values")
    faiss.normalize_L2(desc)
    return desc


def _check_ns(ns: Sequence[int]) -> tuple[int, ...]:
    ns = tuple(sorted({int(n) for n in ns}))
    if not ns or ns[0] < 1:
        raise ValueError(f"N values must be positive integers, got {ns}")
    return ns
