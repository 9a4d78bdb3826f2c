"""A bounded fuzz loop over the pybind11 kernel module's NumPy entry points.

    python fuzz_kernels.py MODULE_DIR [--seconds S] [--seed N]

MODULE_DIR holds the `_kernels` extension to test; tests/packaging/test_sanitizers.py
builds it with -fsanitize=address,undefined and runs this script with libasan
preloaded, so any out-of-bounds access or undefined behaviour aborts the run.
Valid inputs to the distance kernels and the embedding kernels (every dtype
pair and distance, aligned and misaligned views, big-endian and strided
arrays, bool bytes other than 0/1, 0-d and empty shapes, embeddings [..., D]
with D = 1, identical pairs and zero vectors, every reduction and kind of
weight or upstream gradient) and to the in-batch kernel (both distances and
pair weightings, block caps, embeddings [B, D] with B and D down to 0,
duplicates and zero vectors, with and without an upstream gradient) are
checked against float64 NumPy formulas; invalid ones must raise TypeError or
ValueError. Random case i is of kind i % 5 (case_kinds) and draws from
default_rng([seed, i]), so a failure printed with its index can be replayed.
The next to last line counts the cases of each kind; the last reads
"fuzz: N cases, F failures"; the exit status is 1 if F > 0.
"""

import argparse
import collections
import functools
import sys
import time
from pathlib import Path

import numpy as np

try:
    import ml_dtypes
except ImportError:  # bfloat16 is then simply not fuzzed
    ml_dtypes = None

LABEL_DTYPES = ["bool", "int32", "int64", "float16", "float32", "float64"]
DISTANCE_DTYPES = ["float16", "float32", "float64"]  # the embeddings' dtypes too
if ml_dtypes is not None:
    LABEL_DTYPES.append("bfloat16")
    DISTANCE_DTYPES.append("bfloat16")
REDUCTIONS = ["sum", "mean", "weighted_mean"]
LAYOUTS = ["aligned", "misaligned", "big_endian", "misaligned_big_endian", "strided", "readonly"]

# (rtol, atol) of an output stored in each distance dtype: rounding to the
# output type, plus float32 arithmetic for every dtype below float64. atol
# covers results that land among the subnormals.
TOLERANCE = {
    "float16": (2e-3, 1e-7),
    "bfloat16": (1e-2, 1e-37),
    "float32": (1e-5, 1e-40),
    "float64": (1e-12, 1e-300),
}


def dtype_of(name):
    return np.dtype(ml_dtypes.bfloat16 if name == "bfloat16" else name)


class Case:
    """One input set: native arrays, the float64 values the kernel must see
    (labels from their bytes: a bool is true for any nonzero byte), and a
    description to print when it fails."""

    def __init__(self, labels, label_values, distances, margin, similar_label):
        self.labels, self.distances = labels, distances
        self.y = label_values
        self.d = distances.astype(np.float64)
        self.margin, self.similar_label = margin, similar_label
        self.info = [
            f"labels {labels.dtype}{labels.shape}",
            f"distances {distances.dtype}",
            f"margin={margin}",
            f"similar_label={similar_label}",
        ]


class EmbeddingCase:
    """Pair embeddings a, b [..., D] of one dtype and their labels [...], as
    Case: native arrays, the float64 label values, a description."""

    def __init__(self, labels, label_values, a, b, margin, distance, similar_label):
        self.labels, self.a, self.b = labels, a, b
        self.y = label_values
        self.margin, self.distance, self.similar_label = margin, distance, similar_label
        self.info = [
            f"labels {labels.dtype}{labels.shape}",
            f"embeddings {a.dtype}{a.shape}",
            f"distance={distance}",
            f"margin={margin}",
            f"similar_label={similar_label}",
        ]


def contrastive_terms(y, d, d_size, margin, similar_label, dtype):
    """Loss and d(loss)/d(distance) of distances d in float64, with a bound on
    the size of their terms, d_size bounding those d is computed from: under
    cancellation, rounding errors (1 - y among them) are relative to that, not
    to the result."""
    y = y if similar_label == 1 else 1 - y
    # The kernels compute in float32 below float64 inputs, margin included:
    # margin - d cancels, so its rounding shows.
    margin = np.float64((np.float64 if dtype == np.float64 else np.float32)(margin))
    hinge = np.maximum(margin - d, 0)
    loss = y * d * d + (1 - y) * hinge * hinge
    grad = 2 * (y * d - (1 - y) * hinge)
    weight = 1 + np.abs(y) + np.abs(1 - y)
    return loss, grad, weight * (d_size * d_size + hinge * hinge), 2 * weight * (d_size + hinge)


def reference(case):
    """Per-sample loss, gradient and the sizes of their terms (contrastive_terms)."""
    return contrastive_terms(
        case.y, case.d, case.d, case.margin, case.similar_label, case.distances.dtype
    )


