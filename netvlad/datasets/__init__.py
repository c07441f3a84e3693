"""Place datasets: loading (CSV folders, Pittsburgh/Tokyo .mat), geographic ground truth and
building datasets from photos."""

from netvlad.datasets.groundtruth import (
    positives,
    potential_positives,
    queries_without_positives,
    sample_negatives,
)
from netvlad.datasets.make_placeset import PlacesetConfig, PlacesetSummary, make_placeset
from netvlad.datasets.placeset import PlaceDataset, load_place_dataset, save_place_dataset

__all__ = [
    "PlaceDataset", "PlacesetConfig", "PlacesetSummary",
    "load_place_dataset", "make_placeset", "positives", "potential_positives",
    "queries_without_positives", "sample_negatives", "save_place_dataset",
]
