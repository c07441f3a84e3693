"""`netvlad eval`: Recall@N of a model on a place dataset, side by side with baselines."""

from __future__ import annotations

import json
import time
from enum import Enum
from functools import partial
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from netvlad.baselines import BASELINES, fit_baseline
from netvlad.cli.app import app
from netvlad.datasets.community import SPLITS
from netvlad.datasets.placeset import DATABASE_CSV, PlaceDataset, load_place_dataset
from netvlad.devices import resolve_device
from netvlad.errors import DatasetError
from netvlad.evaluation import DEFAULT_NS, QUERY_CONVENTIONS, evaluate, plot_recall, write_per_query_csv
from netvlad.rerank.evaluate import evaluate_rerank
from netvlad.imageio import find_photos
from netvlad.modelfile import load_model
from netvlad.rerank.patch import GLOBAL_WEIGHT
from netvlad.rerank.shortlist import DEFAULT_RERANK_K, RERANK_METHODS

#: The `--baseline` choices (typer takes repeatable choices as an Enum).
Baseline = Enum("Baseline", [(name, name) for name in BASELINES], type=str)
QueryConvention = Literal[QUERY_CONVENTIONS]
Split = Literal[SPLITS]
Rerank = Enum("Rerank", [(name, name) for name in RERANK_METHODS if name != "none"], type=str)


def _parse_ns(text: str) -> tuple[int, ...]:
    try:
        ns = tuple(sorted({int(v) for v in text.split(",") if v.strip()}))
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, e.g. 1,5,10,20, got '{text}'") from None
    if not ns or ns[0] < 1:
        raise typer.BadParameter(f"N values must be positive, got '{text}'")
    return ns


