"""Retrieval metrics (issue 21): retrieval_metrics against a brute-force float64
NumPy oracle (every distance, a stable sort), and the Keras callbacks."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from support import run_python

import fused_contrastive as fc
from fused_contrastive import retrieval


def numpy_retrieval(e, labels, ks, refs=None, ref_labels=None, distance="euclidean"):
    """Recall@k and MAP@R from the full distance matrix, sorted stably (ties
    to the lowest reference index)."""
    e = np.asarray(e, np.float64)
    labels = np.asarray(labels).reshape(-1)
    itself = refs is None
    refs = e if itself else np.asarray(refs, np.float64)
    ref_labels = labels if itself else np.asarray(ref_labels).reshape(-1)
    if distance == "euclidean":
        d = np.sqrt(((e[:, None, :] - refs[None, :, :]) ** 2).sum(-1))
    else:
        norms = np.linalg.norm(e, axis=1)[:, None] * np.linalg.norm(refs, axis=1)[None, :]
        d = 1 - np.divide(e @ refs.T, norms, out=np.zeros_like(norms), where=norms > 0)
    recall, aps = {k: [] for k in ks}, []
    for q in range(len(e)):
        order = [j for j in np.argsort(d[q], kind="stable") if not (itself and j == q)]
        hit = np.array([ref_labels[j] == labels[q] for j in order], bool)
        for k in ks:
            recall[k].append(hit[:k].any())
        r = int(hit.sum())
        if r:
            precision = np.cumsum(hit[:r]) / np.arange(1, r + 1)
            aps.append(np.sum(precision * hit[:r]) / r)
    out = {f"recall@{k}": float(np.mean(recall[k])) if len(e) else 0.0 for k in ks}
    out["map@r"] = float(np.mean(aps)) if aps else 0.0
    return out


def clustered(rng, n, classes, dim=8, spread=0.7):
    labels = rng.integers(0, classes, size=n)
    centres = rng.normal(size=(classes, dim))
    return centres[labels] + spread * rng.normal(size=(n, dim)), labels


def assert_metrics(got, want):
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-12, err_msg=name)


@pytest.mark.parametrize("tile", [retrieval.TILE_ELEMENTS, 1000])
@pytest.mark.parametrize("gallery", [False, True])
@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_matches_the_numpy_oracle(rng, monkeypatch, dtype, distance, gallery, tile):
    monkeypatch.setattr(retrieval, "TILE_ELEMENTS", tile)  # 1000: blocks of 3 to 5 queries
    rows, ids = clustered(rng, 550, 12, spread=1.5)
    e, labels = rows[:300], ids[:300]
    refs, ref_labels = (rows[300:], ids[300:]) if gallery else (None, None)
    e = e.astype(dtype)
    ks = (1, 4, 10)
    got = fc.retrieval_metrics(
        e, labels, ks, reference_embeddings=refs, reference_labels=ref_labels, distance=distance
    )
    want = numpy_retrieval(e, labels, ks, refs, ref_labels, distance)
    assert_metrics(got, want)
    # Neither trivial nor hopeless: the metrics above could have gone wrong.
    assert 0.05 < want["map@r"] < 0.95 and want["recall@1"] < want["recall@10"] < 1.0


def test_ties_go_to_the_lowest_index(rng):
    # Integer points: many equal distances, exact in the Gram formula.
    e = rng.integers(-2, 3, size=(200, 3)).astype(np.float64)
    labels = rng.integers(0, 4, size=200)
    for ks in [(1,), (1, 2, 3, 7)]:
        assert_metrics(fc.retrieval_metrics(e, labels, ks), numpy_retrieval(e, labels, ks))
    # One query at distance 1 from both references: the first one counts.
    for ref_labels, want in (([1, 0], 0.0), ([0, 1], 1.0)):
        got = fc.retrieval_metrics(
            [[0.0]], [0], k=1, reference_embeddings=[[1.0], [-1.0]], reference_labels=ref_labels
        )
        assert got["recall@1"] == want


@pytest.mark.parametrize(
    "labels, refs, want",
    [
        # No query has a same-label reference: nothing retrieved, no R.
        ([0, 1, 2], None, {"recall@1": 0.0, "map@r": 0.0}),
        # NaN labels match nothing, themselves included; float labels by value.
        ([np.nan, np.nan, 1.0, 1.0], None, None),
        ([0.0, 0.0, 1.0, 1.0], (np.arange(4.0)[:, None], [0, 0, 1, 1]), None),
    ],
)
def test_labels_without_partners_nan_and_mixed_types(labels, refs, want):
    e = np.arange(len(labels), dtype=np.float64)[:, None] * 3
    kwargs = {} if refs is None else dict(reference_embeddings=refs[0], reference_labels=refs[1])
    got = fc.retrieval_metrics(e, labels, k=1, **kwargs)
    if want is None:
        want = numpy_retrieval(e, labels, (1,), *(refs or (None, None)))
    assert_metrics(got, want)


@pytest.mark.parametrize("n", [0, 1, 2])
def test_tiny_sets(n):
    e = np.arange(n, dtype=np.float32)[:, None]
    labels = np.zeros(n, np.int64)
    got = fc.retrieval_metrics(e, labels, k=(1, 3))
    assert got == numpy_retrieval(e, labels, (1, 3))
    assert got == {"recall@1": 1.0 * (n == 2), "recall@3": 1.0 * (n == 2), "map@r": 1.0 * (n == 2)}


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (
            dict(embeddings=[[np.nan], [0.0]]),
            ValueError,
            r"embeddings hold NaN or infinity \(row 0\)",
        ),
        (dict(k=0), ValueError, "k must be at least 1"),
        (dict(k=(1, 2.5)), ValueError, "k must be a positive int"),
        (dict(distance="manhattan"), ValueError, "distance must be one of 'euclidean', 'cosine'"),
        (dict(labels=[0, 1, 2]), ValueError, r"labels must have shape \[N\] or \[N, 1\]"),
        (dict(labels=["a", "b"]), TypeError, "labels must be class ids"),
        (dict(embeddings=[0.0, 1.0]), ValueError, r"embeddings must have rank 2"),
        (dict(reference_embeddings=[[0.0]]), ValueError, "together"),
        (
            dict(reference_embeddings=[[0.0, 1.0]], reference_labels=[0]),
            ValueError,
            "reference_embeddings must have the embeddings' D = 1",
        ),
    ],
)
def test_bad_input_raises_a_clear_error(kwargs, error, match):
    args = dict(embeddings=[[0.0], [1.0]], labels=[0, 1])
    args.update(kwargs)
    with pytest.raises(error, match=match):
        fc.retrieval_metrics(**args)


def _model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])


@pytest.mark.parametrize("as_dataset", [False, True])
def test_callback_logs_each_epoch_into_history(rng, as_dataset):
    rows, ids = clustered(rng, 352, 8)
    rows = rows.astype(np.float32)
    x, labels, val_x, val_labels = rows[:256], ids[:256], rows[256:], ids[256:]
    data = (val_x, val_labels)
    if as_dataset:
        data = tf.data.Dataset.from_tensor_slices(data).batch(40)
    model = _model()
    model.compile(optimizer="adam", loss=fc.InBatchContrastiveLoss())
    history = model.fit(
        x,
        labels,
        batch_size=64,
        epochs=2,
        verbose=0,
        callbacks=[fc.RetrievalMetrics(data, k=(1, 5))],
    )
    for name in ("val_recall@1", "val_recall@5", "val_map@r"):
        assert len(history.history[name]) == 2, history.history.keys()
    want = fc.retrieval_metrics(model(val_x), val_labels, k=(1, 5))
    assert history.history["val_recall@1"][-1] == want["recall@1"]
    assert history.history["val_map@r"][-1] == want["map@r"]


def test_tf_keras_callback_against_a_gallery(rng):
    tf_keras = pytest.importorskip("tf_keras")
    from fused_contrastive.keras2 import RetrievalMetrics

    rows, ids = clustered(rng, 114, 4)
    x, labels, gallery = rows[:64], ids[:64], (rows[64:], ids[64:])
    model = tf_keras.Sequential([tf_keras.layers.Dense(4, input_shape=(8,))])
    model.compile(optimizer="sgd", loss="mse")
    callback = RetrievalMetrics((x, labels), k=1, reference_data=gallery, prefix="gallery_")
    history = model.fit(x, np.zeros((64, 4)), epochs=1, verbose=0, callbacks=[callback])
    want = fc.retrieval_metrics(
        model(x), labels, k=1, reference_embeddings=model(gallery[0]), reference_labels=gallery[1]
    )
    assert history.history["gallery_recall@1"] == [want["recall@1"]]
    assert history.history["gallery_map@r"] == [want["map@r"]]


def test_linear_memory_at_30000_rows():
    # The N x N float32 distances alone would be 3.6 GB; the metrics must stay
    # under 1 GiB of extra peak memory over what the inputs took. (At 100,000
    # rows the test took 204 s of CI's time for the same finding.)
    result = run_python("""
        import resource
        import numpy as np
        import tensorflow as tf
        import fused_contrastive as fc
        rng = np.random.default_rng(0)
        n, d = 30_000, 128
        e = tf.constant(rng.normal(size=(n, d)).astype(np.float32))
        labels = tf.constant(rng.integers(0, 3_000, size=n))
        fc.retrieval_metrics(e[:100], labels[:100])  # TensorFlow's own first-use costs
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        metrics = fc.retrieval_metrics(e, labels, k=(1, 5))
        extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        assert 0 <= metrics["recall@5"] < 0.01, metrics
        print("extra_kib", extra)
        """)
    assert result.returncode == 0, result.stderr[-3000:]
    extra_kib = int(result.stdout.split()[-1])
    assert extra_kib < 2**20, f"extra peak RSS {extra_kib / 2**20:.2f} GiB"
