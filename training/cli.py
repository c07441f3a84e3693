"""`netvlad train`: registered on the netvlad CLI through the `netvlad.commands` entry point
(`train = "training.cli:register"`), so the library never imports this package.

Options that set a `TrainConfig` field carry the field's name (`--random-negatives` →
`random_negatives`), so the config is built from them directly and a resumed run compares them
with its stored config field by field.

The options are checked and the datasets loaded here; the run itself (`TrainJob.run`) goes on in
this process, in `--devices` × `--nodes` spawned data-parallel processes (training.distributed),
or in the process torchrun started.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

import torch

from netvlad.datasets.placeset import DATABASE_CSV, PlaceDataset, load_place_dataset
from netvlad.devices import resolve_device, slow_bf16_warning
from netvlad.modelfile import load_model
from training.config import RSW_PRESET_NAMES, Loss, Optimizer, Schedule, TrainConfig, rsw_preset_fields
from training.distributed import DistributedError, Layout, check_devices, launch, leave_group
from training.loop import BEST_MODEL, FINAL_MODEL, Trainer
from training.run_state import RUN_STATE, read_run_state

_D = TrainConfig()
RswPreset = Literal[RSW_PRESET_NAMES]  # typer offers a Literal's values as the choices
CONFIG_FIELDS = tuple(f.name for f in fields(TrainConfig))
# Config fields a resumed run may change; every other one given on the command line must match.
RESUMABLE = ("epochs", "workers")


def parse_train_blocks(text: str) -> int | None:
    """'auto' → None (1 on CPU, all on CUDA), 'all' → -1, else a count >= 0."""
    if text in ("auto", "all"):
        return None if text == "auto" else -1
    if not text.isdigit():
        raise typer.BadParameter(f"expected a number >= 0, 'all' or 'auto', got {text!r}")
    return int(text)


def split_folders(dataset: Path) -> tuple[Path, Path | None]:
    """A `make-placeset --holdout` folder (train/ and val/ inside) → (train, val); else (dataset, None)."""
    train, val = dataset / "train", dataset / "val"
    if (train / DATABASE_CSV).is_file() and (val / DATABASE_CSV).is_file():
        return train, val
    return dataset, None


def train_command(
    ctx: typer.Context,
    dataset: Annotated[Path, typer.Argument(help="Place dataset (folder with database.csv and queries.csv, a "
                                                 "make-placeset folder with train/ and val/, or a dbStruct .mat).")],
    out: Annotated[Path, typer.Option("--out", "-o", help=f"Run folder: {RUN_STATE}, model.pt, best.pt, log.csv, curves.png.")],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Starting model file (from `netvlad init`); not needed with --resume.")] = None,
    loss: Annotated[Loss, typer.Option(help="Objective.")] = _D.loss,
    epochs: Annotated[int, typer.Option(min=1, help="Total epochs (with --resume: may be raised).")] = _D.epochs,
    lr: Annotated[float, typer.Option(help="Learning rate, > 0 (RSW proxies: 100×).")] = _D.lr,
    optimizer: Annotated[Optimizer, typer.Option()] = _D.optimizer,
    weight_decay: Annotated[float, typer.Option(min=0.0)] = _D.weight_decay,
    schedule: Annotated[Schedule, typer.Option(help="LR schedule (step: halve every --lr-step-epochs).")] = _D.schedule,
    lr_step_epochs: Annotated[int, typer.Option(min=1)] = _D.lr_step_epochs,
    batch_size: Annotated[int, typer.Option(min=1, help="Queries per optimiser step.")] = _D.batch_size,
    cache_refresh: Annotated[int, typer.Option(min=1, help="Refresh the mining descriptor cache every this many queries.")] = _D.cache_refresh,
    random_negatives: Annotated[int, typer.Option("--random-negatives", "--negatives", min=0, help="Random negatives drawn per query (at most the database size).")] = _D.random_negatives,
    max_negatives: Annotated[int, typer.Option(min=1, help="Hard negatives kept per query (at most a tenth of the database).")] = _D.max_negatives,
    margin: Annotated[float, typer.Option(min=0.0, help="Triplet margin (squared descriptor distance).")] = _D.margin,
    rsw_preset: Annotated[Optional[RswPreset], typer.Option(
        show_default="none: α 0.5, k1 0.25, k2 2, T 16, margin 1, for unit-norm descriptors",
        help="--loss rsw with a published warp configuration (α, k1, k2, T, margin): default (the authors' code: "
             "8, 0.25, 2, 1, 1), cub (28.40, 0.93, 1.15, 4.525, 1.30), sop (13.025, 0.8563, 1.1181, 3.7442, 1.348). "
             "Their α is for unnormalised embeddings: NetVLAD descriptors (unit norm, d ≤ 2) stay inside it.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of query order and negative sampling.")] = _D.seed,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    amp: Annotated[Optional[bool], typer.Option("--amp/--no-amp", help="bfloat16 autocast (default: on for CUDA; ~2-3x faster on bf16 CPUs).")] = None,
    channels_last: Annotated[bool, typer.Option(help="channels_last memory format.")] = _D.channels_last,
    train_blocks: Annotated[Optional[int], typer.Option(parser=parse_train_blocks, metavar="N|all|auto", show_default="auto",
                                                        help="Backbone blocks to train, from the last (auto: 1 on CPU, all on CUDA).")] = None,
    workers: Annotated[int, typer.Option(min=0, help="Image-loading worker processes.")] = _D.workers,
    val: Annotated[Optional[Path], typer.Option(help="Validation place dataset (default: the val/ split, else the training queries).")] = None,
    pos_radius: Annotated[Optional[float], typer.Option("--pos-radius", min=0.0, help="Positive radius in metres: negatives lie beyond it, validation counts hits within it (default: the dataset's, 25 m).")] = None,
    train_radius: Annotated[Optional[float], typer.Option("--train-radius", min=0.0, help="Radius in metres of the potential positives a triplet picks its positive from (default: the dataset's, 10 m).")] = None,
    resume: Annotated[bool, typer.Option(help=f"Continue the run in --out from its {RUN_STATE}.")] = False,
    devices: Annotated[int, typer.Option(min=1, help="Data-parallel training processes per node (one per GPU; gloo processes on the CPU).")] = 1,
    nodes: Annotated[int, typer.Option(min=1, help="Nodes, each running this command with its --node-rank (or use torchrun).")] = 1,
    node_rank: Annotated[int, typer.Option(min=0, help="This node's place among --nodes.")] = 0,
    master_addr: Annotated[str, typer.Option(help="Address of node 0, where the processes meet.")] = "127.0.0.1",
    master_port: Annotated[Optional[int], typer.Option(min=1, max=65535, help="Port on --master-addr (default on one node: a free one).")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run summary as JSON.")] = False,
) -> None:
    """Train a place-recognition model with hard-negative mining (triplet, soft-label or RSW loss)."""
    torch_device = resolve_device(device)
    if resume:
        check_resume_options(ctx, out)
    elif (out / RUN_STATE).exists():
        raise typer.BadParameter(f"{out / RUN_STATE} exists: pass --resume to continue that run, or choose "
                                 "another folder", param_hint="--out")
    elif model is None:
        raise typer.BadParameter("a starting model is needed (make one with `netvlad init`)", param_hint="--model")
    else:
        config = TrainConfig(**{name: ctx.params[name] for name in CONFIG_FIELDS if name in ctx.params})
    if rsw_preset is not None and not resume:
        if loss != "rsw":
            raise typer.BadParameter(f"a warp preset applies to --loss rsw, not {loss}", param_hint="--rsw-preset")
        config = replace(config, **rsw_preset_fields(rsw_preset))
    train_path, val_path = split_folders(dataset)
    radii = {"pos_radius_m": pos_radius, "nontrivial_radius_m": train_radius}
    train_set = load_place_dataset(train_path, **radii)
    val_path = val if val is not None else val_path
    val_set = load_place_dataset(val_path, **radii) if val_path is not None else None
    job = TrainJob(out, train_set, val_set, torch_device, progress, as_json, model=model, config=None if resume else config,
                   epochs=epochs if resume and _given(ctx, "epochs") else None,
                   workers=workers if resume and _given(ctx, "workers") else None)
    if (slow := slow_bf16_warning(torch_device, amp)) is not None:
        typer.echo(f"warning: {slow}", err=True)
    torchrun = Layout.of_torchrun()
    if torchrun is not None:
        if devices > 1 or nodes > 1:
            raise DistributedError("under torchrun leave out --devices and --nodes: torchrun starts the processes")
        job.run(int(os.environ["LOCAL_RANK"]), torchrun)
    elif devices * nodes == 1:
        job.run(0, Layout())
    else:
        check_devices(torch_device, devices)
        launch(job.run, (Layout.of_nodes(devices, nodes, node_rank, master_addr, master_port),), devices)


@dataclass
class TrainJob:
    """A checked training run, picklable for the spawned processes: a new one (`model` file and
    `config`) or, with `config` None, the resumption of the run in `out` (`epochs`, `workers`:
    new values or None)."""

    out: Path
    train_set: PlaceDataset
    val_set: PlaceDataset | None
    device: torch.device
    progress: bool
    as_json: bool
    model: str | None = None
    config: TrainConfig | None = None
    epochs: int | None = None
    workers: int | None = None

    def run(self, local_rank: int, layout: Layout) -> None:
        """Train as local rank `local_rank` of `layout`; rank 0 prints."""
        cluster = layout.join(local_rank, self.device)
        ended_well = False
        try:
            if self.config is None:
                trainer = Trainer.resume(self.out, self.train_set, self.val_set, device=cluster.device, progress=self.progress,
                                         epochs=self.epochs, workers=self.workers, cluster=cluster)
            else:
                trainer = Trainer(load_model(self.model), self.train_set, self.out, self.config, self.val_set,
                                  device=cluster.device, progress=self.progress, cluster=cluster)
            if cluster.main:
                _announce(trainer, self.as_json, cluster.world)
            trainer.fit()
            if cluster.main:
                _report(trainer, self.as_json)
            ended_well = True
        finally:
            leave_group(synchronise=ended_well)


def _announce(trainer: Trainer, as_json: bool, processes: int) -> None:
    """Warn about skipped queries; say what the run will do (not with --json)."""
    train_set = trainer.train_set
    for where in trainer.skipped:
        typer.echo(f"warning: skipped query without a database image within "
                   f"{train_set.nontrivial_radius_m:g} m: {where}", err=True)
    mining = _mining(trainer)
    if not as_json:
        where = f"{processes} processes on {trainer.device.type}" if processes > 1 else str(trainer.device)
        typer.echo(f"{trainer.config.loss} loss on {mining['queries']} queries, {len(train_set.db_images)} database "
                   f"images; per query {mining['random_negatives']} random + cached negatives, up to "
                   f"{mining['max_negatives']} hard ones; cache refreshed every {mining['cache_refresh']} queries; "
                   f"{where}, amp={trainer.amp}, epoch {trainer.epoch} → {trainer.config.epochs}")


def _mining(trainer: Trainer) -> dict:
    return {"random_negatives": trainer.num_random, "max_negatives": trainer.max_negatives,
            "cache_refresh": trainer.config.cache_refresh, "queries": len(trainer.queries)}


def _report(trainer: Trainer, as_json: bool) -> None:
    """The run summary: JSON, or one line with the recall before and after."""
    out, record = trainer.out, trainer.record
    first, last = record.rows[0], record.rows[-1]
    summary = {
        "out": str(out), "epochs": trainer.epoch, "model": str(out / FINAL_MODEL), "best": str(out / BEST_MODEL),
        "best_epoch": trainer.best["epoch"], "skipped_queries": len(trainer.skipped),
        "recall_start": {n: first[f"recall@{n}"] for n in (1, 5, 10)},
        "recall": {n: last[f"recall@{n}"] for n in (1, 5, 10)},
        "images_per_s": last["images_per_s"], "mining": _mining(trainer), "config": asdict(trainer.config),
    }
    if as_json:
        typer.echo(json.dumps(summary))
        return
    recall = lambda r: "/".join(f"{100 * r[n]:.1f}" for n in (1, 5, 10))  # noqa: E731
    typer.echo(f"trained {trainer.epoch} epochs: Recall@1/5/10 {recall(summary['recall_start'])} → "
               f"{recall(summary['recall'])} %; wrote {out / FINAL_MODEL} and {out / BEST_MODEL} "
               f"(epoch {trainer.best['epoch']}), log.csv, curves.png")


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether option `name` was given on the command line (not defaulted)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


def check_resume_options(ctx: typer.Context, out: Path) -> None:
    """Refuse config options that would change a resumed run (its settings live in its run state)."""
    saved = TrainConfig.from_dict(read_run_state(out)["train_config"])
    if (preset := ctx.params.get("rsw_preset")) is not None:
        kept = {name: getattr(saved, name) for name in rsw_preset_fields(preset)}
        if kept != rsw_preset_fields(preset):
            raise typer.BadParameter(f"{preset!r} differs from the run state's warp {kept}; a resumed run keeps its "
                                     "settings (omit the option, or start a new --out)", param_hint="--rsw-preset")
    for name in CONFIG_FIELDS:
        if name in RESUMABLE or not _given(ctx, name):
            continue
        value, kept = ctx.params[name], getattr(saved, name)
        if value is not None and value != kept:
            option = "--" + name.replace("_", "-")
            raise typer.BadParameter(f"{value!r} differs from the run state's {kept!r}; a resumed run keeps "
                                     "its settings (omit the option, or start a new --out)", param_hint=option)


def register(app: typer.Typer) -> None:
    """Add `train` to the netvlad CLI (entry point group `netvlad.commands`)."""
    app.command("train")(train_command)
