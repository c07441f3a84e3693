"""Data command: `make-placeset` (a place dataset built from photos)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from netvlad.cli.app import app
from netvlad.datasets.make_placeset import PlacesetConfig, make_placeset
from netvlad.errors import DatasetError
from netvlad.imageio import find_photos

_DEFAULTS = PlacesetConfig()


def _parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise typer.BadParameter(f"expected WIDTHxHEIGHT, e.g. 320x240, got '{text}'") from None
    if width < 1 or height < 1:
        raise typer.BadParameter(f"size must be positive, got '{text}'")
    return width, height


@app.command("make-placeset")
def make_placeset_command(
    photos: Annotated[list[Path], typer.Argument(help="Source photos, or folders of photos.")],
    out: Annotated[Path, typer.Option("--out", file_okay=False, help="Output folder (must be new or empty, see --overwrite).")],
    crop_size: Annotated[int, typer.Option(min=1, help="Crop width in source pixels.")] = _DEFAULTS.crop_size,
    stride: Annotated[int, typer.Option(min=1, help="Grid step between database crops, source pixels.")] = _DEFAULTS.stride,
    queries_per_photo: Annotated[int, typer.Option(min=0, help="Queries rendered per source photo.")] = _DEFAULTS.queries_per_photo,
    seed: Annotated[int, typer.Option(help="Random seed; same seed and photos give the same dataset.")] = _DEFAULTS.seed,
    out_size: Annotated[str, typer.Option(help="Written image size WIDTHxHEIGHT.")] = "x".join(map(str, _DEFAULTS.out_size)),
    metres_per_pixel: Annotated[
        Optional[float], typer.Option(help="Metres per source pixel (default: half a crop width = 25 m).")
    ] = None,
    min_detail: Annotated[
        float, typer.Option(min=0.0, help="Drop database crops flatter than this mean gradient (grey levels/px); 0 keeps all.")
    ] = _DEFAULTS.min_detail,
    holdout: Annotated[
        float,
        typer.Option(min=0.0, max=0.99, help="Fraction of whole source photos held out of training (OUT/train gets the "
                                             "rest): split into OUT/val and OUT/test by --test-fraction. 0: one dataset in OUT."),
    ] = 0.0,
    test_fraction: Annotated[
        float,
        typer.Option(min=0.0, max=0.99, help="Fraction of the held-out photos written to OUT/test (figures), the rest to "
                                             "OUT/val (choosing epochs); no photo in both. 0: only OUT/val, as before."),
    ] = _DEFAULTS.test_fraction,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing make-placeset output folder.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Build a place dataset (database crops on a grid, re-photographed queries, metric positions)
    from ordinary photographs; each photo is one street far from the others. With --holdout, whole
    photos are held out: OUT/train for training, OUT/val for choosing epochs, OUT/test for the
    figures (e.g. --holdout 0.3: 70 % train, 15 % val, 15 % test)."""
    config = PlacesetConfig(
        crop_size=crop_size,
        stride=stride,
        queries_per_photo=queries_per_photo,
        seed=seed,
        out_size=_parse_size(out_size),
        metres_per_pixel=metres_per_pixel,
        min_detail=min_detail,
        holdout=holdout,
        test_fraction=test_fraction,
    )
    sources = find_photos(photos)
    if not sources:
        raise DatasetError("no photos found in " + ", ".join(map(str, photos)))
    summary = make_placeset(sources, out, config, overwrite=overwrite, progress=progress)
    for record in summary.skipped:
        typer.echo(f"warning: skipped {record.source}: {record.skipped}", err=True)
    if as_json:
        typer.echo(json.dumps(summary.to_json()))
        return
    for split, root in summary.datasets.items():
        used = [p for p in summary.photos if p.split == split and not p.skipped]
        typer.echo(
            f"{split}: {root} — {len(used)} photos, {sum(p.database for p in used)} database images, "
            f"{sum(p.queries for p in used)} queries"
        )
