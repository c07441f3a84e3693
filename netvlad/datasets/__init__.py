"""Place datasets: loading (CSV folders, Pittsburgh/Tokyo .mat), geographic ground truth,
building datasets from photos, and the project's collection of real photos."""

from netvlad.datasets.groundtruth import (
    positives,
    potential_positives,
    queries_without_positives,
    sample_negatives,
)
from netvlad.datasets.make_placeset import PlacesetConfig, PlacesetSummary, make_placeset
from netvlad.datasets.photos import collect_photos
from netvlad.datasets.placeset import PlaceDataset, load_place_dataset, save_place_dataset

__all__ = [
    "PlaceDataset", "PlacesetConfig", "PlacesetSummary",
    "collect_photos", "load_place_dataset", "make_placeset", "positives", "potential_positives",
    "queries_without_positives", "sample_negatives", "save_place_dataset",
]