def embedding_reference(case):
    """Per-row loss, (d(loss)/da, d(loss)/db) and the sizes of their terms in
    float64, with the kernels' conventions: no gradient at zero Euclidean
    distance, sign(0) = 0, a zero vector's cosine similarity is 0 and it has
    no gradient."""
    a, b = case.a.astype(np.float64), case.b.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):  # np.where drops those values
        if case.distance == "cosine":
            aa, bb, ab = (np.sum(x * z, -1, keepdims=True) for x, z in ((a, a), (b, b), (a, b)))
            norms = np.sqrt(aa) * np.sqrt(bb)
            zero = norms == 0
            s = np.where(zero, 0, ab / norms)
            d, d_size = 1 - s[..., 0], 1 + np.abs(s[..., 0])
            dd_da = np.where(zero, 0, s * a / aa - b / norms)
            dd_db = np.where(zero, 0, s * b / bb - a / norms)
            terms = (
                np.where(zero, 0, np.abs(a) / aa + np.abs(b) / norms),
                np.where(zero, 0, np.abs(b) / bb + np.abs(a) / norms),
            )
        else:
            diff = a - b
            if case.distance == "euclidean":
                d = np.sqrt(np.sum(diff * diff, -1))
                dd_da = np.where(d[..., None] == 0, 0, diff / d[..., None])
            else:
                d, dd_da = np.sum(np.abs(diff), -1), np.sign(diff)
            d_size, dd_db, terms = d, -dd_da, (np.abs(dd_da),) * 2
    loss, g, loss_size, g_size = contrastive_terms(
        case.y, d, d_size, case.margin, case.similar_label, case.a.dtype
    )
    g, g_size = g[..., None], g_size[..., None]
    return loss, (g * dd_da, g * dd_db), loss_size, tuple(g_size * t for t in terms)


def check_close(what, got, want, size, dtype, slack=1.0):
    """An output of the inputs' `dtype` (native byte order) within rounding of
    `want`, relative to it plus the `size` of its terms."""
    rtol, atol = TOLERANCE[dtype.name]
    got = np.asarray(got)
    assert got.dtype == dtype and got.dtype.isnative, f"{what}: dtype {got.dtype}"
    got = got.astype(np.float64)
    assert got.shape == np.shape(want), f"{what}: shape {got.shape}, want {np.shape(want)}"
    # Past the dtype's largest value (float16 sums do get there) the result is
    # an infinity of the same sign; rounding decides right at the edge.
    largest = float((ml_dtypes.finfo if ml_dtypes else np.finfo)(dtype).max)
    overflows = np.abs(want) * (1 - slack * rtol) > largest
    borderline = np.abs(want) * (1 + slack * rtol) > largest
    with np.errstate(invalid="ignore"):
        close = np.abs(got - want) <= slack * rtol * (np.abs(want) + size) + atol
    good = np.where(
        overflows, got == np.copysign(np.inf, want), close | (borderline & np.isinf(got))
    )
    assert good.all(), (
        f"{what}: {int((~good).sum())} of {good.size} off, e.g. got "
        f"{got[~good][:3]} want {np.asarray(want)[~good][:3]}"
    )


