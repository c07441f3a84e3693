"""`TrainConfig`: the settings of a training run.

A run stores its config in its run state; the `netvlad train` options carry the field names
(`--random-negatives` sets `random_negatives`), so a resumed run's options compare with the stored
config field by field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from netvlad.configs import ConfigError, config_from_dict
from netvlad.losses.rsw import RSW_PRESETS

Loss = Literal["triplet", "soft", "soft-pair", "triplet-soft", "rsw"]
Optimizer = Literal["adamw", "sgd"]
Schedule = Literal["cosine", "step", "constant"]
LOSSES: tuple[str, ...] = get_args(Loss)
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
SCHEDULES: tuple[str, ...] = get_args(Schedule)


@dataclass
class TrainConfig:
    """Training settings, checked on construction (`ConfigError`). Distances in metres, margin in
    squared descriptor units, learning rates per step.

    `train_blocks`: parameterised backbone blocks trained, counted from the last (for
    resnet18-layer3: layer3, layer2, layer1, bn1, conv1); NetVLAD (and whitening) always train;
    -1 = the whole backbone; None = 1 on CPU, all on CUDA. `amp`: bfloat16 autocast, None = on for
    CUDA only. `random_negatives`/`max_negatives` shrink automatically on small databases (at most
    Nd random negatives, at most Nd/10 mined ones).
    """

    loss: Loss = "triplet"
    epochs: int = 5
    lr: float = 1e-4
    optimizer: Optimizer = "adamw"
    weight_decay: float = 1e-4
    momentum: float = 0.9
    schedule: Schedule = "cosine"
    lr_step_epochs: int = 5
    batch_size: int = 4
    cache_refresh: int = 1000
    random_negatives: int = 1000
    max_negatives: int = 10
    margin: float = 0.1
    soft_sigma_m: float = 10.0
    soft_temperature: float = 0.1
    soft_positives: int = 4
    rsw_alpha: float = 0.5
    rsw_k1: float = 0.25
    rsw_k2: float = 2.0
    rsw_temperature: float = 16.0
    rsw_margin: float = 1.0  # the authors' "increased delta"; 1: the value inside the radius is the distance
    seed: int = 0
    amp: bool | None = None
    channels_last: bool = True
    train_blocks: int | None = None
    workers: int = 0
    eval_batch_size: int = 16
    deterministic: bool = True

    def __post_init__(self) -> None:
        checks = [
            (self.loss in LOSSES, f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"),
            (self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"),
            (self.epochs >= 1 and self.batch_size >= 1 and self.cache_refresh >= 1, "epochs, batch size and cache refresh must be >= 1"),
            (self.lr > 0 and self.weight_decay >= 0, f"lr must be > 0 (got {self.lr:g}) and weight decay >= 0 (got {self.weight_decay:g})"),
            (self.random_negatives >= 0 and self.max_negatives >= 1, "random negatives must be >= 0, max negatives >= 1"),
            (self.train_blocks is None or self.train_blocks >= -1, "train_blocks must be -1 (all), 0 or more"),
            (self.workers >= 0 and self.eval_batch_size >= 1 and self.lr_step_epochs >= 1, "bad workers/eval batch/step epochs"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        """The config stored in a run state; unknown keys raise `ConfigError`."""
        return config_from_dict(cls, data, "train config")


#: Names `--rsw-preset` takes: the published RSW configurations (`netvlad.losses.rsw.RSW_PRESETS`).
RSW_PRESET_NAMES: tuple[str, ...] = tuple(RSW_PRESETS)


def rsw_preset_fields(name: str) -> dict[str, float]:
    """The TrainConfig fields (`rsw_alpha`, `rsw_k1`, `rsw_k2`, `rsw_temperature`, `rsw_margin`) of
    the RSW preset `name` ("default": the authors' code defaults; "cub", "sop": their published
    image-retrieval configurations). Raises `ConfigError` for an unknown name."""
    if name not in RSW_PRESETS:
        raise ConfigError(f"unknown RSW preset {name!r}: one of {', '.join(RSW_PRESETS)}")
    return {f"rsw_{key}": float(value) for key, value in RSW_PRESETS[name].items()}
