"""The training run's record: one CSV row per epoch (`log.csv`) and loss/recall curves
(`curves.png`, matplotlib's Agg canvas: no display needed). Both are rewritten from the record
kept in the run state, so a resumed run's files never hold rows of an abandoned attempt."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure

from netvlad.storage import atomic_path

COLUMNS = (
    "epoch", "steps", "lr", "loss", "queries", "skipped", "images", "images_per_s", "train_s",
    "recall@1", "recall@5", "recall@10",
)


@dataclass
class RunLog:
    """Epoch rows (dicts keyed by `COLUMNS`; epoch 0 = before training, recall only) and per-step
    losses (step, epoch as a float, loss)."""

    rows: list[dict] = field(default_factory=list)
    steps: list[tuple[int, float, float]] = field(default_factory=list)

    def add_row(self, **values) -> dict:
        unknown = set(values) - set(COLUMNS)
        if unknown:
            raise ValueError(f"unknown log columns: {', '.join(sorted(unknown))}")
        row = {name: values.get(name, "") for name in COLUMNS}
        self.rows.append(row)
        return row

    def state_dict(self) -> dict:
        return {"rows": [dict(r) for r in self.rows], "steps": [list(s) for s in self.steps]}

    def load_state_dict(self, state: dict) -> None:
        self.rows = [dict(r) for r in state["rows"]]
        self.steps = [tuple(s) for s in state["steps"]]

    def write(self, folder: Path) -> tuple[Path, Path]:
        """Write `log.csv` and `curves.png` into `folder` (each atomically); returns their paths."""
        csv_path, png_path = folder / "log.csv", folder / "curves.png"
        with atomic_path(csv_path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, fieldnames=COLUMNS)
            writer.writeheader()
            for row in self.rows:
                writer.writerow({k: _cell(v) for k, v in row.items()})
        self.plot(png_path)
        return csv_path, png_path

    def plot(self, path: Path) -> Path:
        """Training loss (per step and per-epoch mean) and validation Recall@1/5/10 against epochs."""
        figure = Figure(figsize=(10, 4), dpi=100, layout="constrained")
        loss_axes, recall_axes = figure.subplots(1, 2)
        if self.steps:
            loss_axes.plot([s[1] for s in self.steps], [s[2] for s in self.steps], lw=0.8, alpha=0.4, label="step")
        trained = [r for r in self.rows if r["loss"] != ""]
        if trained:
            loss_axes.plot([r["epoch"] for r in trained], [r["loss"] for r in trained], "o-", label="epoch mean")
        loss_axes.set(xlabel="epoch", ylabel="training loss", title="loss")
        loss_axes.grid(True, alpha=0.3)
        if loss_axes.get_legend_handles_labels()[0]:
            loss_axes.legend(loc="upper right")
        for n in (1, 5, 10):
            points = [(r["epoch"], 100 * r[f"recall@{n}"]) for r in self.rows if r[f"recall@{n}"] != ""]
            if points:
                recall_axes.plot(*zip(*points), "o-", label=f"Recall@{n}")
        recall_axes.set(xlabel="epoch", ylabel="Recall@N (%)", ylim=(0, 100), title="validation")
        recall_axes.grid(True, alpha=0.3)
        if recall_axes.get_legend_handles_labels()[0]:
            recall_axes.legend(loc="lower right")
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format=path.suffix.lstrip(".") or "png")
        return path


def _cell(value):
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.6g}"
    return value
