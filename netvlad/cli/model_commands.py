"""Model commands: `init` (k-means + α from photos), `describe`, `import-checkpoint`, `export`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal, Optional

import numpy as np
import typer

from netvlad.backbones import BACKBONES
from netvlad.cli.app import app
from netvlad.export import FORMATS, export_model
from netvlad.imageio import find_photos
from netvlad.initialization import init_model
from netvlad.model import build_model
from netvlad.modelfile import load_model, save_model
from netvlad.published import import_checkpoint
from netvlad.transforms import InputMode

#: The `--backbone` choices: the names in `BACKBONES`.
Backbone = Literal[tuple(BACKBONES)]
ExportFormat = Literal[FORMATS]


@app.command("init")
def init_command(
    images: Annotated[list[Path], typer.Argument(help="Photos or folders of photos to sample local features from.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Model file to write.")],
    backbone: Annotated[Backbone, typer.Option(help="Torchvision network and the layer it is cut at.")] = "resnet18-layer3",
    clusters: Annotated[int, typer.Option(min=1, help="K, NetVLAD clusters.")] = 64,
    ghost_clusters: Annotated[int, typer.Option(min=0, help="GhostVLAD clusters (dropped from the output).")] = 0,
    whitening_dim: Annotated[Optional[int], typer.Option(min=1, help="Learn PCA-whitening to this many dims.")] = None,
    input_mode: Annotated[InputMode, typer.Option(help="rgb (ImageNet normalisation) or grey (per-image standardised).")] = "rgb",
    max_side: Annotated[int, typer.Option(min=32, help="Resize so the longer side has this many pixels.")] = 640,
    pretrained: Annotated[bool, typer.Option(help="Start from ImageNet weights when they can be loaded.")] = True,
    weights: Annotated[Optional[Path], typer.Option(help="Backbone state dict file (torchvision layout).")] = None,
    per_image: Annotated[int, typer.Option(min=1, help="Local features sampled per photo for k-means.")] = 200,
    seed: Annotated[int, typer.Option(help="Seed for sampling and k-means.")] = 0,
) -> None:
    """Build a model and initialise its NetVLAD layer by k-means on local features of real photos."""
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
    images: Annotated[list[Path], typer.Argument(help="Photos (or folders) to describe.")],
    model_path: Annotated[str, typer.Option("--model", "-m", help="Model file, or 'default'.")] = "default",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object with every descriptor.")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Also save the (N, dim) float32 array (.npy).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Photos per network batch.")] = 16,
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
    checkpoint: Annotated[Path, typer.Argument(help="pytorch-NetVlad checkpoint.pth.tar or MATLAB NetVLAD .mat file.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Model file to write.")],
    trust: Annotated[bool, typer.Option(
        help="Fully unpickle a torch checkpoint that stores Python objects (only for files you trust).")] = False,
) -> None:
    """Convert a published NetVLAD checkpoint into a netvlad model file."""
    model = import_checkpoint(checkpoint, trust=trust)
    save_model(model, out, extra={"imported_from": checkpoint.name})
    typer.echo(f"wrote {out}: {model.config.backbone}, K={model.config.clusters}, dim={model.dim}")


@app.command("export")
def export_command(
    model_path: Annotated[str, typer.Argument(metavar="MODEL", help="Model file, or 'default'.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="File to write (.onnx, .pt).")],
    format: Annotated[ExportFormat, typer.Option("--format", "-f", help="onnx (checked with onnxruntime) or torchscript.")] = "onnx",
) -> None:
    """Export a model for other runtimes: normalised images (N, 3, H, W) → descriptors (N, dim), batch
    and image size dynamic; checked against the model before it is kept (see netvlad.export)."""
    report = export_model(load_model(model_path, device="cpu"), out, format)
    typer.echo(f"wrote {report.path} ({report.format}, {report.bytes / 1e6:.1f} MB); descriptors match the "
               f"model's (min cosine {report.min_cosine:.6f})")
