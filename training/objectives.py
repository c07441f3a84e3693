"""The training objectives on mined tuples (docs/design.md §4).

Each objective turns a batch of `MinedTuple`s and the fresh descriptors of their images (query
(B, D); per tuple its positives then negatives, (P_b + M_b, D)) into a scalar loss:

- `triplet`: `TripletRankingLoss` with the best positive and the margin-violating negatives;
- `soft`: listwise `SoftLabelCrossEntropy` over the query's positives and nearest negatives, soft
  labels `exp(−(dist_m/σ)²)` from the geographic distance between query and candidate;
- `soft-pair`: the binary (pair) form of `SoftLabelCrossEntropy` on every (query, candidate) pair,
  same candidates and soft labels, its match curve `c = σ(a − b·d²)` learned;
- `triplet-soft`: the triplet loss (best of the query's positives) plus the listwise soft loss;
- `rsw`: `RealignedSoftmaxWarpingLoss` with one proxy per place id, over every image of the batch.

Each loss is a mean of independent terms (one per query, or per image for RSW: `terms(tuples)`),
so `StepLoss` can weight a rank's share of a step's tuples to give, after DDP averages the
gradients over ranks, exactly the gradient of the whole step's loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from netvlad.batching import describe_tensors
from netvlad.datasets.placeset import PlaceDataset
from netvlad.errors import DatasetError
from netvlad.losses import RealignedSoftmaxWarpingLoss, SoftLabelCrossEntropy, TripletRankingLoss, geo_soft_labels
from training.config import TrainConfig
from training.mining import MinedTuple


def images_of(tuples: Sequence[MinedTuple]) -> int:
    """Images a step forwards for `tuples`: each query, its positives and its negatives."""
    return sum(1 + len(t.positives) + len(t.negatives) for t in tuples)


def _padded(candidates: Sequence[Tensor], start: int, stop: int | None) -> tuple[Tensor, Tensor]:
    """Rows [start:stop] of each (C_b, D) tensor stacked into (B, C, D) with a (B, C) validity mask."""
    rows = [c[start:stop] for c in candidates]
    width = max(1, max(len(r) for r in rows))
    out = rows[0].new_zeros(len(rows), width, rows[0].shape[1])
    mask = torch.zeros(len(rows), width, dtype=torch.bool, device=out.device)
    for b, r in enumerate(rows):
        out[b, : len(r)] = r
        mask[b, : len(r)] = True
    return out, mask


class TripletObjective(nn.Module):
    """NetVLAD's triplet ranking loss: best positive vs margin-violating negatives."""

    max_positives, violating_only = 1, True
    terms = staticmethod(len)  # the loss averages one term per query

    def __init__(self, margin: float, max_negatives: int):
        super().__init__()
        self.loss = TripletRankingLoss(margin=margin, max_negatives=max_negatives)

    def forward(self, query: Tensor, candidates: Sequence[Tensor], tuples: Sequence[MinedTuple]) -> Tensor:
        positives, pos_mask = _padded(candidates, 0, 1)
        negatives, neg_mask = _padded(candidates, 1, None)
        return self.loss(query, positives, negatives, pos_mask, neg_mask)


class SoftObjective(nn.Module):
    """Soft-label cross entropy over a query's candidates (its positives, then nearest negatives),
    labels `exp(−(dist_m/σ)²)` from geographic distance: listwise (`form="listwise"`, one term per
    query) or per pair (`form="pair"`, one term per pair, learned a and b at 100× the rate)."""

    violating_only = False
    terms = staticmethod(len)  # one term per query (listwise)

    def __init__(self, dataset: PlaceDataset, sigma_m: float, temperature: float, max_positives: int,
                 form: str = "listwise"):
        super().__init__()
        self.max_positives = max_positives
        self.sigma_m = sigma_m
        self.register_buffer("db_utm", torch.as_tensor(dataset.db_utm), persistent=False)
        self.register_buffer("q_utm", torch.as_tensor(dataset.q_utm), persistent=False)
        self.loss = SoftLabelCrossEntropy(form=form, temperature=temperature)
        if form == "pair":
            self.terms = lambda tuples: sum(len(t.positives) + len(t.negatives) for t in tuples)

    def forward(self, query: Tensor, candidates: Sequence[Tensor], tuples: Sequence[MinedTuple]) -> Tensor:
        cands, mask = _padded(candidates, 0, None)
        labels = torch.zeros(mask.shape, dtype=torch.float64, device=self.db_utm.device)
        for b, t in enumerate(tuples):
            ids = torch.as_tensor(np.concatenate([t.positives, t.negatives]), device=self.db_utm.device)
            dist_m = (self.db_utm[ids] - self.q_utm[t.query]).norm(dim=1)
            labels[b, : len(ids)] = geo_soft_labels(dist_m, self.sigma_m)
        return self.loss(query, cands, labels.to(query), mask)

    def param_groups(self, parameters, lr: float) -> list[dict]:
        """The model's parameters at `lr`; the pair form's a and b at 100× (they start at 1)."""
        own = list(self.loss.parameters())
        return [{"params": list(parameters)}, *([{"params": own, "lr": 100 * lr, "weight_decay": 0.0}] if own else [])]


