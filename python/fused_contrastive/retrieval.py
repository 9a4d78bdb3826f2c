"""Retrieval metrics of embeddings (issue 21): Recall@k and MAP@R by exact
nearest-neighbour search, in blocks of query rows, so that no N x N distance
matrix is ever held; and the Keras 3 callback that logs them each epoch."""

import keras
import numpy as np
import tensorflow as tf

from fused_contrastive._in_batch_ops import class_ids
from fused_contrastive._inputs import IN_BATCH_DISTANCES, prepare_in_batch_inputs, validate_choice
from fused_contrastive.reference import compute_dtype

# Distances per block of queries: the block's few [Q, N] temporaries stay
# within a few hundred MiB however large N is.
TILE_ELEMENTS = 1 << 23


def _rows(embeddings, labels, prefix):
    """Embeddings [N, D] in their compute dtype and labels [N] (or [N, 1]), checked."""
    what = "retrieval_metrics"
    labels, embeddings = prepare_in_batch_inputs(labels, embeddings, prefix, what, "N")
    embeddings = tf.cast(embeddings, compute_dtype(embeddings.dtype))
    finite = tf.reduce_all(tf.math.is_finite(embeddings), axis=1)
    if not bool(tf.reduce_all(finite)):
        row = int(tf.argmin(tf.cast(finite, tf.int32)))
        raise ValueError(f"{what}: {prefix}embeddings hold NaN or infinity (row {row})")
    return embeddings, labels


def _check_k(k):
    ks = (k,) if isinstance(k, (int, np.integer)) else tuple(k)
    if not ks or any(isinstance(x, bool) or not isinstance(x, (int, np.integer)) for x in ks):
        raise ValueError(f"retrieval_metrics: k must be a positive int or ints; got {k!r}")
    if min(ks) < 1:
        raise ValueError(f"retrieval_metrics: k must be at least 1; got {k!r}")
    return tuple(sorted(set(int(x) for x in ks)))


def _ids(query_labels, reference_labels):
    """int64 class ids of both label sets, equal where the labels compare
    equal: integers as they are, and float labels (on either side) by their
    float64 value, as the in-batch loss compares them. A NaN label matches
    nothing."""
    floats = query_labels.dtype.is_floating or reference_labels.dtype.is_floating
    dtype = tf.float64 if floats else tf.int64
    ids = class_ids(tf.concat([tf.cast(query_labels, dtype), tf.cast(reference_labels, dtype)], 0))
    ids = ids.numpy()
    n = int(query_labels.shape[0])
    return ids[:n], ids[n:]


def _relevant_counts(query_ids, reference_ids, itself):
    """R of each query: the references with its label (less itself)."""
    classes, counts = np.unique(reference_ids, return_counts=True)
    at = np.clip(np.searchsorted(classes, query_ids), 0, max(len(classes) - 1, 0))
    found = (classes[at] == query_ids) if len(classes) else np.zeros(len(query_ids), bool)
    r = np.where(found, counts[at] if len(classes) else 0, 0)
    return r - 1 if itself else r


