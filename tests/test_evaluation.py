"""Recall@N by exact faiss search against brute-force references and hand-made cases;
`evaluate` on an in-memory place dataset; plot and per-query CSV outputs."""

import csv

import numpy as np
import pytest
from PIL import Image

from netvlad.datasets.placeset import PlaceDataset
from netvlad.errors import DatasetError
from netvlad.evaluation import evaluate, plot_recall, recall_at_n, write_per_query_csv


def brute_force_recall(db, q, positives, ns):
    """Reference: full cosine-similarity matrix, argsort per query, loop over queries and N."""
    db = db / np.linalg.norm(db, axis=1, keepdims=True)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    order = np.argsort(-(q @ db.T), axis=1, kind="stable")
    recall, ranks = {}, []
    evaluated = [i for i in range(len(q)) if len(positives[i])]
    for n in ns:
        recall[n] = sum(bool(set(order[i, :n]) & set(positives[i])) for i in evaluated) / len(evaluated)
    for i in range(len(q)):
        hits = [r + 1 for r in range(max(ns)) if order[i, r] in set(positives[i])]
        ranks.append(hits[0] if hits else -1)
    return recall, np.array(ranks), order[:, : max(ns)]


def random_case(seed, nd=300, nq=80, dim=24):
    rng = np.random.default_rng(seed)
    db = rng.normal(size=(nd, dim)).astype(np.float32)
    # Queries are noisy copies of database rows, so rankings are far from chance.
    source = rng.integers(nd, size=nq)
    q = (db[source] + rng.normal(scale=1.2, size=(nq, dim))).astype(np.float32)
    positives = []
    for i in range(nq):
        others = rng.choice(nd, size=rng.integers(0, 5), replace=False)
        keep_source = rng.uniform() < 0.8
        members = np.union1d(others, [source[i]]) if keep_source else others
        positives.append(members.astype(np.int64) if i % 10 else np.empty(0, dtype=np.int64))
    return db, q, positives


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_matches_brute_force_on_random_data(seed):
    db, q, positives = random_case(seed)
    ns = (1, 2, 5, 10, 20)
    result = recall_at_n(db, q, positives, ns, per_query=True, queries="with-positives")
    recall, ranks, top = brute_force_recall(db, q, positives, ns)
    assert result["recall"] == pytest.approx(recall, abs=1e-12)
    np.testing.assert_array_equal(result["first_positive_rank"], ranks)
    np.testing.assert_array_equal(result["top_ids"], top)
    assert result["skipped"] == sum(len(p) == 0 for p in positives) > 0
    assert result["queries"] == len(q) - result["skipped"]
    assert 0.2 < recall[1] < recall[20] < 1.0  # the case is neither trivial nor hopeless


def test_hand_made_case():
    # Database on the unit circle at 0°, 90°, 180°, 270°; queries just off 10° and 100°.
    angles = np.deg2rad([0, 90, 180, 270])
    db = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    q = np.stack([np.cos(np.deg2rad([10, 100, 200])), np.sin(np.deg2rad([10, 100, 200]))], axis=1)
    # Query 0's nearest (0°) is a positive; query 1's nearest is 90°, its positive is 180° (2nd);
    # query 2 has no positive.
    positives = [np.array([0]), np.array([2]), np.array([], dtype=np.int64)]
    result = recall_at_n(db, q, positives, ns=(1, 2, 3), per_query=True, queries="with-positives")
    assert result["recall"] == {1: 0.5, 2: 1.0, 3: 1.0}
    assert result["queries"] == 2 and result["skipped"] == 1
    assert result["first_positive_rank"].tolist() == [1, 2, -1]
    assert result["top_ids"][:, 0].tolist() == [0, 1, 2]


def test_both_query_conventions_on_a_case_with_queries_without_positives():
    """The community's protocol (default) divides by all queries: one without a positive is a
    miss at every N; the other convention leaves it out of the denominator."""
    angles = np.deg2rad([0, 90, 180, 270])
    db = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    q = np.stack([np.cos(np.deg2rad([10, 100, 200, 300])), np.sin(np.deg2rad([10, 100, 200, 300]))], axis=1)
    positives = [np.array([0]), np.array([2]), np.array([], dtype=np.int64), np.array([], dtype=np.int64)]
    community = recall_at_n(db, q, positives, ns=(1, 2, 4))
    assert community["recall"] == {1: 0.25, 2: 0.5, 4: 0.5}
    assert (community["queries"], community["skipped"], community["without_positives"]) == (4, 0, 2)
    assert community["convention"] == "all"
    left_out = recall_at_n(db, q, positives, ns=(1, 2, 4), queries="with-positives")
    assert left_out["recall"] == {1: 0.5, 2: 1.0, 4: 1.0}
    assert (left_out["queries"], left_out["skipped"], left_out["without_positives"]) == (2, 2, 2)
    with pytest.raises(ValueError, match="queries must be one of"):
        recall_at_n(db, q, positives, queries="some")


def test_n_beyond_database_size_and_scale_invariance():
    db = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    q = np.array([[0.9, 0.1], [0.0, -1.0]])
    positives = [np.array([2]), np.array([0, 1])]
    result = recall_at_n(db, q, positives, ns=(1, 20))
    assert result["recall"] == {1: 0.0, 20: 1.0}
    # Ranking is by cosine: rescaling rows changes nothing.
    scaled = recall_at_n(db * np.array([[3.0], [0.2], [7.0]]), q * 5, positives, ns=(1, 2, 20))
    assert scaled["recall"] == {1: 0.0, 2: 0.5, 20: 1.0}