@app.command("eval")
def eval_command(
    dataset_path: Annotated[Path, typer.Argument(metavar="DATASET", help=(
        "Place dataset: a folder with database.csv and queries.csv, a dbStruct .mat file, a VPR-datasets-downloader "
        "split folder or root (see --split), or an MSLS root (see --cities)."))],
    model_path: Annotated[str, typer.Option("--model", "-m", help="Model file, or 'default'.")] = "default",
    baselines: Annotated[
        Optional[list[Baseline]], typer.Option("--baseline", "-b", help=(
            "Also evaluate a baseline fitted on the database photos or --baseline-fit (repeatable): rootsift-vlad, untrained "
            "(the model's architecture with random weights, BatchNorm and k-means initialised)."
        ))
    ] = None,
    ns_text: Annotated[str, typer.Option("--ns", help="Comma-separated N of Recall@N.")] = ",".join(map(str, DEFAULT_NS)),
    split: Annotated[Split, typer.Option(help="VPR-datasets-downloader roots: the split to evaluate.")] = "test",
    cities: Annotated[Optional[str], typer.Option(help="MSLS roots: comma-separated cities (default: cph,sf).")] = None,
    images_root: Annotated[Optional[Path], typer.Option(help=".mat datasets: folder the database image paths are relative to.")] = None,
    queries_root: Annotated[Optional[Path], typer.Option(help=".mat datasets: folder of the query images (default: images root).")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write the Recall@N curves to this image (.png, .svg, …).")] = None,
    per_query: Annotated[
        Optional[Path], typer.Option("--per-query", help="Write per-query results (rank of the first positive, top images) to this CSV.")
    ] = None,
    pos_radius: Annotated[
        Optional[float], typer.Option("--pos-radius", min=0.0, help="Positive radius in metres (default: the dataset's, 25 m).")
    ] = None,
    queries: Annotated[QueryConvention, typer.Option(help=(
        "Which queries Recall@N divides by: all (queries without a positive count as misses; the community's "
        "protocol, as pytorch-NetVlad and the VPR benchmarks) or with-positives (those are left out)."
    ))] = "all",
    reranks: Annotated[Optional[list[Rerank]], typer.Option("--rerank", help=(
        "Also score the model's ranking re-ranked by geometric (RootSIFT + RANSAC), patch (patch descriptors) "
        "or aqe (query expansion) (repeatable); prints ms per query."))] = None,
    rerank_k: Annotated[int, typer.Option(min=1, help="How many of the top results are re-ranked.")] = DEFAULT_RERANK_K,
    patch_global_weight: Annotated[float, typer.Option(min=0.0, help=(
        "With --rerank patch: weight of the global similarity in the score, against 1 for the patches (both "
        "standardised over the shortlist); 0 ranks by patches alone, as Patch-NetVLAD publishes."))] = GLOBAL_WEIGHT,
    batch_size: Annotated[int, typer.Option(min=1, help="Photos per network batch.")] = 16,
    device: Annotated[
        str, typer.Option(help="Torch device for the networks: auto (cuda when available), cpu, cuda, cuda:1, …")
    ] = "auto",
    seed: Annotated[int, typer.Option(help="Seed of the baselines' random init and k-means.")] = 0,
    baseline_fit: Annotated[Optional[list[Path]], typer.Option("--baseline-fit", help=(
        "Fit the baselines (RootSIFT vocabulary, untrained k-means) on these photos instead of the evaluated database "
        "(repeatable): photos, folders of photos, or place datasets (their database photos), e.g. the train/ part."
    ))] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars on stderr.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as one JSON object.")] = False,
) -> None:
    """Recall@N (a query is recalled when a database image within the positive radius is among
    its N most similar) of a model and, optionally, baselines fitted on the database photos."""
    ns = _parse_ns(ns_text)
    torch_device = resolve_device(device)
    dataset = load_place_dataset(dataset_path, images_root=images_root, queries_root=queries_root,
                                 split=split, cities=tuple(c.strip() for c in cities.split(",")) if cities else None,
                                 pos_radius_m=pos_radius,
                                 nontrivial_radius_m=None if pos_radius is None else min(pos_radius, 10.0))
    fit_photos = _fit_photos(baseline_fit) if baseline_fit else dataset.db_paths()
    model = load_model(model_path, device=torch_device)
    describe_model = partial(model.describe, batch_size=batch_size, progress=progress)

    run = partial(evaluate, dataset=dataset, ns=ns, per_query=per_query is not None, queries=queries)
    name = Path(model_path).name
    results = {name: {"fit_s": 0.0, **run(describe_model, keep_descriptors=True)}}
    db_desc, q_desc = results[name].pop("descriptors")
    for method in dict.fromkeys(r.value for r in reranks or []):
        found = evaluate_rerank(method, model, dataset, db_desc, q_desc, rerank_k, ns, queries,
                                per_query=per_query is not None, progress=progress,
                                patch_global_weight=patch_global_weight)
        base = {key: results[name][key] for key in ("dim", "describe_s", "images_per_s")}
        results[f"{name} + {method}"] = {**base, **found, "fit_s": found["evidence_s"]}
    for name in dict.fromkeys(b.value for b in baselines or []):
        start = time.perf_counter()
        baseline = fit_baseline(name, fit_photos, model.config, seed=seed, device=torch_device, progress=progress)
        fit_s = time.perf_counter() - start
        results[name] = {"fit_s": fit_s, **run(baseline, progress=progress)}

    if per_query is not None:
        write_per_query_csv(per_query, dataset, results)
    if plot is not None:
        plot_recall(results, plot, title=f"{dataset.name or dataset_path.name}: {len(dataset.q_images)} queries")
    if as_json:
        typer.echo(json.dumps(_report(dataset_path, dataset, ns, results)))
        return
    _print_table(dataset_path, dataset, ns, results)
    for path, what in ((per_query, "per-query results"), (plot, "recall plot")):
        if path is not None:
            typer.echo(f"wrote {what} to {path}")


def _fit_photos(sources: list[Path]) -> list[Path]:
    """The photos `--baseline-fit` names: a place dataset folder gives its database photos, anything
    else its photos (folders searched)."""
    photos = []
    for source in sources:
        if source.is_dir() and (source / DATABASE_CSV).is_file():
            photos.extend(load_place_dataset(source).db_paths())
        else:
            photos.extend(find_photos([source]))
    if not photos:
        raise DatasetError("--baseline-fit: no photos found in " + ", ".join(map(str, sources)))
    return photos


def _report(dataset_path: Path, dataset: PlaceDataset, ns: tuple[int, ...], results: dict[str, dict]) -> dict:
    """The `--json` output: dataset counts and, per method, Recall@N (keys are N as strings) and timings."""
    first = next(iter(results.values()))
    return {
        "dataset": str(dataset_path),
        "database": len(dataset.db_images),
        "queries": len(dataset.q_images),
        "evaluated_queries": first["queries"],
        "skipped_queries": first["skipped"],
        "queries_without_positives": first["without_positives"],
        "recall_divides_by": first["convention"],
        "positive_radius_m": dataset.pos_radius_m,
        "ns": list(ns),
        "methods": [
            {
                "name": name,
                "recall": {str(n): r["recall"][n] for n in ns},
                "dim": r["dim"],
                "fit_s": round(r["fit_s"], 3),
                "describe_s": round(r["describe_s"], 3),
                "images_per_s": round(r["images_per_s"], 2),
                **({"rerank": r["rerank"], "rerank_k": r["rerank_k"], "ms_per_query": round(r["ms_per_query"], 1),
                    "evidence_bytes_per_photo": round(r["evidence_bytes_per_photo"])} if "rerank" in r else {}),
                **({"patch_global_weight": r["patch_global_weight"]} if "patch_global_weight" in r else {}),
            }
            for name, r in results.items()
        ],
    }


def _print_table(dataset_path: Path, dataset: PlaceDataset, ns: tuple[int, ...], results: dict[str, dict]) -> None:
    """One row per method: Recall@N in percent, descriptor size, fit and describe times."""
    first = next(iter(results.values()))
    without = f"{first['without_positives']} without a positive within {dataset.pos_radius_m:g} m"
    counted = "counted as misses (--queries all)" if first["convention"] == "all" else "left out (--queries with-positives)"
    typer.echo(
        f"{dataset_path}: {len(dataset.db_images)} database images; Recall@N over {first['queries']} queries, "
        f"{without} {counted}"
    )
    width = max(len("method"), *map(len, results))
    typer.echo(
        f"{'method':<{width}}" + "".join(f"{'R@' + str(n):>8}" for n in ns)
        + f"{'dim':>8}{'fit s':>9}{'describe s':>12}{'img/s':>8}"
    )
    for name, r in results.items():
        typer.echo(
            f"{name:<{width}}" + "".join(f"{100 * r['recall'][n]:>7.1f}%" for n in ns)
            + f"{r['dim']:>8}{r['fit_s']:>9.1f}{r['describe_s']:>12.1f}{r['images_per_s']:>8.1f}"
        )
    for name, r in results.items():
        if "rerank" in r:
            stored = f", {r['evidence_bytes_per_photo'] / 1000:.0f} KB a photo" if r["evidence_bytes_per_photo"] else ""
            typer.echo(f"{name}: re-ranking the top {r['rerank_k']} took {r['ms_per_query']:.0f} ms per query "
                       f"(database evidence once: {r['evidence_s']:.1f} s{stored}, the 'fit s' column)")