@tf.function(reduce_retracing=True)
def _block(
    queries, query_ids, relevant, references, reference_ids, first, depth, ks, itself, cosine
):
    """Sums over a block of queries: hits within each k, the average
    precisions at R and how many queries have an R (> 0)."""
    products = tf.matmul(queries, references, transpose_b=True)
    if cosine:
        # -cos, with 0 similarity for a zero row, as the in-batch loss.
        norms = tf.norm(queries, axis=1)[:, None] * tf.norm(references, axis=1)[None, :]
        score = -tf.math.divide_no_nan(products, norms)
    else:
        # d² less the query's own ‖q‖²: the same order along each row.
        score = tf.reduce_sum(references * references, axis=1)[None, :] - 2 * products
    rows = tf.shape(queries)[0]
    if itself:
        own = tf.range(rows)[:, None] + first == tf.range(tf.shape(references)[0])[None, :]
        score = tf.where(own, tf.constant(np.inf, score.dtype), score)
    # top_k puts equal values in increasing index order: ties go to the lowest index.
    _, nearest = tf.math.top_k(-score, k=depth, sorted=True)
    hit = tf.equal(tf.gather(reference_ids, nearest), query_ids[:, None])
    within = [tf.reduce_sum(tf.cast(tf.reduce_any(hit[:, :k], axis=1), tf.int64)) for k in ks]
    rank = tf.range(1, depth + 1, dtype=tf.int64)[None, :]
    precision = tf.cast(tf.cumsum(tf.cast(hit, tf.int64), axis=1), tf.float64) / tf.cast(
        rank, tf.float64
    )
    counted = tf.logical_and(hit, rank <= relevant[:, None])
    ap = tf.reduce_sum(tf.where(counted, precision, 0.0), axis=1) / tf.cast(
        tf.maximum(relevant, 1), tf.float64
    )
    has_r = relevant > 0
    return (
        tf.stack(within),
        tf.reduce_sum(tf.where(has_r, ap, 0.0)),
        tf.reduce_sum(tf.cast(has_r, tf.int64)),
    )


def retrieval_metrics(
    embeddings,
    labels,
    k=(1, 5),
    reference_embeddings=None,
    reference_labels=None,
    distance="euclidean",
):
    """Recall@k and MAP@R of nearest-neighbour retrieval, exact, in blocks.

    Each query (a row of `embeddings`) retrieves its nearest rows of the
    references (`reference_embeddings`; by default the queries themselves,
    each query then excluded from its own neighbours). Distances are those of
    the in-batch loss: Euclidean, or cosine (`1 − cos`, 0 similarity for a zero
    row). Ties in distance go to the lowest reference index, so results are
    deterministic.

    - `recall@k`: the fraction of queries with a same-label reference among
      their k nearest (the metric-learning papers' Recall@k; a query with no
      same-label reference counts as a miss).
    - `map@r` (Musgrave et al., "A Metric Learning Reality Check", 2020): for
      a query with R same-label references, (1/R) Σ_{i ≤ R} P@i over the
      ranks i ≤ R that hold a same-label reference; the mean over the queries
      with R > 0 (0.0 when none has).

    Queries run in blocks of rows against all references, so memory is the
    inputs plus a block of about 2^23 distances and the top-max(k, R) lists
    of a block: linear in N, never N × N.

    Args:
      embeddings: queries `[N, D]` (float16, bfloat16, float32 or float64;
        16-bit ones computed in float32), finite.
      labels: their class ids `[N]` or `[N, 1]` (integers, or floats compared
        by value; a NaN label matches nothing).
      k: an int or ints ≥ 1.
      reference_embeddings, reference_labels: the gallery `[M, D]`, `[M]`,
        given together; None: the queries themselves.
      distance: "euclidean" or "cosine".

    Returns:
      A dict of Python floats: `"recall@k"` for each k, and `"map@r"`.

    >>> metrics = retrieval_metrics([[0.0], [0.1], [5.0], [5.2]], [0, 0, 1, 1], k=1)
    >>> metrics["recall@1"], metrics["map@r"]
    (1.0, 1.0)
    """
    ks = _check_k(k)
    cosine = validate_choice(distance, IN_BATCH_DISTANCES, "distance") == "cosine"
    queries, query_labels = _rows(embeddings, labels, "")
    itself = reference_embeddings is None and reference_labels is None
    if itself:
        references, ref_labels = queries, query_labels
    elif reference_embeddings is None or reference_labels is None:
        raise ValueError(
            "retrieval_metrics: give reference_embeddings and reference_labels together"
        )
    else:
        references, ref_labels = _rows(reference_embeddings, reference_labels, "reference_")
        if references.shape[1] != queries.shape[1]:
            raise ValueError(
                f"retrieval_metrics: reference_embeddings must have the embeddings' D = "
                f"{queries.shape[1]}; got shape {references.shape}"
            )
        if references.dtype != queries.dtype:  # float64 wins
            references, queries = (tf.cast(x, tf.float64) for x in (references, queries))
    query_ids, reference_ids = _ids(query_labels, ref_labels)
    relevant = _relevant_counts(query_ids, reference_ids, itself)
    n, m = int(queries.shape[0]), int(references.shape[0])
    candidates = m - 1 if itself else m
    within, ap_sum, with_r = np.zeros(len(ks), np.int64), 0.0, 0
    block = max(1, TILE_ELEMENTS // max(m, 1))
    for first in range(0, n if candidates > 0 else 0, block):
        last = min(n, first + block)
        depth = min(candidates, max(max(ks), int(relevant[first:last].max())))
        hits, ap, count = _block(
            queries[first:last],
            tf.constant(query_ids[first:last]),
            tf.constant(relevant[first:last], tf.int64),
            references,
            tf.constant(reference_ids),
            tf.constant(first),
            tf.constant(depth),
            ks,
            itself,
            cosine,
        )
        within += hits.numpy()
        ap_sum += float(ap)
        with_r += int(count)
    metrics = {f"recall@{k}": float(w) / n if n else 0.0 for k, w in zip(ks, within)}
    metrics["map@r"] = ap_sum / with_r if with_r else 0.0
    return metrics


def epoch_metrics(model, data, k, references, distance, batch_size):
    """retrieval_metrics of `model`'s embeddings of `data` ((x, labels) arrays
    or a dataset of (x, labels) batches), against `references` in the same
    form (None: the data itself). Each batch is embedded once, in inference
    mode, its labels taken in the same pass."""

    def embed(source):
        if not isinstance(source, tf.data.Dataset):
            x, y = source
            source = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)
        outputs, labels = [], []
        for x, y in source:
            outputs.append(np.asarray(model(x, training=False)))
            labels.append(np.asarray(y))
        return np.concatenate(outputs), np.concatenate(labels)

    embeddings, labels = embed(data)
    gallery = {}
    if references is not None:
        gallery = dict(zip(("reference_embeddings", "reference_labels"), embed(references)))
    return retrieval_metrics(embeddings, labels, k, distance=distance, **gallery)