class TripletSoftObjective(nn.Module):
    """Triplet ranking loss (best of the query's positives, violating negatives) plus the listwise
    soft-label loss on the same candidates; one term per query each."""

    violating_only = False
    terms = staticmethod(len)

    def __init__(self, dataset: PlaceDataset, margin: float, max_negatives: int, sigma_m: float, temperature: float,
                 max_positives: int):
        super().__init__()
        self.max_positives = max_positives
        self.triplet = TripletRankingLoss(margin=margin, max_negatives=max_negatives)
        self.soft = SoftObjective(dataset, sigma_m, temperature, max_positives)

    def forward(self, query: Tensor, candidates: Sequence[Tensor], tuples: Sequence[MinedTuple]) -> Tensor:
        splits = [(c[: len(t.positives)], c[len(t.positives) :]) for c, t in zip(candidates, tuples)]
        positives, pos_mask = _padded([p for p, _ in splits], 0, None)
        negatives, neg_mask = _padded([n for _, n in splits], 0, None)
        return self.triplet(query, positives, negatives, pos_mask, neg_mask) + self.soft(query, candidates, tuples)


class RSWObjective(nn.Module):
    """Realigned Softmax Warping proxy loss: every image of the batch against one proxy per place.

    Descriptors are unit norm, so the warp radius `alpha` is in those units (the authors' α = 8 is
    for unnormalised embeddings and would never be reached here).
    """

    max_positives, violating_only = 1, False
    terms = staticmethod(images_of)  # one term per image (query, positives, negatives)

    def __init__(self, dataset: PlaceDataset, dim: int, alpha: float, k1: float, k2: float, temperature: float,
                 margin: float = 1.0):
        super().__init__()
        if dataset.db_place_ids is None or dataset.q_place_ids is None:
            raise DatasetError(
                f"{dataset.root}: the rsw loss needs place ids, but the dataset has no 'place_id' column "
                "(add one to database.csv and queries.csv, or use --loss triplet or soft)"
            )
        places, labels = np.unique(np.concatenate([dataset.db_place_ids, dataset.q_place_ids]), return_inverse=True)
        self.register_buffer("db_labels", torch.as_tensor(labels[: len(dataset.db_place_ids)]), persistent=False)
        self.register_buffer("q_labels", torch.as_tensor(labels[len(dataset.db_place_ids) :]), persistent=False)
        self.loss = RealignedSoftmaxWarpingLoss(len(places), dim, alpha=alpha, k1=k1, k2=k2, temperature=temperature,
                                                margin=margin)

    def forward(self, query: Tensor, candidates: Sequence[Tensor], tuples: Sequence[MinedTuple]) -> Tensor:
        device = self.db_labels.device
        labels = [self.q_labels[torch.as_tensor([t.query for t in tuples], device=device)]]
        for t in tuples:
            labels.append(self.db_labels[torch.as_tensor(np.concatenate([t.positives, t.negatives]), device=device)])
        return self.loss(torch.cat([query, *candidates]), torch.cat(labels))

    def param_groups(self, parameters, lr: float) -> list[dict]:
        """The model's parameters at `lr`, the proxies at a larger rate."""
        return self.loss.param_groups(parameters, lr)


def build_objective(config: TrainConfig, train_set: PlaceDataset, dim: int, max_negatives: int) -> nn.Module:
    """The objective `config.loss` names, with its settings; `dim` is the descriptor size (RSW
    proxies), `max_negatives` the mining size after scaling to the database."""
    c = config
    if c.loss == "triplet":
        return TripletObjective(c.margin, max_negatives)
    if c.loss in ("soft", "soft-pair"):
        form = "pair" if c.loss == "soft-pair" else "listwise"
        return SoftObjective(train_set, c.soft_sigma_m, c.soft_temperature, c.soft_positives, form)
    if c.loss == "triplet-soft":
        return TripletSoftObjective(train_set, c.margin, max_negatives, c.soft_sigma_m, c.soft_temperature, c.soft_positives)
    return RSWObjective(train_set, dim, c.rsw_alpha, c.rsw_k1, c.rsw_k2, c.rsw_temperature, c.rsw_margin)


class StepLoss(nn.Module):
    """A training step's loss as one module (model + objective), the unit DDP wraps: images
    (queries, then per tuple its positives and negatives) → descriptors → weighted objective."""

    def __init__(self, model: nn.Module, objective: nn.Module, amp: bool, channels_last: bool):
        super().__init__()
        self.model, self.objective = model, objective
        self.amp, self.channels_last = amp, channels_last

    def forward(self, tensors: Sequence[Tensor], tuples: Sequence[MinedTuple], weight: float) -> Tensor:
        """`weight` × the objective on `tuples`, whose (3, H, W) images are `tensors`. No tuples
        (a rank without a share of this step): a zero loss that still reaches every trainable
        parameter, so the rank takes part in DDP's gradient averaging."""
        if not tuples:
            return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
        desc = describe_tensors(self.model, tensors, self.amp, self.channels_last)
        sizes = [len(t.positives) + len(t.negatives) for t in tuples]
        query, rest = desc[: len(tuples)], desc[len(tuples) :]
        return self.objective(query, list(torch.split(rest, sizes)), tuples) * weight
