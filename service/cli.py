"""`netvlad serve` and `netvlad demo`, registered on the `netvlad` CLI through the
`netvlad.commands` entry-point group (`serve = "service.cli:register"`)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
import uvicorn
from pydantic import ValidationError

import netvlad
from netvlad.datasets.placeset import PlaceDataset
from netvlad.errors import ModelFileError, NetVLADError
from netvlad.imageio import find_photos
from netvlad.index import Index
from netvlad.indexfolder import MANIFEST, read_manifest
from netvlad.model import NetVLADModel
from service.app import create_app
from service.demo import demo_placeset, fill_demo_index, lat_lon
from service.settings import Settings

DEMO_DIR = Path("demo")
PHOTOS_DIR = Path("data/photos")


def load_settings(**given) -> Settings:
    """Settings from `given`, NETVLAD_* variables and .env; one clear line when one is invalid."""
    try:
        return Settings(**given)
    except ValidationError as exc:
        problems = "; ".join(f"NETVLAD_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors())
        raise NetVLADError(f"invalid setting: {problems}") from None


def _run(settings: Settings, host: str, port: int) -> None:
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info")


def _banner(host: str, port: int, query: tuple[Path, float, float] | None = None) -> str:
    """Where to point a browser; with a demo query (photo, lat, lon), a curl line to try."""
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    lines = [f"netvlad: web page {url}/   API documentation {url}/docs"]
    if query is not None:
        photo, lat, lon = query
        lines += [f"  try a query photo (taken at {lat:.5f}, {lon:.5f}; more in {photo.parent.parent}/):",
                  f"  curl -F images=@{photo} -F top_k=5 {url}/v1/search"]
    return "\n".join(lines)


def demo_model(photos: list[Path]) -> NetVLADModel:
    """The shipped model; else ImageNet weights with NetVLAD initialised on `photos`; else a clear error."""
    try:
        return netvlad.load_model("default")
    except ModelFileError as missing:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = netvlad.build_model("resnet18-layer3", 64, input_mode="rgb", pretrained=True)
        if not model.config.meta.get("pretrained"):
            raise NetVLADError(
                f"no model for the demo: {missing}; and the ImageNet weights are not in the torch hub cache "
                "(~/.cache/torch/hub/checkpoints) — put them there or pass --model FILE"
            ) from None
        typer.echo("the shipped model is missing: using ImageNet weights, NetVLAD initialised on the demo photos")
        netvlad.init_model(model, photos, progress=True)
        return model


def collect_photos(folder: Path) -> list[Path]:
    """The demo's photos: those already fetched into `folder` (`make photos`), sorted; a clear
    error naming `make photos` when there are none."""
    photos = sorted(find_photos([folder])) if folder.is_dir() else []
    if not photos:
        raise NetVLADError(f"no photos in {folder}: run `make photos` first (it fetches the approved photos there)")
    return photos


def build_demo(directory: Path, photos_dir: Path, model: Optional[str]) -> tuple[Path, PlaceDataset]:
    """Read the demo photos, make their places and bring the demo index up to date; returns
    (index folder, the demo's place dataset)."""
    photos = collect_photos(photos_dir)
    places = demo_placeset(directory / "placeset", photos)
    index_dir = directory / "index"
    if (index_dir / MANIFEST).exists():
        index = Index.open(index_dir, model, writable=True)
    else:
        index = Index.create(index_dir, model or demo_model(photos))
    with index:
        report = fill_demo_index(index, places)
    typer.echo(f"demo index {index_dir}: {report.places} places made from {len(photos)} photos "
               f"({report.described} described now)")
    return index_dir, places


def register(app: typer.Typer) -> None:
    """Add `serve` and `demo` to the `netvlad` typer app."""

    @app.command("serve")
    def serve_command(
        index: Annotated[Path, typer.Option("--index", "-i", help="Index folder (from `netvlad index`).",
                                            envvar="NETVLAD_INDEX_DIR")],
        model: Annotated[Optional[str], typer.Option(
            "--model", "-m", help="Model file or name; must be the index's (default: the index's own).",
            envvar="NETVLAD_MODEL")] = None,
        host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
        port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 8000,
    ) -> None:
        """Serve the REST API and web page over an index. Other settings come from NETVLAD_*
        environment variables or .env (API key, limits, device, batching)."""
        read_manifest(index)  # a clear error now rather than a traceback from the server
        settings = load_settings(index_dir=index, model=model)
        typer.echo(_banner(host, port, None))
        _run(settings, host, port)

    @app.command("demo")
    def demo_command(
        directory: Annotated[Path, typer.Option("--dir", file_okay=False, help="Where the demo index goes.")] = DEMO_DIR,
        photos: Annotated[Path, typer.Option(
            "--photos", file_okay=False, help="Folder of the demo photos, as `make photos` fetches them.")] = PHOTOS_DIR,
        model: Annotated[Optional[str], typer.Option(
            "--model", "-m", help="Model file (default: the shipped model).")] = None,
        host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
        port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 8000,
        serve: Annotated[bool, typer.Option(help="Start the server once the index is ready.")] = True,
    ) -> None:
        """Build a demo collection from the approved real photos (`make photos`), index it, and
        serve it on localhost. A second run reuses the index."""
        index_dir, places = build_demo(directory, photos, model)
        (lat, lon), = lat_lon(places.q_utm[:1])
        typer.echo(_banner(host, port, (places.q_paths()[0], lat, lon)))
        if serve:
            _run(load_settings(index_dir=index_dir), host, port)
