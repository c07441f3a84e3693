"""The training loop: mining chunks, optimiser and LR schedule, bf16 autocast, validation and
exact resume.

An epoch visits the usable training queries (those with a potential positive) in a seeded random
order, in chunks of `cache_refresh` queries. Before each chunk the descriptor cache is refreshed
(database and the chunk's queries, model in eval mode) and the chunk's tuples are mined; their
images are then loaded (`workers` processes) in steps of `batch_size` queries. After each epoch
Recall@1/5/10 is measured on the validation set (the training set's own queries when there is no
val split), `model.pt` (latest) and `best.pt` (best Recall@1, epoch 0 = the starting model
included) are written as plain model files, then the run state (`training.run_state`), `log.csv`
and `curves.png`.

All sampling randomness comes from generators seeded with (seed, epoch), and the run state holds
everything else that evolves, so resuming after epoch e gives the same weights as an
uninterrupted run.

With a `Cluster` of several processes (training.distributed) every rank computes its share of
each descriptor refresh, all-gathers the rest and mines the same tuples; each step's tuples are
split between the ranks and DDP averages the gradients, so the weights follow those of one
process with the same global batch. Rank 0 alone writes the run folder and shows progress.
AMP in float16 (GPUs without bfloat16) scales the loss with a `GradScaler`.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from netvlad.configs import ConfigError
from netvlad.datasets.groundtruth import queries_without_positives
from netvlad.datasets.placeset import PlaceDataset
from netvlad.devices import amp_dtype, resolve_device
from netvlad.errors import DatasetError
from netvlad.evaluation import recall_at_n
from netvlad.model import ModelConfig, NetVLADModel
from netvlad.modelfile import save_model
from training.config import TrainConfig
from training.distributed import Cluster
from training.images import PlaceImages, collate_items, describe_images
from training.mining import HardNegativeMiner, MinedTuple
from training.objectives import StepLoss, build_objective, images_of
from training.optim import build_optimizer, build_scheduler
from training.run_state import check_dataset, read_run_state, restore_run_state, save_run_state
from training.runlog import RunLog

log = logging.getLogger(__name__)

BEST_MODEL = "best.pt"
FINAL_MODEL = "model.pt"
RECALL_NS = (1, 5, 10)


def freeze_backbone(model: NetVLADModel, train_blocks: int) -> list[nn.Module]:
    """Freeze all but the last `train_blocks` parameterised backbone blocks (-1: freeze none);
    returns the frozen blocks (the loop keeps them in eval mode: their BatchNorm statistics stay)."""
    blocks = [m for m in model.backbone.children() if any(True for _ in m.parameters())]
    keep = len(blocks) if train_blocks < 0 else min(train_blocks, len(blocks))
    frozen = blocks[: len(blocks) - keep]
    model.requires_grad_(True)
    for block in frozen:
        block.requires_grad_(False)
    return frozen


@contextmanager
def deterministic_algorithms(enabled: bool):
    """Temporarily switch `torch.use_deterministic_algorithms` (warn-only) on."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    if enabled:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


class _StepImages(Dataset):
    """Item s → the loaded (query items, database items) of step s's mined tuples."""

    def __init__(self, steps: list[list[MinedTuple]], q_images: PlaceImages, db_images: PlaceImages):
        self.steps, self.q_images, self.db_images = steps, q_images, db_images

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, s: int) -> tuple[list, list]:
        tuples = self.steps[s]
        return ([self.q_images[t.query] for t in tuples],
                [self.db_images[int(j)] for t in tuples for j in np.concatenate([t.positives, t.negatives])])


