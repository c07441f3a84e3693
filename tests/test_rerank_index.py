"""Re-ranking through an index: the evidence it keeps stays in step with adds, removes, a late
`--local-features` and a kill -9 during indexing; searches re-rank with it; DBA is kept beside
the descriptors and reversible; `netvlad eval --rerank` scores re-ranked shortlists."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from netvlad.errors import RerankUnavailableError
from netvlad.index import Index
from netvlad.rerank.evidence import EvidenceStore
from netvlad.rerank.expansion import alpha_qe
from netvlad.rerank.indexevidence import IndexEvidence
from tests.test_indexing_resume import indexed_count

CLI = [sys.executable, "-m", "netvlad"]


@pytest.fixture(scope="module")
def photos(real_photos, tmp_path_factory) -> Path:
    """12 real photos shrunk to 480 px, in a folder."""
    root = tmp_path_factory.mktemp("rerank") / "photos"
    root.mkdir()
    for i, source in enumerate(real_photos[:12]):
        with Image.open(source) as image:
            image = image.convert("RGB")
            image.thumbnail((480, 480))
            image.save(root / f"{i:02d}.jpg", quality=92)
    return root


def crop_query(path: Path) -> Image.Image:
    """A rotated, off-centre crop of a photo, shrunk: another view of the same place."""
    with Image.open(path) as image:
        w, h = image.size
        return image.convert("RGB").crop((w // 6, h // 5, w * 5 // 6, h * 4 // 5)).rotate(6).resize((360, 270))


def assert_in_step(index: Index) -> None:
    """Every indexed photo has its local features, and nothing else has any."""
    indexed = index.catalog.indexed_ids()
    assert np.array_equal(index.evidence.store.ids("sift"), indexed)


def test_evidence_follows_adds_and_removes_and_reranks(photos, model_path, tmp_path):
    files = sorted(photos.glob("*.jpg"))
    with Index.create(tmp_path / "ix", model_path, local_features="sift", max_keypoints=500) as index:
        ids = index.add(files[:8])
        assert_in_step(index)
        assert index.rerank_methods() == ["none", "geometric", "aqe"]
        index.remove(ids[:2])
        assert_in_step(index)
        index.add([files[8]])
        assert_in_step(index)
        index.save()
        query = crop_query(files[5])
        plain = index.search([query], k=5)
        found = index.search([query], k=5, rerank="geometric", rerank_k=10)
        assert found.rerank == "geometric" and found.rerank_ms > 0
        top = found.hits[0]
        assert top.id == ids[5] and top.rerank.verified and top.rerank.score >= 15, (plain.hits, found.hits)
        assert all(not h.rerank.verified for h in found.hits[1:] if h.rerank is not None)
        # the points map the query as searched (360×270) onto the photo file at full size
        points = np.array(top.rerank.points)
        assert top.rerank.query_size == (360, 270) and len(points) >= 15
        assert points[:, 2].max() <= Image.open(files[5]).width and points[:, 0].max() <= 360
        with pytest.raises(RerankUnavailableError, match="--patch-features"):
            index.search([query], k=5, rerank="patch")
        with pytest.raises(ValueError, match="rerank must be one of"):
            index.search([query], k=5, rerank="ransac")


def test_late_local_features_are_filled_in_by_the_next_run(photos, model_path, tmp_path):
    index_dir = tmp_path / "ix"
    base = [*CLI, "index", str(photos), "--index", str(index_dir), "--model", str(model_path), "-q", "--json"]
    assert subprocess.run(base, capture_output=True, timeout=300).returncode == 0
    run = subprocess.run([*base, "--local-features", "orb"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["evidence_added"] == 12
    with Index.open(index_dir) as index:
        assert np.array_equal(index.evidence.store.ids("orb"), index.catalog.indexed_ids())
        assert "geometric" in index.rerank_methods()
    other = subprocess.run([*base, "--local-features", "sift"], capture_output=True, text=True, timeout=300)
    assert other.returncode != 0 and "keeps orb local features" in other.stderr


@pytest.mark.slow
def test_kill_during_indexing_keeps_evidence_in_step(photos, model_path, tmp_path):
    index_dir = tmp_path / "ix"
    args = [*CLI, "index", str(photos), "--index", str(index_dir), "--model", str(model_path), "--local-features",
            "sift", "--patch-features", "--batch-size", "1", "--workers", "0", "-q", "--json"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while indexed_count(index_dir) < 3 and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < indexed_count(index_dir) < 12
    final = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr
    with Index.open(index_dir) as index:
        indexed = index.catalog.indexed_ids()
        assert len(indexed) == 12
        for kind in ("sift", "patch"):
            assert np.array_equal(index.evidence.store.ids(kind), indexed), kind
        assert index.rerank_methods() == ["none", "geometric", "patch", "aqe"]
        assert (index_dir / "patch-pca.npz").is_file()  # learned before the first batch, on the run's photos
        found = index.search([crop_query(photos / "07.jpg")], k=3, rerank="patch", rerank_k=12)
        assert found.hits[0].rerank is not None and len(found.hits[0].rerank.points) > 0


def test_aqe_rescores_the_shortlist_with_the_expanded_query(photos, model_path, tmp_path):
    with Index.create(tmp_path / "ix", model_path) as index:
        index.add(sorted(photos.glob("*.jpg")))
        query = crop_query(photos / "03.jpg")
        q = index.model.describe([query])
        found = index.search([query], k=12, rerank="aqe", rerank_k=12)
        ids = np.array([h.id for h in index.search([query], k=12).hits])
        x = index.store.descriptors(ids)
        sims = x @ q[0]
        top = np.argsort(-sims)[:5]
        expanded = q[0] + (np.clip(sims[top], 0, None) ** 3)[:, None].T @ x[top]
        expected = ids[np.argsort(-(x @ (expanded[0] / np.linalg.norm(expanded))), kind="stable")]
        np.testing.assert_allclose(alpha_qe(q[0], x[top], sims[top]), expanded[0] / np.linalg.norm(expanded), atol=1e-6)
        assert [h.id for h in found.hits] == expected.tolist()
        assert all(h.rerank.method == "aqe" for h in found.hits)


def test_dba_is_kept_beside_the_descriptors_and_reversible(photos, model_path, tmp_path):
    files = sorted(photos.glob("*.jpg"))
    with Index.create(tmp_path / "ix", model_path) as index:
        index.add(files[:10])
        before = {h.id: h.score for h in index.search([files[2]], k=10).hits}
        index.augment_database(k=3)
        assert (tmp_path / "ix" / "dba" / "dba.json").exists()
        after = {h.id: h.score for h in index.search([files[2]], k=10).hits}
        ids = sorted(after)
        augmented, found = index.dba.descriptors(ids)
        assert found.all()
        q = index.model.describe([files[2]])[0]
        np.testing.assert_allclose([after[i] for i in ids], augmented @ q, atol=2e-3)
        assert before != after
        new = index.add([files[10]])[0]  # not augmented yet: scored with its own descriptor
        assert not index.dba.descriptors([new])[1][0] and index.dba.is_stale(index.catalog.revision)
        assert index.drop_augmentation() and index.dba is None
        again = {h.id: h.score for h in index.search([files[2]], k=11).hits if h.id != new}
        assert again == pytest.approx(before, abs=1e-5)


def test_eval_reports_reranked_recall_and_time(real_photos, model_path, tmp_path):
    sources = [str(p) for p in real_photos[:3]]
    made = subprocess.run([*CLI, "make-placeset", *sources, "--out", str(tmp_path / "ps"), "--queries-per-photo", "4",
                           "--stride", "128", "--out-size", "160x120"],
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    run = subprocess.run([*CLI, "eval", str(tmp_path / "ps"), "--model", str(model_path), "--rerank", "geometric",
                          "--rerank", "aqe", "--rerank", "patch", "--patch-global-weight", "0", "--rerank-k", "10",
                          "--json", "--no-progress"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    methods = {m["name"]: m for m in json.loads(run.stdout)["methods"]}
    assert set(methods) == {"model.pt", "model.pt + geometric", "model.pt + aqe", "model.pt + patch"}
    # patches alone (Patch-NetVLAD's ranking) when asked; the weight is reported with the figures
    assert methods["model.pt + patch"]["patch_global_weight"] == 0 and "patch_global_weight" not in methods["model.pt + aqe"]
    geometric = methods["model.pt + geometric"]
    assert geometric["rerank_k"] == 10 and geometric["ms_per_query"] > 0 and geometric["evidence_bytes_per_photo"] > 1000
    # crops of the database's own photos: verification puts a positive first at least as often
    assert geometric["recall"]["1"] >= methods["model.pt"]["recall"]["1"]


def test_patch_settings_are_stored_and_early_indexes_read_as_made(tmp_path):
    fresh = IndexEvidence(tmp_path / "new", None)
    (tmp_path / "new").mkdir()
    fresh.enable(patch=True)
    assert fresh.patch == {"pca": "patch-pca.npz", "side": 640, "sizes": [2, 5, 8]}
    assert fresh.picture_side("patch") == 640 and fresh.picture_side("geometric") is None
    fresh.close()
    # an index whose patch settings predate the resolution and sizes: the model's own size, 2/4/6
    store = EvidenceStore(tmp_path)
    store.set_settings("patch", {"pca": "patch-pca.npz"})
    early = IndexEvidence(tmp_path, store)
    assert early.patch == {"pca": "patch-pca.npz", "side": None, "sizes": [2, 4, 6]}
    assert early.picture_side("patch") is None
    early.close()
