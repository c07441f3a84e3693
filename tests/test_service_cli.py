"""`netvlad serve` and `netvlad demo` (registered on a typer app through `service.cli.register`,
as the `netvlad.commands` entry point does)."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import httpx
import numpy as np
import pyproj
import pytest
import typer
from typer.testing import CliRunner

import netvlad
from netvlad.datasets.placeset import load_place_dataset
from netvlad.errors import ModelFileError, NetVLADError
from netvlad.index import Index
from service import cli
from service.demo import lat_lon
from server_process import ServiceProcess, free_port
from service_support import INDEXED, small_index

#: The `netvlad` CLI with the service commands, as a child process.
NETVLAD = [sys.executable, "-c", "import typer, sys; from service.cli import register; app = typer.Typer(); "
           "app.callback()(lambda: None); register(app); app()"]


def cli_app() -> typer.Typer:
    app = typer.Typer()
    app.callback()(lambda: None)
    cli.register(app)
    return app


def test_serve_runs_uvicorn_on_the_index(tmp_path_factory, real_photos, tmp_path):
    index_dir = small_index(tmp_path_factory, real_photos, "serve")
    port = free_port()
    command = NETVLAD + ["serve", "--index", str(index_dir), "--port", str(port)]
    with ServiceProcess({}, port=port, command=command, log=tmp_path / "serve.log") as server:
        assert httpx.get(server.url + "/readyz").json()["images"] == INDEXED
        assert httpx.get(server.url + "/").status_code == 200
    assert f"http://127.0.0.1:{port}/docs" in (tmp_path / "serve.log").read_text()


def test_serve_explains_a_missing_index(tmp_path):
    result = CliRunner().invoke(cli_app(), ["serve", "--index", str(tmp_path / "nowhere")])
    assert result.exit_code != 0
    assert "no such index folder" in str(result.exception)


def test_demo_builds_places_finds_them_and_reuses_its_index(real_photos, tmp_path, monkeypatch):
    photos = tmp_path / "photos"
    photos.mkdir()
    sources = sorted(real_photos, key=lambda p: (not p.name.startswith("debian-"), p.name))[:2]  # large photos
    for path in sources:
        shutil.copy(path, photos / path.name)
    # The photo fetcher is tested in test_fetch_photos.py; here: the photos already there.
    monkeypatch.setattr(cli, "collect_photos", lambda folder: sorted(folder.glob("*.jpg")))
    args = ["demo", "--dir", str(tmp_path / "demo"), "--photos", str(photos), "--no-serve"]  # the shipped model
    first = CliRunner().invoke(cli_app(), args)
    assert first.exit_code == 0, first.output
    made = re.search(r"(\d+) places made from 2 photos \((\d+) described now\)", first.output)
    assert made and int(made[1]) == int(made[2]) > 100
    assert "curl -F images=@" in first.output and "http://127.0.0.1:8000/" in first.output
    second = CliRunner().invoke(cli_app(), args)
    assert second.exit_code == 0, second.output
    assert f"{made[1]} places made from 2 photos (0 described now)" in second.output

    # The demo's query photos (re-photographed views) find their place: top hit within 25 m.
    places = load_place_dataset(tmp_path / "demo" / "placeset")
    truth = lat_lon(places.q_utm)
    with Index.open(tmp_path / "demo" / "index") as index:
        tops = [index.search([path], k=1).hits[0] for path in places.q_paths()]
    found = lat_lon(places.db_utm[[places.db_paths().index(Path(hit.path)) for hit in tops]])
    np.testing.assert_allclose(found, [[hit.lat, hit.lon] for hit in tops], atol=1e-9)  # coordinates catalogued
    metres = [pyproj.Geod(ellps="WGS84").inv(a[1], a[0], b[1], b[0])[2] for a, b in zip(found, truth)]
    assert np.mean(np.array(metres) <= 25.0) >= 0.6, metres


def test_demo_without_a_model_says_what_to_do(real_photos, monkeypatch):
    def no_default(*args, **kwargs):
        raise ModelFileError("the built-in model 'default' is not in this install")

    build = netvlad.build_model
    monkeypatch.setattr(netvlad, "load_model", no_default)
    monkeypatch.setattr(netvlad, "build_model", lambda *a, **k: build(*a, **{**k, "pretrained": False}))
    with pytest.raises(NetVLADError, match="ImageNet weights are not in the torch hub cache"):
        cli.demo_model(real_photos[:2])
