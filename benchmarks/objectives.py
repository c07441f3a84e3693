"""The training objectives compared: the same initial model trained with each objective under the
same budget (epochs, place set, seed, mining and precision), then Recall@1/5/10 on the held-out
test/ part (community protocol: every query counts, one without a positive is a miss) and the
training images/s measured in the same run.

Run (see docs/objectives.md for the place set and the initial model):

    .venv/bin/python benchmarks/objectives.py data/placesets/cmp --model runs/cmp-init.pt \
        --out runs/objectives --epochs 1 -- --amp --max-negatives 5 --random-negatives 200

PLACESET is a `make-placeset --holdout` folder (train/ trains, val/ chooses the epoch, test/
gives the figures); arguments after `--` go to every `netvlad train` unchanged. Each objective
trains in its own `netvlad train` process (run folder OUT/<objective>), its best.pt (by Recall@1
on val/) is evaluated with `netvlad eval TEST --queries all` (TEST: PLACESET/test, or --test);
the table is printed as Markdown and every figure written to OUT/objectives.json. An objective
whose run folder already holds a finished result (OUT/<objective>/result.json) is not trained
again.

    .venv/bin/python benchmarks/objectives.py data/placesets/ship3 --figures netvlad/weights/default.pt runs/new/best.pt

`--figures MODEL…` instead evaluates the given models on PLACESET/test (or --test) beside
RootSIFT-VLAD whose vocabulary is fitted on the PLACESET/train database photos only (never on the
evaluated database), all under the community protocol, and prints that table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

#: name in the table → `netvlad train` arguments.
OBJECTIVES = {
    "triplet": ["--loss", "triplet"],
    "soft-label pair": ["--loss", "soft-pair"],
    "soft-label listwise": ["--loss", "soft"],
    "rsw": ["--loss", "rsw"],
    "triplet + soft-label": ["--loss", "triplet-soft"],
}
EXTRA = {"rsw (sop preset)": ["--loss", "rsw", "--rsw-preset", "sop"], "rsw (cub preset)": ["--loss", "rsw", "--rsw-preset", "cub"]}


def netvlad(*args: str) -> str:
    """Run the `netvlad` command of this interpreter's environment; its stdout (stderr passes through)."""
    command = [str(Path(sys.executable).with_name("netvlad")), *args]
    return subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout


def slug(name: str) -> str:
    return re.sub("-+", "-", "".join(c if c.isalnum() else "-" for c in name)).strip("-")


def run_one(name: str, args: argparse.Namespace, train_args: list[str]) -> dict:
    """Train with objective `name` and evaluate its best model on test/ (cached in result.json)."""
    out = args.out / slug(name)
    cached = out / "result.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    start = time.perf_counter()
    summary = json.loads(netvlad(
        "train", str(args.placeset), "--model", str(args.model), "--out", str(out), "--epochs", str(args.epochs),
        "--seed", str(args.seed), "--no-progress", "--json", *OBJECTIVES.get(name, EXTRA.get(name, [])), *train_args,
    ).strip().splitlines()[-1])
    train_s = time.perf_counter() - start
    report = json.loads(netvlad("eval", str(args.test), "--model", summary["best"], "--queries", "all",
                                "--no-progress", "--json").strip().splitlines()[-1])
    recall = report["methods"][0]["recall"]
    result = {
        "objective": name, "args": OBJECTIVES.get(name, EXTRA.get(name)), "best_epoch": summary["best_epoch"],
        "recall": {n: recall[n] for n in ("1", "5", "10")}, "train_images_per_s": summary["images_per_s"],
        "run_s": round(train_s, 1), "test_queries": report["queries"], "test_database": report["database"],
        "queries_without_positives": report["queries_without_positives"], "val_recall": summary["recall"],
    }
    cached.write_text(json.dumps(result, indent=1) + "\n")
    return result


