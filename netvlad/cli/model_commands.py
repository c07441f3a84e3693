"""Model commands: `init` (k-means + α from photos), `describe`, `import-checkpoint`."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from netvlad.backbones import BACKBONES
from netvlad.checkpoints import import_checkpoint
from netvlad.cli.app import app
from netvlad.imageio import find_photos
from netvlad.initialization import init_model
from netvlad.model import build_model
from netvlad.modelfile import load_model, save_model
from netvlad.transforms import INPUT_MODES

log = logging.getLogger(__name__)


def _choice(value: str, allowed, option: str) -> str:
    if value not in allowed:
        raise typer.BadParameter(f"{value!r} is not one of: {', '.join(allowed)}", param_hint=option)
    return value


@app.command("init")
def init_command(
    images: list[Path] = typer.Argument(..., help="Photos or folders of photos to sample local features from."),
    out: Path = typer.Option(..., "--out", "-o", help="Model file to write."),
    backbone: str = typer.Option("resnet18-layer3", help=f"One of: {', '.join(BACKBONES)}."),
    clusters: int = typer.Option(64, min=1, help="K, NetVLAD clusters."),
    ghost_clusters: int = typer.Option(0, min=0, help="GhostVLAD clusters (dropped from the output)."),
    whitening_dim: Optional[int] = typer.Option(None, min=1, help="Learn PCA-whitening to this many dims."),
    input_mode: str = typer.Option("rgb", help="rgb (ImageNet normalisation) or grey (per-image standardised)."),
    max_side: int = typer.Option(640, min=32, help="Resize so the longer side has this many pixels."),
    pretrained: bool = typer.Option(True, help="Start from ImageNet weights when they can be loaded."),
    weights: Optional[Path] = typer.Option(None, help="Backbone state dict file (torchvision layout)."),
    per_image: int = typer.Option(200, min=1, help="Local features sampled per photo for k-means."),
    seed: int = typer.Option(0, help="Seed for sampling and k-means."),
) -> None:
    """Build a model and initialise its NetVLAD layer by k-means on local features of real photos."""
    _choice(backbone, BACKBONES, "--backbone")
    _choice(input_mode, INPUT_MODES, "--input-mode")
    photos = find_photos(images)
    if len(photos) < 1:
        raise typer.BadParameter("no photos found", param_hint="IMAGES")
    model = build_model(backbone, clusters, ghost_clusters=ghost_clusters, input_mode=input_mode,
                        max_side=max_side, pretrained=pretrained, weights_file=weights)
    summary = init_model(model, photos, per_image=per_image, whitening_dim=whitening_dim, seed=seed, progress=True)
    save_model(model, out)
    typer.echo(
        f"wrote {out}: {backbone}, K={clusters}, dim={model.dim}, α={summary['alpha']:.1f} "
        f"from {summary['features']} features of {len(photos)} photos"
    )


@app.command("describe")
def describe_command(
    images: list[Path] = typer.Argument(..., help="Photos (or folders) to describe."),
    model_path: str = typer.Option("default", "--model", "-m", help="Model file, or 'default'."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object with every descriptor."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Also save the (N, dim) float32 array (.npy)."),
    batch_size: int = typer.Option(16, min=1),
) -> None:
    """Compute the global descriptor of each photo."""
    model = load_model(model_path)
    photos = find_photos(images)
    descriptors = model.describe(photos, batch_size=batch_size, progress=len(photos) > 1 and not as_json)
    if out is not None:
        np.save(out, descriptors)
    if as_json:
        typer.echo(json.dumps({
            "model": model_path, "dim": model.dim,
            "descriptors": [{"image": str(p), "descriptor": d.round(6).tolist()} for p, d in zip(photos, descriptors)],
        }))
        return
    for path, descriptor in zip(photos, descriptors):
        head = " ".join(f"{v:+.4f}" for v in descriptor[:4])
        typer.echo(f"{path}\tdim={descriptor.size}\tnorm={np.linalg.norm(descriptor):.4f}\t[{head} …]")


@app.command("import-checkpoint")
def import_checkpoint_command(
    checkpoint: Path = typer.Argument(..., help="pytorch-NetVlad checkpoint.pth.tar or MATLAB NetVLAD .mat file."),
    out: Path = typer.Option(..., "--out", "-o", help="Model file to write."),
    trust: bool = typer.Option(
        False, help="Fully unpickle a torch checkpoint that stores Python objects (only for files you trust)."
    ),
) -> None:
    """Convert a published NetVLAD checkpoint into a netvlad model file."""
    model = import_checkpoint(checkpoint, trust=trust)
    save_model(model, out, extra={"imported_from": checkpoint.name})
    typer.echo(f"wrote {out}: {model.config.backbone}, K={model.config.clusters}, dim={model.dim}")
