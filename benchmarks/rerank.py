"""Re-ranking benchmark: Recall@1/5/10 of the global ranking and of each re-ranking, ms per query
at several shortlist lengths, and the bytes of stored evidence per photo, from one run.

    python benchmarks/rerank.py data/placesets/ship/test            # held-out place set
    python benchmarks/rerank.py DATASET --model M --ks 20,50,100 --methods geometric,patch,aqe

The database's evidence is computed once (as an index keeps it); ms per query counts what a
search adds: the query photo's own evidence and the re-ranking of its top k (one query at a
time, `netvlad.rerank.evaluate`). Recall@N follows the community protocol (all queries).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from netvlad.datasets.placeset import load_place_dataset
from netvlad.evaluation import recall_of_rankings
from netvlad.modelfile import load_model
from netvlad.rerank.evaluate import database_evidence, global_rankings, rerank_rankings
from netvlad.rerank.patch import GLOBAL_WEIGHT

NS = (1, 5, 10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", help="place dataset (CSV folder, VPR-datasets-downloader split, …)")
    parser.add_argument("--model", default="default")
    parser.add_argument("--methods", default="geometric,patch,aqe")
    parser.add_argument("--ks", default="20,50,100", help="shortlist lengths timed (Recall@N is reported for each)")
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    ks = [int(k) for k in args.ks.split(",")]

    dataset = load_place_dataset(args.dataset)
    model = load_model(args.model)
    start = time.perf_counter()
    db_desc = model.describe(dataset.db_paths())
    q_desc = model.describe(dataset.q_paths())
    describe_s = time.perf_counter() - start
    positives = dataset.positives()
    print(f"{args.dataset}: {len(db_desc)} database photos, {len(q_desc)} queries; model {args.model} "
          f"({model.dim}-d); {os.cpu_count()} CPUs; described in {describe_s:.0f} s")

    top = global_rankings(db_desc, q_desc, max(NS))
    rows = [("global only", "-", recall_of_rankings(top, positives, len(db_desc), NS)["recall"], 0.0, 0.0)]
    for method in methods:
        evidence = database_evidence(method, model, dataset.db_paths())
        print(f"  {method}: database evidence in {evidence.seconds:.0f} s, {evidence.bytes_per_photo:,.0f} bytes a photo")
        # patch: the default score (patches + global similarity) and Patch-NetVLAD's (patches alone)
        variants = [(method, GLOBAL_WEIGHT)] + ([(f"{method} (patches alone)", 0.0)] if method == "patch" else [])
        for name, weight in variants:
            for k in ks:
                rankings, ms = rerank_rankings(evidence, model, dataset.q_paths(), db_desc, q_desc, k, max(NS),
                                               patch_global_weight=weight)
                recall = recall_of_rankings(rankings[:, : max(NS)], positives, len(db_desc), NS)["recall"]
                rows.append((name, str(k), recall, ms, evidence.bytes_per_photo))
                print(f"  {name} k={k}: R@1 {100 * recall[1]:.1f} %, {ms:.1f} ms/query", flush=True)

    print("\n| method | k | R@1 | R@5 | R@10 | ms/query (extra) | stored bytes/photo |\n|---|---|---|---|---|---|---|")
    for method, k, recall, ms, size in rows:
        print(f"| {method} | {k} | " + " | ".join(f"{100 * recall[n]:.1f} %" for n in NS)
              + f" | {ms:.1f} | {size:,.0f} |")
    base = rows[0][2][1]
    names = dict.fromkeys(row[0] for row in rows[1:])
    best = {name: max((r for r in rows if r[0] == name), key=lambda r: r[2][1]) for name in names}
    for method, row in best.items():
        print(f"{method}: R@1 {100 * (row[2][1] - base):+.1f} points over global only (k={row[1]})")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