def figures(test: Path, train: Path, models: list[str], seed: int) -> list[dict]:
    """Recall@1/5/10 on `test` (all queries) of each model and of RootSIFT-VLAD fitted on the
    database photos of the place dataset `train`."""
    from netvlad.baselines import fit_baseline
    from netvlad.datasets.placeset import load_place_dataset
    from netvlad.evaluation import evaluate
    from netvlad.modelfile import load_model

    dataset, rows = load_place_dataset(test), []
    for model_file in models:
        model = load_model(model_file)
        result = evaluate(model, dataset, ns=(1, 5, 10), queries="all")
        rows.append({"method": model_file, "recall": result["recall"], "images_per_s": result["images_per_s"], "fit_s": 0.0})
    fit_photos = load_place_dataset(train).db_paths()
    start = time.perf_counter()
    baseline = fit_baseline("rootsift-vlad", fit_photos, load_model(models[0]).config, seed=seed)  # its input size
    fit_s = time.perf_counter() - start
    result = evaluate(baseline, dataset, ns=(1, 5, 10), queries="all")
    rows.append({"method": f"rootsift-vlad (vocabulary fitted on {len(fit_photos)} {train} database photos)",
                 "recall": result["recall"], "images_per_s": result["images_per_s"], "fit_s": fit_s})
    print(f"{test}: {len(dataset.db_images)} database images, {len(dataset.q_images)} queries (all counted)")
    print("| method | R@1 | R@5 | R@10 | describe images/s | fit s |\n|---|---:|---:|---:|---:|---:|")
    for r in rows:
        rec = r["recall"]
        print(f"| {r['method']} | {100 * rec[1]:.1f} | {100 * rec[5]:.1f} | {100 * rec[10]:.1f} | "
              f"{r['images_per_s']:.1f} | {r['fit_s']:.0f} |")
    return rows


def table(results: list[dict]) -> str:
    lines = ["| objective | `--loss` | R@1 | R@5 | R@10 | train images/s | best epoch | run min |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        rec = r["recall"]
        lines.append(f"| {r['objective']} | `{' '.join(r['args'][1:])}` | {100 * rec['1']:.1f} | {100 * rec['5']:.1f} | "
                     f"{100 * rec['10']:.1f} | {r['train_images_per_s']:.1f} | {r['best_epoch']} | {r['run_s'] / 60:.1f} |")
    return "\n".join(lines)


def main() -> None:
    argv = sys.argv[1:]
    train_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("placeset", type=Path, help="make-placeset --holdout folder with train/, val/ and test/")
    parser.add_argument("--model", type=Path, help="initial model (netvlad init), the same for all")
    parser.add_argument("--out", type=Path, help="folder of the runs and objectives.json")
    parser.add_argument("--test", type=Path, help="held-out place dataset evaluated (default: PLACESET/test)")
    parser.add_argument("--figures", nargs="+", metavar="MODEL",
                        help="only evaluate these models and RootSIFT-VLAD fitted on PLACESET/train on the test part")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--objectives", default=",".join(OBJECTIVES),
                        help=f"comma-separated, from: {', '.join([*OBJECTIVES, *EXTRA])}")
    args = parser.parse_args(argv)
    args.test = args.test or args.placeset / "test"
    if not args.test.is_dir():
        parser.error(f"{args.test}: no test part (make it with make-placeset --holdout)")
    if args.figures:
        rows = figures(args.test, args.placeset / "train", args.figures, args.seed)
        print(json.dumps([{**r, "recall": {str(n): v for n, v in r["recall"].items()}} for r in rows]))
        return
    if args.model is None or args.out is None:
        parser.error("--model and --out are needed to compare objectives")
    names = [n.strip() for n in args.objectives.split(",") if n.strip()]
    unknown = [n for n in names if n not in OBJECTIVES and n not in EXTRA]
    if unknown:
        parser.error(f"unknown objectives {unknown}")
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in names:
        print(f"== {name}", file=sys.stderr, flush=True)
        results.append(run_one(name, args, train_args))
        print(table(results[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}"
    record = {"test": str(args.test), "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "machine": machine,
              "epochs": args.epochs, "seed": args.seed, "train_args": train_args, "results": results}
    (args.out / "objectives.json").write_text(json.dumps(record, indent=1) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