def laid_out(rng, a, layout):
    """The values of native array `a` in another memory layout."""
    # ml_dtypes' bfloat16 has no big-endian form (isbuiltin 2: user-defined).
    swappable = a.dtype.isbuiltin == 1 and a.itemsize > 1
    if layout in ("big_endian", "misaligned_big_endian") and swappable:
        a = a.astype(a.dtype.newbyteorder(">"))
    if layout in ("misaligned", "misaligned_big_endian"):
        offset = int(rng.integers(1, a.itemsize)) if a.itemsize > 1 else 1
        # Exactly as many bytes as the view needs, so AddressSanitizer sees
        # any read past its end.
        buffer = np.empty(a.nbytes + offset, np.uint8)
        view = np.ndarray(a.shape, a.dtype, buffer=buffer, offset=offset)
        view[...] = a
        return view
    if layout == "strided" and a.ndim > 0:
        wide = np.empty(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
        wide[..., ::2] = a
        return wide[..., ::2]
    if layout == "readonly":
        a = a.copy()
        a.flags.writeable = False
    return a


def random_shape(rng):
    kind = rng.integers(10)
    if kind == 0:
        return ()
    if kind == 1:
        return tuple(int(x) for x in rng.integers(0, 3, size=rng.integers(1, 4))) + (0,)
    if kind == 2:  # past one reduction block (32768 elements) of the CPU kernel
        return (int(rng.integers(32_000, 70_000)),)
    return tuple(int(x) for x in rng.integers(1, 9, size=rng.integers(1, 4)))


def random_labels(rng, shape):
    """(labels of a random dtype, the float64 values the kernel must read)."""
    name = str(rng.choice(LABEL_DTYPES))
    if name == "bool":
        raw = np.asarray(rng.integers(0, 256, size=shape, dtype=np.uint8))
        if rng.random() < 0.5:
            raw = np.asarray(np.minimum(raw, 1))
        return raw.view(np.bool_), (raw != 0).astype(np.float64)
    if name in ("int32", "int64"):
        labels = np.asarray(rng.integers(-2, 4, size=shape), name)
    else:
        labels = np.asarray(rng.uniform(-0.5, 1.5, size=shape), dtype_of(name))
    return labels, labels.astype(np.float64)


def random_dtype(rng):
    return dtype_of(str(rng.choice(DISTANCE_DTYPES)))


def random_margin(rng):
    return float(rng.choice([0.0, 1.0, rng.uniform(0, 3)]))


def random_case(rng):
    shape = random_shape(rng)
    dtype = random_dtype(rng)
    labels, values = random_labels(rng, shape)
    distances = np.asarray(rng.uniform(0, 3, size=shape))
    distances[np.asarray(rng.random(size=shape)) < 0.05] = 0
    return Case(labels, values, distances.astype(dtype), random_margin(rng), int(rng.integers(2)))


def random_embedding_case(rng, distances):
    rows = random_shape(rng)
    # Short rows where random_shape gives its long shape (many reduction blocks).
    dim = 1 if rng.random() < 0.2 else int(rng.integers(2, 4 if np.prod(rows) > 1000 else 40))
    a, b = (
        rng.standard_normal(rows + (dim,)) * rng.uniform(0.2, 1.5, rows + (1,)) / np.sqrt(dim)
        for _ in range(2)
    )
    special = np.asarray(rng.integers(25, size=rows))  # about one row in six:
    a[special <= 1] = 0  # 0, 1: a is a zero vector
    b[(special == 1) | (special == 2)] = 0  # 1, 2: b is
    b[special == 3] = a[special == 3]  # 3: an identical pair
    dtype = random_dtype(rng)
    labels, values = random_labels(rng, rows)
    return EmbeddingCase(
        labels,
        values,
        a.astype(dtype),
        b.astype(dtype),
        random_margin(rng),
        str(rng.choice(distances)),
        int(rng.integers(2)),
    )


def random_layouts(rng, case, *arrays):
    """`arrays` in random layouts, recorded in the case's description."""
    layouts = [str(layout) for layout in rng.choice(LAYOUTS, size=len(arrays))]
    case.info.append(f"layouts {layouts}")
    return [laid_out(rng, a, layout) for a, layout in zip(arrays, layouts, strict=True)]


def run_per_sample(kernels, rng, case):
    loss, grad = kernels.contrastive_loss_cpu(
        *random_layouts(rng, case, case.labels, case.distances),
        case.margin,
        similar_label=case.similar_label,
    )
    want_loss, want_grad, loss_size, grad_size = reference(case)
    check_close("loss", loss, want_loss, loss_size, case.distances.dtype)
    check_close("grad", grad, want_grad, grad_size, case.distances.dtype)


def random_weights(rng, dtype, shape, optional=True):
    """(sample_weight or upstream argument of `dtype`, 0-d or of `shape`, its
    float64 values; None and None too when `optional`)."""
    kind = rng.integers(0 if optional else 1, 4)
    if kind == 0:
        return None, None
    if kind == 1:
        w = np.asarray(rng.uniform(0, 2), dtype)
        return w, w.astype(np.float64)
    if kind == 2:  # a NumPy scalar, not an array
        w = dtype.type(rng.uniform(0, 2))
        return w, np.float64(w)
    w = np.asarray(rng.uniform(0, 2, size=shape), dtype)
    if rng.random() < 0.1:
        w[...] = 0  # weighted_mean divides by zero: divide_no_nan gives 0
    return laid_out(rng, w, str(rng.choice(LAYOUTS))), w.astype(np.float64)


def random_reduction(rng, case, dtype, shape):
    """(sample_weight, its float64 values or None, reduction, loss_scale)."""
    weights, w = random_weights(rng, dtype, shape)
    reduction = str(rng.choice(REDUCTIONS))
    loss_scale = float(rng.choice([1.0, 0.5, rng.uniform(0.1, 2)]))
    case.info += [
        f"reduction={reduction}",
        f"weights {None if w is None else np.shape(w)}",
        f"loss_scale={loss_scale}",
    ]
    return weights, w, reduction, loss_scale


def check_reduction(w, reduction, loss_scale, loss, scale, per_sample, loss_size, dtype):
    """Checks reduction_scale and the reduced loss of the per-sample losses;
    returns the factor (weight times scale) of each sample's gradient."""
    w = np.float64(1) if w is None else w
    divisor = {
        "sum": 1.0,
        "mean": float(per_sample.size),
        "weighted_mean": float(np.sum(w) if np.ndim(w) else w),
    }[reduction]
    want_scale = loss_scale / divisor if divisor != 0 else 0.0
    assert abs(scale - want_scale) <= 1e-12 * abs(want_scale), f"scale {scale}, want {want_scale}"
    # Sums accumulate float32 chunks: allow a few roundings per term.
    check_close(
        "loss",
        loss,
        want_scale * np.sum(w * per_sample),
        abs(want_scale) * np.sum(np.abs(w) * loss_size),
        dtype,
        slack=4,
    )
    return w * want_scale


def run_reduced(kernels, rng, case):
    dtype = case.distances.dtype
    weights, w, reduction, loss_scale = random_reduction(rng, case, dtype, case.d.shape)
    loss, grad, scale = kernels.contrastive_loss_reduced_cpu(
        *random_layouts(rng, case, case.labels, case.distances),
        weights,
        case.margin,
        reduction,
        loss_scale,
        similar_label=case.similar_label,
    )
    per_sample, per_sample_grad, loss_size, grad_size = reference(case)
    factor = check_reduction(w, reduction, loss_scale, loss, scale, per_sample, loss_size, dtype)
    check_close("grad", grad, per_sample_grad * factor, grad_size * np.abs(factor), dtype, slack=2)


def check_embedding_grads(case, grads, want, sizes, factor):
    """grad_a, grad_b against the reference's times each row's factor."""
    factor = np.asarray(factor)[..., None]
    for what, got, want_grad, size in zip(("grad_a", "grad_b"), grads, want, sizes, strict=True):
        check_close(what, got, want_grad * factor, size * np.abs(factor), case.a.dtype, slack=2)


def run_embedding(kernels, rng, case):
    """embedding_loss_cpu, then embedding_grad_cpu on the coefficients it gave."""
    loss, coefficients = kernels.embedding_loss_cpu(
        *random_layouts(rng, case, case.labels, case.a, case.b),
        case.margin,
        case.distance,
        case.similar_label,
    )
    want_loss, want_grads, loss_size, grad_sizes = embedding_reference(case)
    rows = case.a.shape[:-1]
    # The row sums add a rounding per column: allow a few per term.
    check_close("loss", loss, want_loss, loss_size, case.a.dtype, slack=2)
    want_shape = rows + (kernels.row_coefficients[case.distance],)
    assert coefficients.dtype == np.float64 and coefficients.shape == want_shape, (
        f"coefficients {coefficients.dtype}{coefficients.shape}, want float64{want_shape}"
    )
    upstream, u = random_weights(rng, case.a.dtype, rows, optional=False)
    case.info.append(f"upstream {np.shape(u)}")
    grads = kernels.embedding_grad_cpu(
        *random_layouts(rng, case, case.a, case.b, coefficients), upstream, case.distance
    )
    check_embedding_grads(case, grads, want_grads, grad_sizes, u)


def run_embedding_reduced(kernels, rng, case):
    weights, w, reduction, loss_scale = random_reduction(rng, case, case.a.dtype, case.a.shape[:-1])
    loss, grad_a, grad_b, scale = kernels.embedding_loss_reduced_cpu(
        *random_layouts(rng, case, case.labels, case.a, case.b),
        weights,
        case.margin,
        case.distance,
        reduction,
        loss_scale,
        case.similar_label,
    )
    per_row, want_grads, loss_size, grad_sizes = embedding_reference(case)
    factor = check_reduction(
        w, reduction, loss_scale, loss, scale, per_row, loss_size, case.a.dtype
    )
    check_embedding_grads(case, (grad_a, grad_b), want_grads, grad_sizes, factor)


class InBatchCase:
    """Class labels [B], embeddings [B, D] (float32 or float64, D = 0 too:
    an empty array NumPy may place at any address), options and the upstream
    gradient [B] or None, as Case."""

    def __init__(
        self,
        labels,
        e,
        upstream,
        margin,
        positive_margin,
        distance,
        weighting,
        max_block_rows,
        miner=None,
    ):
        self.labels, self.e, self.upstream = labels, e, upstream
        self.options = dict(
            margin=margin,
            positive_margin=positive_margin,
            distance=distance,
            pair_weighting=weighting,
            max_block_rows=max_block_rows,
            miner=miner,
        )
        self.info = [
            f"labels {labels.dtype}{labels.shape}",
            f"embeddings {e.dtype}{e.shape}",
            f"upstream {upstream is not None}",
        ] + [f"{k}={v}" for k, v in self.options.items()]


def in_batch_reference(case):
    """Per-anchor losses, the gradient of sum(upstream * loss) (or None) and the
    sizes of their terms, in float64 from explicit pairs, with the kernels'
    conventions: no gradient at d = 0, a zero vector's cosine similarity 0."""
    labels, e = case.labels.astype(np.int64), case.e.astype(np.float64)
    o = case.options
    b = len(labels)
    n = np.sqrt(np.sum(e * e, -1))
    with np.errstate(divide="ignore", invalid="ignore"):
        if o["distance"] == "euclidean":
            diff = e[:, None] - e[None]
            d = np.sqrt(np.sum(diff * diff, -1))
            dd = np.where(d[..., None] > 0, diff / d[..., None], 0)  # dd_ij/de_i
            dd_other = -dd  # dd_ij/de_j
            dd_size = np.ones_like(dd)
        else:
            norms = n[:, None] * n[None]
            ok = norms > 0
            s = np.where(ok, (e @ e.T) / norms, 0)
            d = 1 - s
            dd = np.where(
                ok[..., None],
                -e[None] / norms[..., None] + s[..., None] * e[:, None] / (n * n)[:, None, None],
                0,
            )
            dd_other = np.swapaxes(dd, 0, 1)
            # The terms of dd, which cancel for parallel rows.
            dd_size = np.where(
                ok[..., None],
                np.abs(e[None]) / norms[..., None] + np.abs(e[:, None]) / (n * n)[:, None, None],
                0,
            )
    others = ~np.eye(b, dtype=bool)
    same = labels[:, None] == labels[None]
    pos, neg = same & others, ~same & others
    positive_margin, margin = (
        np.float64(case.e.dtype.type(o[name])) for name in ("positive_margin", "margin")
    )
    hp = np.maximum(d - positive_margin, 0)
    hn = np.maximum(margin - d, 0)
    inv = lambda c: np.divide(1.0, c, out=np.zeros(b), where=c > 0)  # noqa: E731
    # "active" counts the terms that are not 0. A hinge within rounding of
    # its edge may count either way, and changes every weight of its anchor:
    # the values of such a case are not checked (it still runs, for the
    # sanitizers).
    edge = np.finfo(case.e.dtype).eps * 64 * (1 + np.abs(d))
    unsure = o["pair_weighting"] == "active" and bool(
        (pos & (np.abs(d - positive_margin) <= edge)).any()
        or (neg & (np.abs(margin - d) <= edge)).any()
    )
    # A miner's choice among these duplicate-heavy rows is a rounding
    # question (ties of Gram distances): mined cases run for the sanitizers
    # only; tests/in_batch/test_in_batch_miners.py checks their values
    # against explicit pairs.
    unsure = unsure or o["miner"] is not None
    if o["pair_weighting"] == "uniform":
        wp = wn = np.full(b, 1.0 / max(b - 1, 1))
    elif o["pair_weighting"] == "active":
        wp, wn = inv((pos & (hp > 0)).sum(1)), inv((neg & (hn > 0)).sum(1))
    else:
        wp, wn = inv(pos.sum(1)), inv(neg.sum(1))
    terms = wp[:, None] * np.where(pos, hp * hp, 0) + wn[:, None] * np.where(neg, hn * hn, 0)
    size = wp[:, None] * np.where(pos, (d + 1) ** 2, 0) + wn[:, None] * np.where(neg, 1 + hn, 0)
    if case.upstream is None:
        return terms.sum(1), None, size.sum(1), None, unsure
    g = case.upstream.astype(np.float64)
    c = g[:, None] * (
        np.where(pos, 2 * hp * wp[:, None], 0) - np.where(neg, 2 * hn * wn[:, None], 0)
    )
    grad = np.einsum("ij,ijk->ik", c, dd) + np.einsum("ji,jik->ik", c, dd_other)
    # A hinge the kernel finds active by a rounding of d counts too.
    scale = (
        np.abs(g)[:, None]
        * 2
        * (np.where(pos, wp[:, None] * (hp + 1), 0) + np.where(neg, wn[:, None] * (hn + 1), 0))
    )
    grad_size = np.einsum("ij,ijk->ik", scale, dd_size) + np.einsum(
        "ji,jik->ik", scale, np.swapaxes(dd_size, 0, 1)
    )
    return terms.sum(1), grad, size.sum(1), grad_size, unsure


def random_in_batch_case(rng, weightings, miners):
    b = int(rng.choice([0, 1, 2, int(rng.integers(3, 40))]))
    dim = int(rng.choice([0, 1, int(rng.integers(2, 12))]))
    dtype = np.dtype(str(rng.choice(["float32", "float64"])))
    e = rng.standard_normal((b, dim)) / np.sqrt(max(dim, 1))
    special = rng.integers(8, size=b)
    e[special == 0] = 0  # zero vectors
    if b > 1:
        e[special == 1] = e[0]  # duplicates of row 0
    labels = np.asarray(rng.integers(0, 3, size=b), str(rng.choice(["int32", "int64"])))
    upstream = rng.uniform(0, 2, size=b).astype(dtype) if rng.random() < 0.6 else None
    return InBatchCase(
        labels,
        e.astype(dtype),
        upstream,
        random_margin(rng),
        random_margin(rng),
        str(rng.choice(["euclidean", "cosine"])),
        str(rng.choice(weightings)),
        int(rng.choice([0, 1, 3, 16])),
        None if rng.random() < 0.5 else str(rng.choice(miners)),
    )


def run_in_batch(kernels, rng, case):
    arrays = random_layouts(rng, case, case.labels, case.e)
    upstream = None
    if case.upstream is not None:
        (upstream,) = random_layouts(rng, case, case.upstream)
    loss, grad = kernels.in_batch_loss_cpu(*arrays, upstream, **case.options)
    want_loss, want_grad, loss_size, grad_size, unsure = in_batch_reference(case)
    if case.upstream is None:
        assert grad is None, "a gradient without upstream"
    if unsure:
        assert loss.shape == want_loss.shape and loss.dtype == case.e.dtype, "loss shape or dtype"
        return
    # Gram-form distances cancel: errors are relative to the terms' size.
    check_close("loss", loss, want_loss, loss_size, case.e.dtype, slack=50)
    if case.upstream is not None:
        check_close("grad", grad, want_grad, grad_size, case.e.dtype, slack=200)


# The kinds of random case, taken in turn: (make a case, run it).
def case_kinds(kernels):
    """(make a case from an rng, run it) for each kind of random case."""
    embedding_case = functools.partial(
        random_embedding_case, distances=list(kernels.row_coefficients)
    )
    return [
        (random_case, run_per_sample),
        (random_case, run_reduced),
        (embedding_case, run_embedding),
        (embedding_case, run_embedding_reduced),
        (
            functools.partial(
                random_in_batch_case, weightings=kernels.PAIR_WEIGHTINGS, miners=kernels.MINERS
            ),
            run_in_batch,
        ),
    ]


NOT_AN_ARRAY = "incompatible function arguments"


class Unconvertible:
    """An array-like whose conversion fails."""

    def __array__(self, dtype=None, copy=None):
        raise RuntimeError("no array here")


def invalid_calls(kernels):
    """(description, call, exception class, text the message must hold)."""
    f4, y = np.ones(3, np.float32), np.ones(3, np.float32)
    cpu, reduced = kernels.contrastive_loss_cpu, kernels.contrastive_loss_reduced_cpu
    e4, c4 = np.ones((3, 4), np.float32), np.ones((3, 1))  # 3 pairs of 4, their coefficients
    loss, grad = kernels.embedding_loss_cpu, kernels.embedding_grad_cpu
    e_reduced = kernels.embedding_loss_reduced_cpu
    in_batch = kernels.in_batch_loss_cpu
    return [
        (
            "bad distance",
            lambda: loss(y, e4, e4, 1.0, "l2"),
            ValueError,
            "distance must be one of 'euclidean', 'cosine', 'manhattan', got 'l2'",
        ),
        ("bad distance of grad", lambda: grad(e4, e4, c4, f4, "cos"), ValueError, "distance"),
        (
            "bad distance of reduced",
            lambda: e_reduced(y, e4, e4, distance=""),
            ValueError,
            "distance",
        ),
        (
            "a/b shape mismatch",
            lambda: loss(y, e4, np.ones((3, 5), np.float32)),
            ValueError,
            "embeddings_a and embeddings_b must have the same shape",
        ),
        ("a/b shape mismatch of grad", lambda: grad(e4, e4[:2], c4, f4), ValueError, "same shape"),
        (
            "a/b dtype mismatch",
            lambda: e_reduced(y, e4, e4.astype(np.float16)),
            TypeError,
            "embeddings_b must have the dtype of embeddings_a",
        ),
        (
            "labels shape",
            lambda: loss(np.ones(4, np.float32), e4, e4),
            ValueError,
            "embeddings_a.shape[:-1] and labels must have the same shape",
        ),
        ("labels of one pair", lambda: e_reduced(y, f4, f4), ValueError, "same shape"),
        ("D = 0", lambda: loss(y, e4[:, :0], e4[:, :0]), ValueError, "non-empty last axis"),
        (
            "0-d embeddings",
            lambda: grad(*[np.ones((), np.float32)] * 2, c4, f4[0]),
            ValueError,
            "rank >= 1",
        ),
        (
            "int embeddings",
            lambda: loss(y, e4.astype(np.int32), e4.astype(np.int32)),
            TypeError,
            "embeddings_a must be float16, bfloat16, float32 or float64",
        ),
        (
            "coefficients of euclidean to cosine",
            lambda: grad(e4, e4, c4, f4, "cosine"),
            ValueError,
            "coefficients must have shape (3, 5)",
        ),
        (
            "coefficients of other rows",
            lambda: grad(e4, e4, c4[:2], f4),
            ValueError,
            "coefficients must have shape (3, 1)",
        ),
        (
            "float32 coefficients",
            lambda: grad(e4, e4, c4.astype(np.float32), f4),
            TypeError,
            "coefficients must be float64, got float32",
        ),
        (
            "upstream shape",
            lambda: grad(e4, e4, c4, np.ones(4, np.float32)),
            ValueError,
            "embeddings_a.shape[:-1] and upstream must have the same shape",
        ),
        ("upstream per element", lambda: grad(e4, e4, c4, e4), ValueError, "upstream"),
        (
            "upstream of another dtype",
            lambda: grad(e4, e4, c4, np.ones(3)),
            TypeError,
            "upstream must have the dtype of embeddings_a (float32), got float64",
        ),
        ("no upstream", lambda: grad(e4, e4, c4, None), TypeError, "upstream"),
        (
            "embedding weights shape",
            lambda: e_reduced(y, e4, e4, np.ones(4, np.float32)),
            ValueError,
            "sample_weight",
        ),
        ("embedding negative margin", lambda: loss(y, e4, e4, -1.0), ValueError, "margin"),
        ("negative margin", lambda: cpu(y, f4, -1.0), ValueError, "margin"),
        ("nan margin", lambda: reduced(y, f4, None, float("nan")), ValueError, "margin"),
        ("infinite margin", lambda: cpu(y, f4, float("inf")), ValueError, "margin"),
        ("similar_label 2", lambda: cpu(y, f4, similar_label=2), ValueError, "similar_label"),
        ("similar_label -1", lambda: reduced(y, f4, similar_label=-1), ValueError, "similar_label"),
        ("bad reduction", lambda: reduced(y, f4, None, 1.0, "avg"), ValueError, "reduction"),
        ("shape mismatch", lambda: cpu(np.ones(4, np.float32), f4), ValueError, "same shape"),
        ("0-d vs 1-d", lambda: cpu(np.ones((), np.float32), f4), ValueError, "same shape"),
        (
            "weight shape",
            lambda: reduced(y, f4, np.ones(2, np.float32)),
            ValueError,
            "sample_weight",
        ),
        ("int distances", lambda: cpu(y, np.ones(3, np.int32)), TypeError, "distances"),
        ("bool distances", lambda: reduced(y, np.ones(3, bool)), TypeError, "distances"),
        ("uint8 labels", lambda: cpu(np.ones(3, np.uint8), f4), TypeError, "labels"),
        ("complex labels", lambda: cpu(np.ones(3, np.complex64), f4), TypeError, "labels"),
        ("object distances", lambda: cpu(y, np.ones(3, object)), TypeError, "distances"),
        ("string labels", lambda: cpu(np.array(["a", "b", "c"]), f4), TypeError, "labels"),
        (
            "weights of another dtype",
            lambda: reduced(y, f4, np.ones(3)),
            TypeError,
            "sample_weight",
        ),
        ("weights from a Python float", lambda: reduced(y, f4, 0.5), TypeError, "sample_weight"),
        (
            "unconvertible weights",
            lambda: reduced(y, f4, Unconvertible()),
            TypeError,
            "sample_weight",
        ),
        (
            "ragged weights",
            lambda: reduced(
                np.ones((2, 1), np.float32), np.ones((2, 1), np.float32), [[1.0], [1.0, 2.0]]
            ),
            TypeError,
            "sample_weight",
        ),
        ("string weights", lambda: reduced(y, f4, "abc"), TypeError, "sample_weight"),
        ("object weights", lambda: reduced(y, f4, [None, 1, 2]), TypeError, "sample_weight"),
        # labels and distances must already be arrays: pybind11 refuses the rest.
        ("unconvertible labels", lambda: cpu(Unconvertible(), f4), TypeError, NOT_AN_ARRAY),
        ("ragged labels", lambda: reduced([[1.0], [1.0, 2.0]], f4), TypeError, NOT_AN_ARRAY),
        ("list distances", lambda: cpu(y, [1.0, 2.0, 3.0]), TypeError, NOT_AN_ARRAY),
        (
            "in-batch negative positive_margin",
            lambda: in_batch(y, e4, positive_margin=-1.0),
            ValueError,
            "positive_margin must be",
        ),
        (
            "in-batch negative max_block_rows",
            lambda: in_batch(y, e4, max_block_rows=-5),
            ValueError,
            "max_block_rows must be >= 0",
        ),
        ("in-batch 3-d embeddings", lambda: in_batch(y, e4[None]), ValueError, "[B, D]"),
        (
            "in-batch float16 embeddings",
            lambda: in_batch(y, e4.astype(np.float16)),
            TypeError,
            "float32 or float64",
        ),
        ("in-batch float labels", lambda: in_batch(y, e4), TypeError, "class ids"),
        (
            "in-batch labels of other rows",
            lambda: in_batch(np.ones(4, np.int64), e4),
            ValueError,
            "same shape",
        ),
        (
            "in-batch upstream of another dtype",
            lambda: in_batch(np.ones(3, np.int64), e4, np.ones(3)),
            TypeError,
            "upstream",
        ),
        (
            "in-batch manhattan",
            lambda: in_batch(np.ones(3, np.int64), e4, distance="manhattan"),
            ValueError,
            "no 'manhattan' distance",
        ),
    ]


def check_raises(call, error, text):
    try:
        call()
    except error as e:
        assert text in str(e), f"{type(e).__name__} without {text!r}: {e}"
        return
    except Exception as e:  # noqa: BLE001 - any other class is the failure
        raise AssertionError(f"raised {type(e).__name__} ({e}), want {error.__name__}") from e
    raise AssertionError(f"no exception, want {error.__name__}")


def reproducer_cases(kernels):
    """The inputs that once crashed or gave garbage: each must give exactly
    the result of its plain native, aligned twin."""
    cpu = kernels.contrastive_loss_cpu
    d = np.array([0.5, 0.3, 2.0, 1.5])
    f4, ones = d.astype(np.float32), np.ones(4, np.float32)

    def same_result(labels, distances, twin_labels, twin_distances):
        for got, want in zip(cpu(labels, distances), cpu(twin_labels, twin_distances)):
            assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), (
                f"got {got!r}, want {want!r}"
            )

    def same_in_batch(e, twin):
        labels = np.array([0, 1, 0])
        for got, want in zip(
            kernels.in_batch_loss_cpu(labels, e, np.ones(3, e.dtype)),
            kernels.in_batch_loss_cpu(labels, twin, np.ones(3)),
        ):
            assert got.tobytes() == want.tobytes(), f"got {got!r}, want {want!r}"

    def at_offset(values, dtype, offset):
        return np.frombuffer(
            b"\0" * offset + np.asarray(values, dtype).tobytes(), dtype, offset=offset
        )

    return [
        ("big-endian float32 distances", lambda: same_result(ones, d.astype(">f4"), ones, f4)),
        (
            "big-endian int64 labels",
            lambda: same_result(np.array([1, 0, 1, 0], ">i8"), f4, np.array([1, 0, 1, 0]), f4),
        ),
        (
            "float32 distances at byte offset 1",
            lambda: same_result(ones, at_offset(d, np.float32, 1), ones, f4),
        ),
        (
            "float64 labels and distances at byte offset 4",
            lambda: same_result(
                at_offset([1, 0, 1, 0], np.float64, 4),
                at_offset(d, np.float64, 4),
                np.array([1.0, 0, 1, 0]),
                d,
            ),
        ),
        (
            "bool bytes 02 01 00 ff",
            lambda: same_result(
                np.frombuffer(b"\x02\x01\x00\xff", np.bool_),
                f4,
                np.array([True, True, False, True]),
                f4,
            ),
        ),
        # NumPy marks empty arrays aligned wherever they point.
        (
            "in-batch [3, 0] float64 embeddings at byte offset 1",
            lambda: same_in_batch(at_offset([], np.float64, 1).reshape(3, 0), np.zeros((3, 0))),
        ),
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("module_dir", type=Path, help="directory holding the _kernels module")
    parser.add_argument("--seconds", type=float, default=5.0, help="how long to fuzz")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sys.path.insert(0, str(args.module_dir.resolve()))
    import _kernels as kernels

    if Path(kernels.__file__).resolve().parent != args.module_dir.resolve():
        sys.exit(f"imported {kernels.__file__}, not a module from {args.module_dir}")

    cases = failures = 0

    def attempt(describe, check):
        nonlocal cases, failures
        cases += 1
        try:
            check()
        except Exception as e:  # noqa: BLE001 - every failure is reported, then counted
            failures += 1
            print(f"FAIL {describe()}: {type(e).__name__}: {e}", flush=True)

    for description, check in reproducer_cases(kernels):
        attempt(lambda: description, check)
    for description, call, error, text in invalid_calls(kernels):
        attempt(lambda: description, lambda: check_raises(call, error, text))

    deadline = time.monotonic() + args.seconds
    kinds = case_kinds(kernels)
    index = 0
    per_kind = collections.Counter()
    while time.monotonic() < deadline:
        rng = np.random.default_rng([args.seed, index])
        make, run = kinds[index % len(kinds)]
        case = make(rng)
        per_kind[run.__name__] += 1
        attempt(
            lambda: f"seed {args.seed} case {index} ({run.__name__}: {', '.join(case.info)})",
            lambda: run(kernels, rng, case),
        )
        index += 1

    print("random cases: " + ", ".join(f"{n} {kind}" for kind, n in per_kind.items()))
    print(f"fuzz: {cases} cases, {failures} failures", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