class RetrievalMetricsMixin:
    """Logs `retrieval_metrics` of the model's embeddings at the end of each
    epoch, as `val_recall@k` and `val_map@r` (with the default prefix), which
    `History` and the progress bar show like any metric. (The Keras 3 class
    below; keras2.py has the tf_keras one.)

    Args:
      validation_data: `(x, labels)` arrays, or a `tf.data.Dataset` of
        `(x, labels)` batches; the model maps x to embeddings.
      k, distance: as for `retrieval_metrics`.
      reference_data: a gallery in the same form; None: the validation data
        against itself.
      prefix: what the logged names start with.
      batch_size: for array data.
    """

    def __init__(
        self,
        validation_data,
        k=(1, 5),
        reference_data=None,
        distance="euclidean",
        prefix="val_",
        batch_size=256,
    ):
        super().__init__()
        self.validation_data, self.reference_data = validation_data, reference_data
        self.k = _check_k(k)
        self.distance = validate_choice(distance, IN_BATCH_DISTANCES, "distance")
        self.prefix, self.batch_size = prefix, batch_size

    def on_epoch_end(self, epoch, logs=None):
        metrics = epoch_metrics(
            self.model,
            self.validation_data,
            self.k,
            self.reference_data,
            self.distance,
            self.batch_size,
        )
        if logs is not None:
            logs.update({self.prefix + name: value for name, value in metrics.items()})


class RetrievalMetrics(RetrievalMetricsMixin, keras.callbacks.Callback):
    __doc__ = RetrievalMetricsMixin.__doc__
