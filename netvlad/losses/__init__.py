"""Training objectives: NetVLAD triplet ranking, soft-label cross entropy, RSW proxy loss."""

from netvlad.losses.distances import squared_distances
from netvlad.losses.reduction import Reduction, reduce_loss
from netvlad.losses.rsw import RSW_PRESETS, RealignedSoftmaxWarpingLoss
from netvlad.losses.soft_label import SoftLabelCrossEntropy, geo_soft_labels, soft_cross_entropy
from netvlad.losses.triplet import TripletRankingLoss, select_violating_negatives

__all__ = [
    "RSW_PRESETS",
    "RealignedSoftmaxWarpingLoss",
    "Reduction",
    "SoftLabelCrossEntropy",
    "TripletRankingLoss",
    "geo_soft_labels",
    "reduce_loss",
    "select_violating_negatives",
    "soft_cross_entropy",
    "squared_distances",
]
