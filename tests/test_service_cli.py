"""`netvlad serve` and `netvlad demo` (registered on a typer app through `service.cli.register`,
as the `netvlad.commands` entry point does)."""

from __future__ import annotations

import shutil
import sys

import httpx
import pytest
import typer
from typer.testing import CliRunner

import netvlad
from netvlad.errors import ModelFileError, NetVLADError
from service import cli
from service.process import ServiceProcess, free_port
from service_support import INDEXED, small_index, small_model

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


def test_demo_builds_then_reuses_its_index(tmp_path_factory, real_photos, tmp_path, monkeypatch):
    photos = tmp_path / "photos"
    photos.mkdir()
    for path in real_photos[:4]:
        shutil.copy(path, photos / path.name)
    # The approved-sources collector is tested with the datasets; here: the photos already there.
    monkeypatch.setattr(cli, "collect_photos", lambda folder: sorted(folder.glob("*.jpg")))
    model = str(small_model(tmp_path_factory, real_photos))
    args = ["demo", "--dir", str(tmp_path / "demo"), "--photos", str(photos), "--model", model, "--no-serve"]
    first = CliRunner().invoke(cli_app(), args)
    assert first.exit_code == 0, first.output
    assert "4 photos (4 described now, 0 unchanged)" in first.output
    assert "curl -F images=@" in first.output and "http://127.0.0.1:8000/" in first.output
    second = CliRunner().invoke(cli_app(), args)
    assert second.exit_code == 0, second.output
    assert "4 photos (0 described now, 4 unchanged)" in second.output


def test_demo_without_a_model_says_what_to_do(real_photos, monkeypatch):
    def no_default(*args, **kwargs):
        raise ModelFileError("the built-in model 'default' is not in this install")

    build = netvlad.build_model
    monkeypatch.setattr(netvlad, "load_model", no_default)
    monkeypatch.setattr(netvlad, "build_model", lambda *a, **k: build(*a, **{**k, "pretrained": False}))
    with pytest.raises(NetVLADError, match="ImageNet weights are not in the torch hub cache"):
        cli.demo_model(real_photos[:2])