class Trainer:
    """Trains `model` on `train_set`, validating on `val_set` (default: `train_set`), writing into `out`.

    Use `fit()`; `Trainer.resume(out, …)` rebuilds a trainer from the run state in `out`. The model
    is moved to the device (and to channels_last) in place. Queries without a potential positive
    are skipped and listed in `skipped` (file and row of each); `num_random` and `max_negatives`
    are the mining sizes after scaling to the database. `cluster`: this process's rank among
    data-parallel training processes (default: the only one).
    """

    def __init__(
        self,
        model: NetVLADModel,
        train_set: PlaceDataset,
        out: str | os.PathLike,
        config: TrainConfig | None = None,
        val_set: PlaceDataset | None = None,
        device: str | torch.device | None = "auto",
        progress: bool = True,
        cluster: Cluster | None = None,
    ):
        config = config if config is not None else TrainConfig()
        self.device, self.cluster = resolve_device(device), cluster if cluster is not None else Cluster()
        cuda = self.device.type == "cuda"
        config = replace(config, amp=cuda if config.amp is None else config.amp,
                         train_blocks=(-1 if cuda else 1) if config.train_blocks is None else config.train_blocks)
        self.config, self.out, self.amp = config, Path(out), config.amp
        self.progress = progress and self.cluster.main
        self.train_set, self.val_set = train_set, val_set if val_set is not None else train_set
        self.model = model.to(self.device)
        if config.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.db_images = PlaceImages(train_set, "database", model.preprocess)
        self.q_images = PlaceImages(train_set, "queries", model.preprocess)
        if self.val_set is train_set:
            self.val_db_images, self.val_q_images = self.db_images, self.q_images
        else:
            self.val_db_images = PlaceImages(self.val_set, "database", model.preprocess)
            self.val_q_images = PlaceImages(self.val_set, "queries", model.preprocess)
        self.val_positives = self.val_set.positives()

        potential = train_set.potential_positives()
        missing = queries_without_positives(potential)
        self.skipped = [self.q_images.where(int(i)) for i in missing]
        self.queries = np.setdiff1d(np.arange(len(potential)), missing)
        if len(self.queries) == 0:
            raise DatasetError(
                f"{train_set.root}: none of the {len(potential)} queries has a database image within "
                f"{train_set.nontrivial_radius_m:g} m; nothing to train on"
            )
        if self.skipped:
            log.info("skipping %d queries without a database image within %g m, e.g. %s",
                     len(self.skipped), train_set.nontrivial_radius_m, self.skipped[0])
        num_db = len(train_set.db_images)
        self.num_random = min(config.random_negatives, num_db)
        self.max_negatives = max(1, min(config.max_negatives, num_db // 10))
        self.batch_size = min(config.batch_size, len(self.queries))

        torch.manual_seed(config.seed)  # the RSW proxies' initialisation
        self.objective = build_objective(config, train_set, self.model.dim, self.max_negatives).to(self.device)
        self.miner = HardNegativeMiner(
            potential, train_set.positives(), num_db, self.num_random, self.max_negatives, config.margin,
            max_positives=self.objective.max_positives, violating_only=self.objective.violating_only,
        )
        self.frozen = freeze_backbone(self.model, config.train_blocks)
        self.step_loss = self.cluster.wrap(StepLoss(self.model, self.objective, self.amp, config.channels_last))
        self.optimizer = build_optimizer(config, self.model, self.objective)
        self.scheduler = build_scheduler(self.optimizer, lambda: (self.config, self.steps_per_epoch))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp and amp_dtype(self.device) == torch.float16)
        self.epoch, self.step = 0, 0
        self.best: dict = {}
        self.record = RunLog()
        self._described: dict[int, tuple[int, np.ndarray]] = {}

    @property
    def steps_per_epoch(self) -> int:
        """Optimiser-step slots per epoch: batches of `batch_size` queries within each cache chunk."""
        n, chunk = len(self.queries), self.config.cache_refresh
        full, rest = divmod(n, chunk)
        return full * math.ceil(chunk / self.batch_size) + math.ceil(rest / self.batch_size)

    # ------------------------------------------------------------------ descriptors

    def _describe(self, images: PlaceImages, indices: np.ndarray | None = None) -> np.ndarray:
        """Descriptors of images[indices] (default all) under the current weights, each rank
        computing its share; all-image results are reused until the next optimiser step
        (validation on the training set feeds the next epoch's first cache refresh)."""
        if indices is not None and len(indices) < len(images):
            return self._describe_shared(images, np.asarray(indices))
        cached = self._described.get(id(images))
        if cached is None or cached[0] != self.step:
            cached = self.step, self._describe_shared(images, np.arange(len(images)))
            self._described = {k: v for k, v in self._described.items() if v[0] == self.step}
            self._described[id(images)] = cached
        return cached[1]

    def _describe_shared(self, images: PlaceImages, indices: np.ndarray) -> np.ndarray:
        c = self.config
        part = describe_images(self.model, images, self.cluster.share(indices), c.eval_batch_size, c.workers,
                               self.amp, c.channels_last, self.progress)
        return self.cluster.gather_rows(part, len(indices))

    def validate(self) -> dict:
        """Recall@1/5/10 (fractions) on the validation set with the current weights."""
        db = self._describe(self.val_db_images)
        q = self._describe(self.val_q_images)
        return recall_at_n(db, q, self.val_positives, RECALL_NS)["recall"]

    def _refresh(self, chunk: np.ndarray) -> None:
        queries = np.sort(chunk)
        db = self._describe(self.db_images)
        if len(queries) == len(self.q_images):
            self.miner.refresh(db, self._describe(self.q_images))
        else:
            self.miner.refresh(db, self._describe(self.q_images, queries), queries)

    # ------------------------------------------------------------------ training

    def _train_mode(self) -> None:
        self.model.train()
        for block in self.frozen:
            block.eval()

    def _train_step(self, tuples: list[MinedTuple], loaded: tuple[list, list]) -> tuple[float, int]:
        """One optimiser step on the step's `tuples` (this rank's share of them `loaded`); returns
        (loss, images forwarded by all ranks). A rank's loss is weighted by its share of the loss
        terms × ranks, so that the gradients DDP averages are those of the whole step's loss."""
        q_items, db_items = loaded
        tensors = [self.q_images.checked(it) for it in q_items] + [self.db_images.checked(it) for it in db_items]
        share = self.cluster.share(tuples)
        weight = self.objective.terms(share) * self.cluster.world / self.objective.terms(tuples)
        loss = self.step_loss(tensors, share, weight)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        return self.cluster.mean(float(loss.detach())), images_of(tuples)

    def train_epoch(self) -> dict:
        """Train one epoch (self.epoch + 1); returns its log values."""
        epoch = self.epoch + 1
        rng = np.random.default_rng([self.config.seed, epoch])
        order = rng.permutation(self.queries)
        c = self.config
        losses, images, skipped, done, busy = [], 0, 0, 0, 0.0
        bar = tqdm(total=len(order), desc=f"epoch {epoch}/{c.epochs}", unit="q", disable=not self.progress)
        for start in range(0, len(order), c.cache_refresh):
            chunk = order[start : start + c.cache_refresh]
            self._refresh(chunk)
            mined = [self.miner.mine(int(q), rng) for q in chunk]
            slots = [mined[i : i + self.batch_size] for i in range(0, len(mined), self.batch_size)]
            steps = [[t for t in slot if t is not None] for slot in slots]
            shares = [self.cluster.share(tuples) for tuples in steps]
            loader = DataLoader(_StepImages(shares, self.q_images, self.db_images), batch_size=None,
                                num_workers=c.workers, collate_fn=collate_items,
                                pin_memory=self.device.type == "cuda")
            self._train_mode()
            tick = time.perf_counter()
            for slot, tuples, loaded in zip(slots, steps, loader):
                done += len(slot)
                skipped += len(slot) - len(tuples)
                if tuples:
                    loss, count = self._train_step(tuples, loaded)
                    losses.append(loss)
                    images += count
                    self.record.steps.append((self.step, self.epoch + done / len(order), loss))
                with warnings.catch_warnings():  # a first step slot with nothing to train on is fine
                    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
                    self.scheduler.step()
                now = time.perf_counter()
                busy, tick = busy + now - tick, now
                bar.update(len(slot))
                bar.set_postfix(loss=f"{np.mean(losses[-20:]) if losses else float('nan'):.4f}",
                                img_s=f"{images / busy:.1f}" if busy else "-")
        bar.close()
        self.epoch = epoch
        return {
            "epoch": epoch, "steps": self.step, "lr": self.optimizer.param_groups[0]["lr"],
            "loss": float(np.mean(losses)) if losses else float("nan"), "queries": len(order) - skipped,
            "skipped": skipped, "images": images, "images_per_s": images / busy if busy else 0.0, "train_s": busy,
        }

    def fit(self, epochs: int | None = None) -> RunLog:
        """Train up to `config.epochs` (or only `epochs` more); returns the run record."""
        self.out.mkdir(parents=True, exist_ok=True)
        target = self.config.epochs if epochs is None else min(self.config.epochs, self.epoch + epochs)
        with deterministic_algorithms(self.config.deterministic):
            if not self.record.rows:
                self._finish_epoch({"epoch": 0, "steps": 0})
            while self.epoch < target:
                self._finish_epoch(self.train_epoch())
        return self.record

    def _finish_epoch(self, values: dict) -> None:
        recall = self.validate()
        values.update({f"recall@{n}": recall[n] for n in RECALL_NS})
        row = self.record.add_row(**values)
        self.model.config.meta["training"] = {
            "dataset": self.train_set.name or str(self.train_set.root), "loss": self.config.loss,
            "epoch": self.epoch, "recall": {str(n): recall[n] for n in RECALL_NS},
        }
        better = not self.best or recall[1] > self.best["recall@1"]
        if better:
            self.best = {"epoch": self.epoch, "recall@1": recall[1]}
        if not self.cluster.main:
            return
        save_model(self.model, self.out / FINAL_MODEL)
        if better:
            save_model(self.model, self.out / BEST_MODEL)
        save_run_state(self)
        self.record.write(self.out)
        if self.progress:
            tqdm.write(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if v != ""))

    # ------------------------------------------------------------------ resume

    @classmethod
    def resume(
        cls,
        out: str | os.PathLike,
        train_set: PlaceDataset,
        val_set: PlaceDataset | None = None,
        device: str | torch.device | None = "auto",
        progress: bool = True,
        epochs: int | None = None,
        workers: int | None = None,
        cluster: Cluster | None = None,
    ) -> "Trainer":
        """A trainer continuing the run in `out` from its run state; `epochs` may raise the total
        (the LR schedule then stretches to it), `workers`, `device` and the processes may change."""
        payload = read_run_state(out)
        check_dataset(payload, out, train_set)
        config = TrainConfig.from_dict(payload["train_config"])
        if epochs is not None and epochs < payload["epoch"]:
            raise ConfigError(f"epochs {epochs} is below the {payload['epoch']} epochs already trained")
        config = replace(config, epochs=config.epochs if epochs is None else epochs,
                         workers=config.workers if workers is None else workers)
        model = NetVLADModel(ModelConfig.from_dict(payload["model"]["config"]))
        model.load_state_dict(payload["model"]["state_dict"])
        trainer = cls(model, train_set, out, config, val_set, device, progress, cluster)
        restore_run_state(trainer, payload)
        return trainer