def test_zero_descriptor_is_not_a_hub():
    # A zero row (photo without features) scores 0, below any positive cosine.
    db = np.array([[0.0, 0.0], [1.0, 0.2], [0.6, 0.8]])
    q = np.array([[1.0, 0.0], [0.5, 0.9]])
    result = recall_at_n(db, q, [np.array([1]), np.array([2])], ns=(1,), per_query=True)
    assert result["recall"] == {1: 1.0}
    assert result["top_ids"][:, 0].tolist() == [1, 2]


def test_bad_inputs_are_refused():
    db, q = np.eye(3), np.eye(3)[:2]
    with pytest.raises(ValueError, match="dims"):
        recall_at_n(db, np.ones((2, 4)), [np.array([0])] * 2)
    with pytest.raises(ValueError, match="positive sets"):
        recall_at_n(db, q, [np.array([0])])
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        recall_at_n(db, q, [np.array([0]), np.array([3])])
    with pytest.raises(ValueError, match="positive"):
        recall_at_n(db, q, [np.array([0])] * 2, ns=(0, 5))
    with pytest.raises(ValueError, match="NaN"):
        recall_at_n(db * np.nan, q, [np.array([0])] * 2)
    with pytest.raises(DatasetError, match="none of the 2 queries"):
        recall_at_n(db, q, [np.array([], dtype=np.int64)] * 2)


def grid_dataset(tmp_path):
    """In-memory place dataset: database every 20 m along a street, queries between them."""
    db_utm = np.stack([np.arange(0, 400, 20.0), np.zeros(20)], axis=1)
    q_utm = np.array([[13.0, 4.0], [101.0, -3.0], [255.0, 0.0], [390.0, 2.0], [1000.0, 0.0]])
    return PlaceDataset(
        root=tmp_path,
        db_images=[f"db/{i:02d}.jpg" for i in range(len(db_utm))],
        db_utm=db_utm,
        q_images=[f"q/{i}.jpg" for i in range(len(q_utm))],
        q_utm=q_utm,
    )


def test_evaluate_with_a_describe_function(tmp_path):
    dataset = grid_dataset(tmp_path)
    where = {path: utm for path, utm in zip(dataset.db_paths() + dataset.q_paths(), np.vstack([dataset.db_utm, dataset.q_utm]))}

    def oracle(paths):
        # A descriptor that knows the position: direction on a circle whose angle grows with easting.
        angle = np.array([where[p][0] for p in paths]) / 2000.0
        return np.stack([np.cos(angle), np.sin(angle)], axis=1).astype(np.float32)

    result = evaluate(oracle, dataset, ns=(1, 5), per_query=True, queries="with-positives")
    assert result["recall"] == {1: 1.0, 5: 1.0}
    assert (result["queries"], result["skipped"]) == (4, 1)  # the query at 1000 m has no positive
    community = evaluate(oracle, dataset, ns=(1, 5))
    assert community["recall"] == {1: 0.8, 5: 0.8} and community["without_positives"] == 1
    assert result["dim"] == 2 and result["database"] == 20 and result["images_per_s"] > 0
    assert result["top_ids"][:4, 0].tolist() == [1, 5, 13, 19]

    # Database rows describing the image 100 m further on (wrapping): no query finds its place.
    db_paths = dataset.db_paths()
    shifted = {path: db_paths[(i + 5) % len(db_paths)] for i, path in enumerate(db_paths)}
    worse = evaluate(lambda paths: oracle([shifted.get(p, p) for p in paths]), dataset, ns=(1, 5))
    assert worse["recall"] == {1: 0.0, 5: 0.0}


def test_evaluate_accepts_describer_objects(tmp_path):
    dataset = grid_dataset(tmp_path)
    calls = []

    class Constant:
        def describe(self, images, progress=False):
            calls.append((len(images), progress))
            return np.ones((len(images), 3), dtype=np.float32)

    evaluate(Constant(), dataset, progress=True)
    assert calls == [(20, True), (5, True)]
    with pytest.raises(ValueError, match="returned 2 database descriptors for 20"):
        evaluate(lambda paths: np.ones((2, 3)), dataset)
    with pytest.raises(TypeError):
        evaluate(42, dataset)


def test_plot_and_per_query_csv(tmp_path):
    dataset = grid_dataset(tmp_path)
    rng = np.random.default_rng(0)
    results = {
        "oracle": recall_at_n(dataset.db_utm, dataset.q_utm + 0.1, dataset.positives(), ns=(1, 5), per_query=True),
        "random": recall_at_n(rng.normal(size=(20, 4)), rng.normal(size=(5, 4)), dataset.positives(), ns=(1, 5), per_query=True),
    }
    png = plot_recall(results, tmp_path / "plots" / "recall.png", title="grid")
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (720, 480)
        colours = np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0)
        assert len(colours) > 10  # curves, text and axes were drawn

    path = write_per_query_csv(tmp_path / "per_query.csv", dataset, results)
    rows = list(csv.DictReader(open(path, newline="")))
    assert len(rows) == 2 * 5
    for row, rank, ids in zip(rows[:5], results["oracle"]["first_positive_rank"], results["oracle"]["top_ids"]):
        assert row["method"] == "oracle" and int(row["first_positive_rank"]) == rank
        assert row["top_images"].split() == [dataset.db_images[i] for i in ids]
    assert [int(r["positives"]) for r in rows[:5]] == [len(p) for p in dataset.positives()]
    with pytest.raises(ValueError, match="per-query"):
        write_per_query_csv(tmp_path / "x.csv", dataset, {"m": {"recall": {1: 0.5}}})
