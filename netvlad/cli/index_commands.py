"""Operator commands: `index` (offline, resumable indexing of a photo folder) and `search`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from netvlad.cli.app import app
from netvlad.records import display_path
from netvlad.devices import resolve_device, slow_bf16_warning
from netvlad.errors import ImageError
from netvlad.imageio import DEFAULT_MAX_PIXELS, load_image
from netvlad.index import Index
from netvlad.indexing import index_folder
from netvlad.rerank.indexevidence import MAX_KEYPOINTS
from netvlad.rerank.localfeatures import LOCAL_KINDS
from netvlad.rerank.shortlist import DEFAULT_RERANK_K, RERANK_METHODS
from netvlad.search import FUSIONS, SearchResult

THUMBNAIL_COLUMNS = 5
Fusion = Literal[FUSIONS]
LocalKind = Literal[LOCAL_KINDS]
RerankMethod = Literal[RERANK_METHODS]


@app.command("index")
def index_command(
    photos: Annotated[Path, typer.Argument(help="Folder of photos (jpg, png, webp, tiff, bmp), walked recursively.")],
    index_dir: Annotated[Path, typer.Option("--index", help="Index folder; created when it does not exist.")],
    model: Annotated[Optional[str], typer.Option(
        help="Model file or built-in name. Default: the index's own model, or 'default' for a new index.")] = None,
    index_type: Annotated[Optional[str], typer.Option(
        help="faiss factory string (Flat, HNSW32, 'PCAR256,IVF1024,PQ64x4fs', …) or 'auto' (by collection size).")] = None,
    prune: Annotated[bool, typer.Option(help="Forget photos that were deleted from the folder.")] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Photos per network batch.")] = 16,
    workers: Annotated[Optional[int], typer.Option(min=0, help="Decoding processes (default: spare cores).")] = None,
    max_pixels: Annotated[int, typer.Option(min=1, help="Skip photos with more pixels (decompression bombs).")] = DEFAULT_MAX_PIXELS,
    amp: Annotated[Optional[bool], typer.Option("--amp/--no-amp", help="bfloat16 autocast (default: on CUDA only).")] = None,
    device: Annotated[Optional[str], typer.Option(help="torch device (default: cuda when available).")] = None,
    save_every: Annotated[float, typer.Option("--save-every", "--checkpoint-every",
                                              min=1.0, help="Seconds between saves of the faiss index.")] = 600.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    ray: Annotated[Optional[str], typer.Option(
        metavar="auto|local|ADDRESS",
        help="Describe on a Ray cluster: auto (the one `ray start` runs here), local, or HOST:PORT. "
             "Photos and index folder on a filesystem all nodes see (docs/ray-cluster.md).")] = None,
    ray_concurrency: Annotated[Optional[int], typer.Option(
        min=1, help="Describe actors on Ray (default: one per GPU, or one per CPU without GPUs).")] = None,
    ray_batch_size: Annotated[int, typer.Option(min=1, help="Photos per Ray batch.")] = 16,
    ray_read_from: Annotated[Optional[str], typer.Option(
        help="Base URI Ray workers read the photos from (s3://bucket/photos/…), PHOTOS' layout.")] = None,
    local_features: Annotated[Optional[LocalKind], typer.Option(
        help="Also keep local features of every photo for `--rerank geometric` (RootSIFT or ORB; about 65 KB "
             "or 33 KB a photo at 1000 keypoints). Photos indexed before get them on this run.")] = None,
    max_keypoints: Annotated[int, typer.Option(min=10, help="Local features kept per photo (strongest first).")] = MAX_KEYPOINTS,
    dba: Annotated[Optional[bool], typer.Option("--dba/--no-dba", help=(
        "Database-side augmentation: --dba computes it after this run (each descriptor blended with its 5 nearest; "
        "searches then score their shortlist with it), --no-dba removes it. Default: kept up to date when the index has it.")
    )] = None,
    patch_features: Annotated[bool, typer.Option(
        "--patch-features", help="Also keep patch descriptors of every photo for `--rerank patch` (a second "
                                 "pass of the network at 640 px; about 43 KB a photo).")] = False,
) -> None:
    """Index a photo folder: catalogue, describe and add new photos (kill and re-run to resume)."""
    if not photos.is_dir():
        raise typer.BadParameter(f"{photos}: no such folder", param_hint="PHOTOS")
    ray_options = None
    if ray is not None:
        from netvlad.indexing_ray import RayOptions

        ray_options = RayOptions(ray, ray_concurrency, ray_batch_size, ray_read_from).checked()
    if (slow := slow_bf16_warning(resolve_device(device), amp)) is not None:
        typer.echo(f"warning: {slow}", err=True)
    with Index.open_or_create(index_dir, model, index_type, device=device, amp=amp, local_features=local_features,
                              max_keypoints=max_keypoints, patch_features=patch_features) as index:
        index.max_pixels = max_pixels
        report = index_folder(index, photos, prune=prune, batch_size=batch_size, workers=workers,
                              progress=not quiet, save_every=save_every, ray=ray_options)
        if dba is True or (dba is None and index.dba is not None and index.dba.is_stale(index.catalog.revision)):
            index.augment_database()
        elif dba is False:
            index.drop_augmentation()
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=1))
        return
    typer.echo(
        f"{index_dir}: {report.images} photos indexed ({report.index_type}); this run: {report.files} files, "
        f"{report.new} new, {report.changed} changed, {report.unchanged} unchanged, {report.pruned} pruned; "
        f"described {report.described} in {report.seconds:.1f} s ({report.images_per_s:.1f} img/s)"
        + (f"; evidence added for {report.evidence_added} indexed before" if report.evidence_added else "")
    )
    if report.failures:
        typer.echo(f"{len(report.failures)} files skipped:")
        for path, reason in report.failures:
            typer.echo(f"  {path}: {reason}")


def _thumbnails(result: SearchResult, queries: list[Path], out: Path) -> None:
    """Write a contact sheet: the query photos on the first row, then the hits with their scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    query_rows = -(-len(queries) // THUMBNAIL_COLUMNS)
    rows = query_rows + -(-len(result.hits) // THUMBNAIL_COLUMNS)
    tiles = [(f"query {i + 1}", str(q)) for i, q in enumerate(queries)]
    tiles += [("", None)] * (query_rows * THUMBNAIL_COLUMNS - len(queries))
    tiles += [(f"#{rank}  id {hit.id}  {hit.score:.3f}", hit.path) for rank, hit in enumerate(result.hits, start=1)]
    fig, axes = plt.subplots(rows, THUMBNAIL_COLUMNS, figsize=(3 * THUMBNAIL_COLUMNS, 2.6 * rows), squeeze=False)
    cells = list(axes.flat)
    for ax in cells:
        ax.axis("off")
    for ax, (title, path) in zip(cells, tiles):
        if path is None:
            continue
        try:
            image = load_image(path)
            image.thumbnail((320, 320))
            ax.imshow(image)
        except ImageError:
            ax.text(0.5, 0.5, "unreadable", ha="center", va="center")
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


@app.command("search")
def search_command(
    images: Annotated[list[Path], typer.Argument(help="Query photo(s), all of the same place.")],
    index_dir: Annotated[Path, typer.Option("--index", help="Index folder built by `netvlad index`.")],
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Number of results.")] = 10,
    fusion: Annotated[Fusion, typer.Option(help="How several query photos are combined.")] = "softmedian",
    rerank: Annotated[RerankMethod, typer.Option(help=(
        "Re-rank the top of the list: geometric (local features + RANSAC; index built with --local-features), "
        "patch (patch descriptors; --patch-features), aqe (query expansion) or none."))] = "none",
    rerank_k: Annotated[int, typer.Option(min=1, help="How many of the top results are re-ranked.")] = DEFAULT_RERANK_K,
    model: Annotated[Optional[str], typer.Option(help="Model file (default: the index's own; must match it).")] = None,
    device: Annotated[Optional[str], typer.Option(help="torch device (default: cuda when available).")] = None,
    thumbnails: Annotated[Optional[Path], typer.Option(help="Also write a contact sheet of queries and results (PNG).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Find the indexed photos of the place shown in one or several query photos."""
    with Index.open(index_dir, model, writable=False, device=device) as index:
        result = index.search([str(p) for p in images], k=top_k, fusion=fusion, rerank=rerank, rerank_k=rerank_k)
    if thumbnails is not None:
        _thumbnails(result, images, thumbnails)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=1))
        return
    for rank, hit in enumerate(result.hits, start=1):
        evidence = "" if hit.rerank is None else f"  {hit.rerank.method} {hit.rerank.score:g}" + (
            " ✓" if hit.rerank.verified and hit.rerank.method == "geometric" else "")
        typer.echo(f"{rank:3d}  {hit.score:6.3f}  id {hit.id:<8d} {display_path(hit.path or '-')}{evidence}")
    if result.rerank != "none":
        typer.echo(f"re-ranked the top {max(top_k, rerank_k)} by {result.rerank} in {result.rerank_ms:.0f} ms")
    if result.location is not None:
        loc = result.location
        typer.echo(f"location: {loc.lat:.6f}, {loc.lon:.6f} (from {loc.support} results, spread {loc.spread_m:.0f} m)")
    if thumbnails is not None:
        typer.echo(f"wrote {thumbnails}")
