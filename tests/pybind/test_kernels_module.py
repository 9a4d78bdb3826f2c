"""The pybind11 kernel module's boundary: whatever Python hands it, the kernels
get native-endian, aligned, C-contiguous arrays of the shape they are told, or
the call raises TypeError/ValueError naming the argument. It never crashes."""

import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf
from support import (
    DISTANCE_DTYPES,
    LABEL_DTYPES,
    numpy_contrastive_loss,
    random_distances,
    random_labels,
    run_python,
)

from fused_contrastive import _distances_ops, _kernels, contrastive_loss
from fused_contrastive._inputs import prepare_inputs

DISTANCES = np.array([0.5, 0.3, 2.0, 1.5])
LABELS = np.array([1, 0, 1, 0])


def outcomes_in_subprocess(calls):
    """What each call does in a fresh process, so that a crash fails the test
    instead of killing pytest. Calls are Python expressions over `k` (the
    module file imported here, loaded without TensorFlow), `np`, `f4` and
    `Unconvertible`. Returns, per call, 'returned' or 'ExceptionName: message'
    plus ' (from CauseName)' for a chained cause."""
    result = run_python(
        f"""
        import importlib.util
        import numpy as np
        spec = importlib.util.spec_from_file_location("_kernels", {_kernels.__file__!r})
        k = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(k)

        class Unconvertible:
            def __array__(self, dtype=None, copy=None):
                raise RuntimeError("no array here")

        f4 = np.ones(2, np.float32)
        for call in {list(calls)!r}:
            try:
                eval(call)
                print("returned", flush=True)
            except Exception as e:
                cause = " (from " + type(e.__cause__).__name__ + ")" if e.__cause__ else ""
                print(type(e).__name__ + ": " + " ".join(str(e).split()) + cause, flush=True)
    """,
        timeout=120,
    )
    assert result.returncode == 0, f"exit status {result.returncode}\n{result.stderr}"
    return dict(zip(calls, result.stdout.splitlines(), strict=True))


def test_arguments_that_cannot_become_arrays_raise_instead_of_crashing():
    reduced = "k.contrastive_loss_reduced_cpu"
    not_an_array = "cannot be converted to a NumPy array"
    # (call, start and end of its outcome)
    want = {
        f"{reduced}(f4, f4, Unconvertible())": (
            f"TypeError: sample_weight {not_an_array}",
            "(from RuntimeError)",
        ),
        f"{reduced}(f4, f4, [[1.0], [1.0, 2.0]])": (
            f"TypeError: sample_weight {not_an_array}",
            "(from ValueError)",
        ),
        f"{reduced}(f4, f4, [None, 1.0])": (
            "TypeError: sample_weight: unsupported dtype object",
            "",
        ),
        f"{reduced}(f4, f4, 'ab')": ("TypeError: sample_weight: unsupported dtype", ""),
        # labels and distances must be arrays already; pybind11 lists the signature.
        f"{reduced}(Unconvertible(), f4)": (
            "TypeError: contrastive_loss_reduced_cpu(): incompatible function arguments",
            "",
        ),
        "k.contrastive_loss_cpu(f4, [[1.0], [1.0, 2.0]])": (
            "TypeError: contrastive_loss_cpu(): incompatible function arguments",
            "",
        ),
        "k.embedding_grad_cpu(f4, f4, np.zeros(1), Unconvertible())": (
            f"TypeError: upstream {not_an_array}",
            "(from RuntimeError)",
        ),
        "k.embedding_loss_reduced_cpu(np.ones(()), f4, f4, Unconvertible())": (
            f"TypeError: sample_weight {not_an_array}",
            "(from RuntimeError)",
        ),
    }
    got = outcomes_in_subprocess(want)
    for call, (start, end) in want.items():
        assert got[call].startswith(start) and got[call].endswith(end), (call, got[call])


def test_sample_weight_of_another_dtype_names_both():
    with pytest.raises(TypeError, match=r"sample_weight .* distances \(float32\), got float64"):
        _kernels.contrastive_loss_reduced_cpu(
            np.ones(2, np.float32), np.ones(2, np.float32), np.ones(2)
        )


def _assert_same_results(got, want):
    for g, w in zip(got, want, strict=True):
        g, w = np.asarray(g), np.asarray(w)
        assert g.dtype == w.dtype and g.dtype.isnative and g.shape == w.shape
        assert g.tobytes() == w.tobytes(), (g, w)


@pytest.mark.parametrize("label_dtype", ["int32", "int64", "float16", "float32", "float64"])
@pytest.mark.parametrize("distance_dtype", ["float16", "float32", "float64"])
def test_big_endian_inputs_give_the_native_results(label_dtype, distance_dtype):
    y, d = LABELS.astype(label_dtype), DISTANCES.astype(distance_dtype)
    w = np.array([0.5, 1.0, 2.0, 0.25], distance_dtype)
    big = lambda a: a.astype(a.dtype.newbyteorder(">"))  # noqa: E731
    _assert_same_results(
        _kernels.contrastive_loss_cpu(big(y), big(d), 0.9), _kernels.contrastive_loss_cpu(y, d, 0.9)
    )
    _assert_same_results(
        _kernels.contrastive_loss_reduced_cpu(big(y), big(d), big(w), 0.9, "weighted_mean"),
        _kernels.contrastive_loss_reduced_cpu(y, d, w, 0.9, "weighted_mean"),
    )
    _assert_same_results(
        _kernels.contrastive_loss_reduced_cpu(y, d, big(w[:1].reshape(())), 0.9, "sum"),
        _kernels.contrastive_loss_reduced_cpu(y, d, w[:1].reshape(()), 0.9, "sum"),
    )


def _at_offset(a, offset):
    """The values of `a` in a read-only view `offset` bytes into a buffer, as
    np.frombuffer gives them."""
    return np.frombuffer(b"\0" * offset + a.tobytes(), a.dtype, offset=offset).reshape(a.shape)


# Misaligned pointers are undefined behaviour that x86 forgives, so these
# results matched before the fix too; tests/packaging/test_sanitizers.py is what sees
# such a pointer reach the kernel (UBSan: "load of misaligned address").
@pytest.mark.parametrize(
    "dtype, offset", [("float32", 1), ("float64", 4), ("float64", 7), ("float16", 1)]
)
def test_misaligned_views_give_the_aligned_results(rng, dtype, offset):
    y = rng.integers(0, 2, 1001).astype("int64")
    d = rng.uniform(0, 2, 1001).astype(dtype)
    w = rng.uniform(0, 2, 1001).astype(dtype)
    assert not _at_offset(d, offset).flags.aligned
    _assert_same_results(
        _kernels.contrastive_loss_cpu(_at_offset(y, offset), _at_offset(d, offset)),
        _kernels.contrastive_loss_cpu(y, d),
    )
    _assert_same_results(
        _kernels.contrastive_loss_reduced_cpu(
            _at_offset(y, offset),
            _at_offset(d, offset),
            _at_offset(w, offset),
            1.0,
            "weighted_mean",
        ),
        _kernels.contrastive_loss_reduced_cpu(y, d, w, 1.0, "weighted_mean"),
    )


def test_bool_labels_read_any_nonzero_byte_as_true():
    labels = np.frombuffer(b"\x02\x01\x00\xff", np.bool_)
    d = DISTANCES.astype(np.float32)
    want = np.array([True, True, False, True])
    _assert_same_results(
        _kernels.contrastive_loss_cpu(labels, d), _kernels.contrastive_loss_cpu(want, d)
    )
    _assert_same_results(
        _kernels.contrastive_loss_reduced_cpu(labels, d, None, 1.0, "sum"),
        _kernels.contrastive_loss_reduced_cpu(want, d, None, 1.0, "sum"),
    )


def test_every_bool_byte_on_the_vectorised_path(rng):
    raw = rng.permutation(np.repeat(np.arange(256, dtype=np.uint8), 8))
    d = rng.uniform(0, 2, raw.size).astype(np.float32)
    _assert_same_results(
        _kernels.contrastive_loss_cpu(raw.view(np.bool_), d, similar_label=0),
        _kernels.contrastive_loss_cpu(raw != 0, d, similar_label=0),
    )


@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (2, 3)])
def test_scalar_and_empty_shapes(shape):
    y, d = np.ones(shape, np.float32), np.full(shape, 0.5, np.float32)
    loss, grad = _kernels.contrastive_loss_cpu(y, d)
    assert loss.shape == grad.shape == shape
    np.testing.assert_array_equal(loss, np.full(shape, 0.25, np.float32))
    loss, grad, scale = _kernels.contrastive_loss_reduced_cpu(y, d, None, 1.0, "sum")
    assert loss.shape == () and grad.shape == shape and scale == 1.0
    assert loss == np.float32(0.25 * np.prod(shape, dtype=int))


class FakeCudaArray:
    """Describes device memory that is never touched: every case below must
    be rejected before anything reaches the GPU."""

    def __init__(self, shape=(4,), typestr="<f4", data=0x10000, strides=None, readonly=False):
        self.__cuda_array_interface__ = {
            "shape": shape,
            "typestr": typestr,
            "data": (data, readonly),
            "strides": strides,
            "version": 3,
        }


CUDA_ENTRY_POINTS = {
    "contrastive_loss_cuda": ("labels", 4),
    "contrastive_loss_reduced_cuda": ("labels", 7),
    "scale_cuda": ("gradient", 3),
    "embedding_loss_cuda": ("labels", 5),
    "embedding_grad_cuda": ("embeddings_a", 6),
    "embedding_loss_reduced_cuda": ("labels", 9),
    # The in-batch entries read the embeddings first: they give the rows.
    "in_batch_loss_cuda": ("embeddings", 6),
    "in_batch_loss_reduced_cuda": ("embeddings", 7),
}
BAD_CUDA_ARRAYS = {
    "extent overflow": (dict(shape=(2**62, 8)), ValueError, "more bytes than int64"),
    "byte count overflow": (
        dict(shape=(2**61,), typestr="<f8"),
        ValueError,
        "more bytes than int64",
    ),
    "negative extent": (dict(shape=(4, -1)), ValueError, "negative extent"),
    "misaligned pointer": (dict(data=0x10002), ValueError, "not aligned to its 4-byte"),
    "null pointer": (dict(data=0), ValueError, "null data pointer"),
    "strides of another rank": (dict(strides=(4, 4)), ValueError, "strides and shape"),
    "big-endian typestr": (dict(typestr=">f4"), TypeError, "native byte order"),
    "malformed shape": (dict(shape=("a",)), TypeError, "malformed"),
}
needs_cuda = pytest.mark.skipif(
    not _kernels.has_cuda, reason="module built without CUDA (CI builds it with nvcc)"
)


@needs_cuda
@pytest.mark.parametrize("entry_point", CUDA_ENTRY_POINTS)
@pytest.mark.parametrize("case", BAD_CUDA_ARRAYS)
def test_cuda_entry_points_reject_bad_array_interfaces(entry_point, case):
    interface, error, text = BAD_CUDA_ARRAYS[case]
    first_argument, arrays = CUDA_ENTRY_POINTS[entry_point]
    with pytest.raises(error, match=f"{first_argument}: .*{text}"):
        getattr(_kernels, entry_point)(*[FakeCudaArray(**interface)] * arrays)


def _reduced_cuda_arrays(n=4, **replace):
    """Valid fake arguments of contrastive_loss_reduced_cuda, some replaced."""
    arrays = dict(
        labels=FakeCudaArray((n,)),
        distances=FakeCudaArray((n,)),
        sample_weight=FakeCudaArray(()),
        loss=FakeCudaArray(()),
        grad=FakeCudaArray((n,)),
        reduction_scale=FakeCudaArray((), "<f8"),
        workspace=FakeCudaArray((_kernels.reduced_workspace_bytes(n),), "|u1"),
    )
    return {**arrays, **replace}


@needs_cuda
@pytest.mark.parametrize(
    "replace, message",
    [
        (
            dict(workspace=FakeCudaArray((1 << 20,), "|u1", data=0x10004)),
            "workspace must be aligned to 8 bytes",
        ),
        (
            dict(workspace=FakeCudaArray((1 << 20,), "|u1", readonly=True)),
            "reduction_scale and workspace must be writable",
        ),
        (
            dict(reduction_scale=FakeCudaArray((), "<f8", readonly=True)),
            "reduction_scale and workspace must be writable",
        ),
    ],
)
def test_cuda_reduced_rejects_unusable_scratch_arrays(replace, message):
    with pytest.raises(ValueError, match=message):
        _kernels.contrastive_loss_reduced_cuda(**_reduced_cuda_arrays(**replace))


def _in_batch_cuda_arrays(rows=4, dim=3, **replace):
    """Fake arguments of in_batch_loss_cuda, some replaced; every use below
    must fail its checks (the arrays point nowhere)."""
    arrays = dict(
        labels=FakeCudaArray((rows,), "<i8"),
        embeddings=FakeCudaArray((rows, dim)),
        upstream=FakeCudaArray((rows,)),
        loss=FakeCudaArray((rows,)),
        grad=FakeCudaArray((rows, dim)),
        workspace=FakeCudaArray((_kernels.in_batch_workspace_bytes(rows),), "|u1"),
    )
    return {**arrays, **replace}


@needs_cuda
@pytest.mark.parametrize(
    "replace, error, message",
    [
        (dict(labels=FakeCudaArray((4,), "<i4")), TypeError, "labels must be int64 class ids"),
        (dict(labels=FakeCudaArray((5,), "<i8")), ValueError, "labels must have the same shape"),
        (dict(embeddings=FakeCudaArray((4,))), ValueError, r"embeddings must have shape \[B, D\]"),
        (dict(embeddings=FakeCudaArray((4, 3), "<f2")), TypeError, "float32 or float64"),
        (dict(grad=None), ValueError, "upstream and grad must be given together"),
        (dict(upstream=FakeCudaArray((4,), "<f8")), TypeError, "upstream must have the dtype"),
        (dict(grad=FakeCudaArray((4, 3), readonly=True)), ValueError, "grad must be writable"),
        (dict(loss=FakeCudaArray((3,))), ValueError, "loss must have the same shape"),
        (
            dict(workspace=FakeCudaArray((1,), "|u1")),
            ValueError,
            "workspace is smaller than in_batch_workspace_bytes",
        ),
    ],
)
def test_cuda_in_batch_rejects_inconsistent_arrays(replace, error, message):
    with pytest.raises(error, match=message):
        _kernels.in_batch_loss_cuda(**_in_batch_cuda_arrays(**replace))


@needs_cuda
def test_cuda_in_batch_reduced_rejects_a_small_workspace():
    rows, dim = 4, 3
    with pytest.raises(ValueError, match="in_batch_reduced_workspace_bytes"):
        _kernels.in_batch_loss_reduced_cuda(
            FakeCudaArray((rows,), "<i8"),
            FakeCudaArray((rows, dim)),
            FakeCudaArray(()),
            FakeCudaArray(()),
            FakeCudaArray((rows, dim)),
            FakeCudaArray((), "<f8"),
            FakeCudaArray((_kernels.in_batch_reduced_workspace_bytes(rows) - 1,), "|u1"),
        )


@needs_cuda
@pytest.mark.parametrize("entry", ["in_batch_workspace_bytes", "in_batch_reduced_workspace_bytes"])
def test_cuda_in_batch_cosine_workspace_holds_a_scaled_copy(entry):
    """Cosine rows of extreme scale are divided by 2^k into the workspace
    (issue 18 item 6): the cosine workspace holds rows·dim more values, and
    the Euclidean size is refused for cosine embeddings."""
    size = getattr(_kernels, entry)
    rows, dim = 40, 33
    for dtype, element in (("float32", 4), ("float64", 8)):
        euclidean = size(rows, dtype, 0, dim, "euclidean")
        assert euclidean == size(rows, dtype)
        assert size(rows, dtype, 0, dim, "cosine") >= euclidean + rows * dim * element
    with pytest.raises(ValueError, match="dim must be non-negative"):
        size(rows, "float32", 0, -1, "cosine")
    with pytest.raises(ValueError, match="max_block_rows must be >= 0"):
        size(rows, "float32", -5, dim, "cosine")
    with pytest.raises(ValueError, match="in-batch loss has no 'manhattan' distance"):
        size(rows, "float32", 0, dim, "manhattan")
    cosine = dict(
        distance="cosine",
        embeddings=FakeCudaArray((rows, dim)),
        labels=FakeCudaArray((rows,), "<i8"),
    )
    if entry == "in_batch_workspace_bytes":
        arrays = _in_batch_cuda_arrays(
            rows,
            dim,
            **cosine,
            workspace=FakeCudaArray((size(rows, "float32", 0, dim, "euclidean"),), "|u1"),
        )
        with pytest.raises(ValueError, match="workspace is smaller than in_batch_workspace_bytes"):
            _kernels.in_batch_loss_cuda(**arrays)
    else:
        with pytest.raises(ValueError, match="in_batch_reduced_workspace_bytes"):
            _kernels.in_batch_loss_reduced_cuda(
                FakeCudaArray((rows,), "<i8"),
                FakeCudaArray((rows, dim)),
                FakeCudaArray(()),
                FakeCudaArray(()),
                FakeCudaArray((rows, dim)),
                FakeCudaArray((), "<f8"),
                FakeCudaArray((size(rows, "float32", 0, dim, "euclidean"),), "|u1"),
                distance="cosine",
            )


# --- the pybind11 kernels compute what the TensorFlow ops compute --------------


@pytest.mark.parametrize("label_dtype", LABEL_DTYPES)
@pytest.mark.parametrize("distance_dtype", DISTANCE_DTYPES)
def test_pybind_kernel_equals_tf_op_bit_for_bit(rng, label_dtype, distance_dtype):
    y = random_labels(rng, (3, 17), label_dtype)
    d = random_distances(rng, (3, 17), distance_dtype)
    for similar_label in (1, 0):
        op_loss, op_grad = _distances_ops.loss_and_grad(*prepare_inputs(y, d), 0.9, similar_label)
        # bfloat16 tensors come back as ml_dtypes.bfloat16 arrays.
        loss, grad = _kernels.contrastive_loss_cpu(y.numpy(), d.numpy(), 0.9, similar_label)
        assert loss.dtype == op_loss.numpy().dtype and loss.shape == (3, 17)
        assert loss.tobytes() == op_loss.numpy().tobytes()
        assert grad.tobytes() == op_grad.numpy().tobytes()


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_16_bit_conversions_over_every_bit_pattern(dtype):
    # Label 1, margin 0: the float32 loss and gradient are d*d and 2*d, exact for
    # every 16-bit input (the hinge term has weight 0: it contributes exactly 0,
    # even where its square is inf, and NaN only for a NaN d), so this checks both
    # conversions against NumPy's / ml_dtypes' round-to-nearest-even over all
    # 65536 inputs.
    x = np.arange(1 << 16, dtype=np.uint16).view(dtype)
    loss, grad = _kernels.contrastive_loss_cpu(np.ones(x.shape, np.float32), x, 0.0)
    d = x.astype(np.float32)
    hinge = np.maximum(-d, np.float32(0))
    unused = np.where(np.isnan(hinge), np.float32(np.nan), np.float32(0))
    with np.errstate(all="ignore"):
        want_loss = (d * d + unused).astype(dtype)
        want_grad = (np.float32(2) * (d - unused)).astype(dtype)
    for got, want in ((loss, want_loss), (grad, want_grad)):
        nan = np.isnan(want.astype(np.float32))
        np.testing.assert_array_equal(np.isnan(got.astype(np.float32)), nan)
        np.testing.assert_array_equal(got.view(np.uint16)[~nan], want.view(np.uint16)[~nan])


def test_pybind_kernel_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(3,\).*\(4,\)"):
        _kernels.contrastive_loss_cpu(np.zeros(3), np.zeros(4), 1.0)
    with pytest.raises(TypeError, match="distances"):
        _kernels.contrastive_loss_cpu(np.zeros(3), np.zeros(3, np.int32), 1.0)
    with pytest.raises(TypeError, match="uint8"):
        _kernels.contrastive_loss_cpu(np.zeros(3, np.uint8), np.zeros(3), 1.0)
    with pytest.raises(ValueError, match="margin"):
        _kernels.contrastive_loss_cpu(np.zeros(3), np.zeros(3), -1.0)
    with pytest.raises(ValueError, match="similar_label"):
        _kernels.contrastive_loss_cpu(np.zeros(3), np.zeros(3), 1.0, 2)


def test_pybind_kernel_accepts_non_contiguous_arrays(rng):
    y = rng.integers(0, 2, size=(10, 4)).astype(np.float32)
    d = rng.uniform(0, 2, size=(10, 4)).astype(np.float32)
    loss, _ = _kernels.contrastive_loss_cpu(y.T, d.T, 1.0)
    np.testing.assert_array_equal(loss, contrastive_loss(y.T, d.T).numpy())


@pytest.mark.parametrize("reduction", ["sum", "mean", "weighted_mean"])
@pytest.mark.parametrize("weights", ["none", "scalar", "vector"])
def test_pybind_reduced_kernel_equals_tf_op_bit_for_bit(rng, reduction, weights):
    y = random_labels(rng, (70_001,), "int64")
    d = random_distances(rng, (70_001,), "float32")
    w = {
        "none": None,
        "scalar": np.float32(0.6),
        "vector": rng.uniform(0, 2, 70_001).astype(np.float32),
    }[weights]
    for similar_label in (1, 0):
        op_loss, op_grad, op_scale = _distances_ops.reduced_loss_outputs(
            y, d, tf.ones([]) if w is None else w, 0.8, reduction, 0.5, similar_label
        )
        loss, grad, scale = _kernels.contrastive_loss_reduced_cpu(
            y.numpy(),
            d.numpy(),
            None if w is None else np.asarray(w),
            0.8,
            reduction,
            0.5,
            similar_label,
        )
        assert loss.shape == () and loss.dtype == np.float32
        assert loss.tobytes() == op_loss.numpy().tobytes()
        assert grad.tobytes() == op_grad.numpy().tobytes()
        assert scale == float(op_scale)


# --- the embedding kernels (pair embeddings a, b of shape [..., D]) ------------

DISTANCE_KINDS = ["euclidean", "cosine", "manhattan"]
COEFFICIENTS = _kernels.row_coefficients


def test_the_module_names_the_row_coefficients_of_each_distance():
    # Cosine: its 3 coefficients and the 2 scales of its rows (cc/core/pairs/math.h);
    # the GPU check and the fuzzer read the module's numbers.
    assert COEFFICIENTS == {"euclidean": 1, "cosine": 5, "manhattan": 1}


# Relative (and, times the largest value, absolute) tolerance against float64
# NumPy on the same (rounded) inputs: a couple of half-ulps of the stored type,
# whose rounding dominates, or a few ulps of the compute type.
EMBEDDING_TOLERANCE = {"float16": 1e-3, "bfloat16": 8e-3, "float32": 2e-6, "float64": 1e-14}


def numpy_embedding_loss(y, a, b, margin, distance, similar_label=1):
    """Per-row loss and d(loss)/da, d(loss)/db in float64 NumPy, with the
    kernels' conventions at the kinks: no gradient at zero Euclidean distance,
    sign(0) = 0, and a zero vector's cosine similarity is 0 with no gradient.
    Returns (loss, gradients, scales of loss and gradients): the magnitudes of
    the terms each value is computed from, the yardstick of its rounding where
    they cancel (in the hinge, in soft labels' y*d - (1-y)*h and in the cosine
    gradient; in one dimension that gradient is exactly 0)."""
    y = np.asarray(y, np.float64)
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if distance == "euclidean":
        d = np.sqrt(np.sum((a - b) ** 2, -1))
        dd_da = (a - b) / np.where(d == 0, np.inf, d)[..., None]
        dd_db = -dd_da
        terms = np.abs(dd_da), np.abs(dd_db)
    elif distance == "cosine":
        aa, bb = np.sum(a * a, -1)[..., None], np.sum(b * b, -1)[..., None]
        zero = (aa == 0) | (bb == 0)
        norms = np.where(zero, 1, np.sqrt(aa) * np.sqrt(bb))
        aa, bb = np.where(zero, 1, aa), np.where(zero, 1, bb)
        s = np.where(zero, 0, np.sum(a * b, -1)[..., None] / norms)
        d = 1 - s[..., 0]
        dd_da = np.where(zero, 0, -b / norms + s * a / aa)
        dd_db = np.where(zero, 0, -a / norms + s * b / bb)
        terms = np.abs(b) / norms + np.abs(s * a) / aa, np.abs(a) / norms + np.abs(s * b) / bb
    else:
        d = np.sum(np.abs(a - b), -1)
        dd_da = np.sign(a - b)
        dd_db = -dd_da
        terms = np.abs(dd_da), np.abs(dd_db)
    loss = numpy_contrastive_loss(y, d, margin, similar_label)
    y = y if similar_label == 1 else 1 - y
    g = (2 * (y * d - (1 - y) * np.maximum(margin - d, 0)))[..., None]
    loss_scale = np.abs(y) * d * d + np.abs(1 - y) * (margin + d) ** 2
    g_scale = (2 * (np.abs(y) * d + np.abs(1 - y) * (margin + d)))[..., None]
    return loss, (g * dd_da, g * dd_db), (loss_scale, g_scale * terms[0], g_scale * terms[1])


def random_pairs(rng, shape, dtype):
    """Embeddings a, b of `shape`, rounded to `dtype`, rows of varied length."""
    scale = rng.uniform(0.2, 1.5, shape[:-1] + (1,))
    a, b = (rng.standard_normal(shape) * scale for _ in range(2))
    return a.astype(dtype), b.astype(dtype)


def assert_close(got, want, dtype, scale=None):
    """Elementwise within the dtype's tolerance of `want`, or of the largest
    `scale` (by default |want|)."""
    tol = EMBEDDING_TOLERANCE[np.dtype(dtype).name]
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    atol = tol * np.max(np.abs(want) if scale is None else scale, initial=0)
    np.testing.assert_allclose(got, want, rtol=tol, atol=atol)


@pytest.mark.parametrize("distance", DISTANCE_KINDS)
@pytest.mark.parametrize("dtype", DISTANCE_DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 16), (7,), (40, 1)])
def test_embedding_kernels_equal_float64_numpy(rng, distance, dtype, shape):
    a, b = random_pairs(rng, shape, dtype)
    # A similar pair's loss is d²; a margin at the median distance puts half
    # the dissimilar pairs in the hinge.
    squares = numpy_embedding_loss(np.ones(shape[:-1]), a, b, 0.0, distance)[0]
    margin = float(np.sqrt(np.median(squares)))
    for label_dtype in LABEL_DTYPES:
        # np.asarray: a 0-d tensor's numpy() is a NumPy scalar, not an array.
        y = np.asarray(random_labels(rng, shape[:-1], label_dtype).numpy())
        for similar_label in (1, 0):
            want_loss, want_grads, (loss_scale, *scales) = numpy_embedding_loss(
                y, a, b, margin, distance, similar_label
            )
            loss, coefficients = _kernels.embedding_loss_cpu(
                y, a, b, margin, distance, similar_label
            )
            assert loss.dtype == a.dtype and loss.shape == shape[:-1]
            assert coefficients.dtype == np.float64
            assert coefficients.shape == shape[:-1] + (COEFFICIENTS[distance],)
            assert_close(loss, want_loss, dtype, loss_scale)
            per_row = np.asarray(rng.uniform(-2, 2, shape[:-1]), dtype)
            for upstream in (np.ones((), dtype), np.asarray(0.5, dtype), per_row):
                grad_a, grad_b = _kernels.embedding_grad_cpu(a, b, coefficients, upstream, distance)
                assert grad_a.dtype == grad_b.dtype == a.dtype
                assert grad_a.shape == grad_b.shape == shape
                u = np.asarray(upstream, np.float64)[..., None]
                for got, want, scale in zip((grad_a, grad_b), want_grads, scales, strict=True):
                    assert_close(got, u * want, dtype, np.abs(u) * scale)


@pytest.mark.parametrize("distance", DISTANCE_KINDS)
@pytest.mark.parametrize("dtype", DISTANCE_DTYPES)
def test_zero_distances_and_zero_vectors_give_finite_values(rng, distance, dtype):
    a = rng.standard_normal((4, 6)).astype(dtype)
    b = a.copy()
    b[2:] = 0  # rows 2 and 3: b is a zero vector
    a[3] = 0  # row 3: both are
    y = np.array([1, 0, 1, 0], np.float32)
    loss, coefficients = _kernels.embedding_loss_cpu(y, a, b, 0.5, distance)
    grad_a, grad_b = _kernels.embedding_grad_cpu(a, b, coefficients, np.ones((), dtype), distance)
    for x in (loss, coefficients, grad_a, grad_b):
        assert np.all(np.isfinite(np.asarray(x, np.float64)))
    if distance == "cosine":
        # A zero vector has similarity 0 (d = 1) and no gradient, to either vector.
        np.testing.assert_array_equal(np.asarray(loss[2:], np.float64), [1.0, 0.0])
        np.testing.assert_array_equal(np.asarray(grad_a[2:], np.float64), 0)
        np.testing.assert_array_equal(np.asarray(grad_b[2:], np.float64), 0)
    else:
        # a == b: d = 0, so a similar pair has no loss, a dissimilar one margin²,
        # and neither a gradient (the subgradient 0 at the kink).
        np.testing.assert_array_equal(np.asarray(loss[:2], np.float64), [0.0, 0.25])
        np.testing.assert_array_equal(np.asarray(grad_a[:2], np.float64), 0)
        np.testing.assert_array_equal(np.asarray(grad_b[:2], np.float64), 0)
    if distance == "euclidean":
        np.testing.assert_array_equal(coefficients[:2], 0)
        np.testing.assert_array_equal(np.asarray(grad_a[3], np.float64), 0)


# Weights and divisors whose products are exact in every dtype, so that the
# reduced kernel's per-row gradient factor equals the upstream handed to the
# gradient kernel bit for bit.
ROW_WEIGHTS = np.array([[0.5, 0.25, 0.75, 0.5], [0.5, 0.25, 0.75, 0.5]])  # sum 4


@pytest.mark.parametrize("distance", DISTANCE_KINDS)
@pytest.mark.parametrize("dtype", DISTANCE_DTYPES)
@pytest.mark.parametrize("reduction", ["sum", "mean", "weighted_mean"])
@pytest.mark.parametrize("weights", ["none", "scalar", "vector"])
def test_reduced_embedding_kernel_equals_loss_then_grad(rng, distance, dtype, reduction, weights):
    a, b = random_pairs(rng, (2, 4, 9), dtype)
    y = random_labels(rng, (2, 4), "float32").numpy()
    w = {"none": None, "scalar": np.asarray(0.5, dtype), "vector": ROW_WEIGHTS.astype(dtype)}
    w = w[weights]
    loss, grad_a, grad_b, scale = _kernels.embedding_loss_reduced_cpu(
        y, a, b, w, 0.8, distance, reduction, 0.5, 0
    )
    row_weights = np.ones((2, 4)) if w is None else np.broadcast_to(np.float64(w), (2, 4))
    divisor = {
        "sum": 1.0,
        "mean": 8.0,
        "weighted_mean": 1.0 if w is None else float(np.sum(w) if w.ndim else w),
    }
    assert scale == 0.5 / divisor[reduction]
    row_loss, coefficients = _kernels.embedding_loss_cpu(y, a, b, 0.8, distance, 0)
    assert loss.shape == () and loss.dtype == a.dtype
    assert_close(
        loss,
        scale * np.sum(numpy_embedding_loss(y, a, b, 0.8, distance, 0)[0] * row_weights),
        dtype,
    )
    upstream = (row_weights * scale).astype(dtype)
    assert np.all(upstream.astype(np.float64) == row_weights * scale)
    _assert_same_results(
        (grad_a, grad_b), _kernels.embedding_grad_cpu(a, b, coefficients, upstream, distance)
    )


@pytest.mark.parametrize("distance", DISTANCE_KINDS)
def test_embedding_kernels_are_deterministic(rng, distance):
    a, b = random_pairs(rng, (1000, 37), "float32")
    y = random_labels(rng, (1000,), "float32").numpy()
    w = rng.uniform(0, 2, 1000).astype(np.float32)
    loss = _kernels.embedding_loss_cpu(y, a, b, 1.0, distance)
    _assert_same_results(_kernels.embedding_loss_cpu(y, a, b, 1.0, distance), loss)
    upstream = rng.uniform(-1, 1, 1000).astype(np.float32)
    _assert_same_results(
        _kernels.embedding_grad_cpu(a, b, loss[1], upstream, distance),
        _kernels.embedding_grad_cpu(a, b, loss[1], upstream, distance),
    )
    _assert_same_results(
        _kernels.embedding_loss_reduced_cpu(y, a, b, w, 1.0, distance, "weighted_mean"),
        _kernels.embedding_loss_reduced_cpu(y, a, b, w, 1.0, distance, "weighted_mean"),
    )


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_embedding_kernels_take_big_endian_misaligned_and_strided_arrays(rng, dtype):
    a, b = random_pairs(rng, (6, 5), dtype)
    y = np.array([1, 0, 1, 0, 1, 1], np.int64)
    w = rng.uniform(0, 2, 6).astype(dtype)
    big = lambda x: x.astype(x.dtype.newbyteorder(">"))  # noqa: E731
    strided = lambda x: np.asfortranarray(x)  # noqa: E731
    for odd in (big, lambda x: _at_offset(x, 1), strided):
        loss = _kernels.embedding_loss_cpu(y, a, b, 0.9, "cosine")
        _assert_same_results(
            _kernels.embedding_loss_cpu(odd(y), odd(a), odd(b), 0.9, "cosine"), loss
        )
        _assert_same_results(
            _kernels.embedding_grad_cpu(odd(a), odd(b), odd(loss[1]), odd(w), "cosine"),
            _kernels.embedding_grad_cpu(a, b, loss[1], w, "cosine"),
        )
        _assert_same_results(
            _kernels.embedding_loss_reduced_cpu(odd(y), odd(a), odd(b), odd(w), 0.9, "cosine"),
            _kernels.embedding_loss_reduced_cpu(y, a, b, w, 0.9, "cosine"),
        )


@pytest.mark.parametrize("distance", DISTANCE_KINDS)
def test_embedding_kernels_on_zero_rows(distance):
    a = np.zeros((0, 4), np.float32)
    loss, coefficients = _kernels.embedding_loss_cpu(np.zeros(0), a, a, 1.0, distance)
    assert loss.shape == (0,) and coefficients.shape == (0, COEFFICIENTS[distance])
    grad_a, grad_b = _kernels.embedding_grad_cpu(a, a, coefficients, np.float32(1), distance)
    assert grad_a.shape == grad_b.shape == (0, 4)
    loss, grad_a, grad_b, scale = _kernels.embedding_loss_reduced_cpu(
        np.zeros(0), a, a, distance=distance
    )
    assert loss == 0 and grad_a.shape == grad_b.shape == (0, 4) and scale == 0


E4 = np.ones((4, 3), np.float32)
Y4 = np.ones(4, np.float32)
C4 = np.ones((4, 1))


@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            lambda k: k.embedding_loss_cpu(Y4, E4, np.ones((4, 2), np.float32)),
            ValueError,
            r"embeddings_a and embeddings_b must have the same shape, got "
            r"embeddings_a \(4, 3\) and embeddings_b \(4, 2\)",
        ),
        (
            lambda k: k.embedding_loss_cpu(*[np.ones((), np.float32)] * 3),
            ValueError,
            r"rank >= 1 and a non-empty last axis, got shape \(\)",
        ),
        (
            lambda k: k.embedding_loss_cpu(Y4, np.ones((4, 0)), np.ones((4, 0))),
            ValueError,
            r"non-empty last axis, got shape \(4, 0\)",
        ),
        (
            lambda k: k.embedding_loss_cpu(np.ones(3), E4, E4),
            ValueError,
            r"embeddings_a.shape\[:-1\] and labels must have the same shape",
        ),
        (
            lambda k: k.embedding_loss_cpu(Y4, E4.astype(np.int32), E4.astype(np.int32)),
            TypeError,
            "embeddings_a must be float16, bfloat16, float32 or float64, got int32",
        ),
        (
            lambda k: k.embedding_loss_cpu(Y4, E4, E4.astype(np.float64)),
            TypeError,
            r"embeddings_b must have the dtype of embeddings_a \(float32\), got float64",
        ),
        (
            lambda k: k.embedding_loss_cpu(Y4.astype(np.uint8), E4, E4),
            TypeError,
            "labels: unsupported dtype uint8",
        ),
        (lambda k: k.embedding_loss_cpu(Y4, E4, E4, -1.0), ValueError, "margin"),
        (lambda k: k.embedding_loss_cpu(Y4, E4, E4, float("nan")), ValueError, "margin"),
        (
            lambda k: k.embedding_loss_cpu(Y4, E4, E4, 1.0, "euclidean", 2),
            ValueError,
            "similar_label must be 0 or 1",
        ),
        (
            lambda k: k.embedding_loss_cpu(Y4, E4, E4, 1.0, "l2"),
            ValueError,
            "distance must be one of 'euclidean', 'cosine', 'manhattan', got 'l2'",
        ),
        (
            lambda k: k.embedding_grad_cpu(E4, E4, C4, np.float32(1), "cosine"),
            ValueError,
            r"coefficients must have shape \(4, 5\) \(embeddings_a.shape\[:-1\] \+ \(5,\) for "
            r"distance 'cosine'\), got \(4, 1\)",
        ),
        (
            lambda k: k.embedding_grad_cpu(E4, E4, C4.astype(np.float32), np.float32(1)),
            TypeError,
            "coefficients must be float64, got float32",
        ),
        (
            lambda k: k.embedding_grad_cpu(E4, E4, C4, np.ones(3, np.float32)),
            ValueError,
            r"embeddings_a.shape\[:-1\] and upstream must have the same shape",
        ),
        (
            lambda k: k.embedding_grad_cpu(E4, E4, C4, 1.0),
            TypeError,
            r"upstream must have the dtype of embeddings_a \(float32\), got float64",
        ),
        (
            lambda k: k.embedding_grad_cpu(E4, E4, C4, np.float32(1), "l1"),
            ValueError,
            "distance must be one of",
        ),
        (
            lambda k: k.embedding_loss_reduced_cpu(Y4, E4, E4, np.ones(3, np.float32)),
            ValueError,
            r"labels and sample_weight must have the same shape",
        ),
        (
            lambda k: k.embedding_loss_reduced_cpu(Y4, E4, E4, np.ones(4)),
            TypeError,
            r"sample_weight must have the dtype of embeddings_a \(float32\), got float64",
        ),
        (
            lambda k: k.embedding_loss_reduced_cpu(Y4, E4, E4, None, 1.0, "euclidean", "avg"),
            ValueError,
            "reduction must be",
        ),
        (lambda k: k.embedding_loss_reduced_cpu(Y4, E4, E4, None, -0.5), ValueError, "margin"),
        (
            lambda k: k.embedding_loss_reduced_cpu(Y4, E4, E4, None, 1.0, "hamming"),
            ValueError,
            "distance must be one of",
        ),
        (
            lambda k: k.embedding_loss_reduced_cpu(Y4, E4, E4, similar_label=-1),
            ValueError,
            "similar_label",
        ),
    ],
)
def test_embedding_kernels_reject_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call(_kernels)


def _embedding_cuda_arrays(entry_point, **replace):
    """Valid fake arguments of an embedding CUDA entry point (4 rows of 3,
    Euclidean), some replaced."""
    rows, pair, one = FakeCudaArray((4,)), FakeCudaArray((4, 3)), FakeCudaArray(())
    coefficients = FakeCudaArray((4, 1), "<f8")
    arrays = {
        "embedding_loss_cuda": dict(
            labels=rows, embeddings_a=pair, embeddings_b=pair, loss=rows, coefficients=coefficients
        ),
        "embedding_grad_cuda": dict(
            embeddings_a=pair,
            embeddings_b=pair,
            coefficients=coefficients,
            upstream=rows,
            grad_a=pair,
            grad_b=pair,
        ),
        "embedding_loss_reduced_cuda": dict(
            labels=rows,
            embeddings_a=pair,
            embeddings_b=pair,
            sample_weight=one,
            loss=one,
            grad_a=pair,
            grad_b=pair,
            reduction_scale=FakeCudaArray((), "<f8"),
            workspace=FakeCudaArray((_kernels.embedding_reduced_workspace_bytes(4),), "|u1"),
        ),
    }[entry_point]
    return {**arrays, **replace}


LOSS, GRAD, REDUCED = "embedding_loss_cuda", "embedding_grad_cuda", "embedding_loss_reduced_cuda"


@needs_cuda
@pytest.mark.parametrize(
    "entry_point, replace, error, message",
    [
        *[
            (
                name,
                dict(embeddings_b=FakeCudaArray((4, 2))),
                ValueError,
                r"embeddings_a and embeddings_b must have the same shape",
            )
            for name in (LOSS, GRAD, REDUCED)
        ],
        *[
            (
                name,
                dict(embeddings_a=FakeCudaArray((4, 0)), embeddings_b=FakeCudaArray((4, 0))),
                ValueError,
                "non-empty last axis",
            )
            for name in (LOSS, GRAD, REDUCED)
        ],
        *[
            (
                name,
                dict(
                    embeddings_a=FakeCudaArray((4, 3), "<i4"),
                    embeddings_b=FakeCudaArray((4, 3), "<i4"),
                ),
                TypeError,
                "embeddings_a must be float16",
            )
            for name in (LOSS, GRAD, REDUCED)
        ],
        *[
            (
                name,
                dict(grad_b=FakeCudaArray((4, 3), readonly=True)),
                ValueError,
                "grad_b must be writable",
            )
            for name in (GRAD, REDUCED)
        ],
        *[
            (
                name,
                dict(grad_a=FakeCudaArray((4, 3), "<f8")),
                TypeError,
                r"grad_a must have the dtype of embeddings_a \(float32\)",
            )
            for name in (GRAD, REDUCED)
        ],
        *[
            (name, dict(distance="l2"), ValueError, "distance must be one of 'euclidean', 'cosine'")
            for name in (LOSS, GRAD, REDUCED)
        ],
        (
            LOSS,
            dict(labels=FakeCudaArray((3,))),
            ValueError,
            r"embeddings_a.shape\[:-1\] and labels must have the same shape",
        ),
        (LOSS, dict(loss=FakeCudaArray((4,), readonly=True)), ValueError, "loss must be writable"),
        (LOSS, dict(loss=FakeCudaArray((4, 1))), ValueError, "and loss must have the same shape"),
        (
            LOSS,
            dict(coefficients=FakeCudaArray((4, 1), "<f8", readonly=True)),
            ValueError,
            "coefficients must be writable",
        ),
        (LOSS, dict(coefficients=FakeCudaArray((4, 1))), TypeError, "coefficients must be float64"),
        (GRAD, dict(distance="cosine"), ValueError, r"coefficients must have shape \(4, 5\)"),
        (GRAD, dict(upstream=FakeCudaArray((3,))), ValueError, "and upstream must have the same"),
        (
            GRAD,
            dict(upstream=FakeCudaArray((4,), "<f2")),
            TypeError,
            "upstream must have the dtype of embeddings_a",
        ),
        (
            REDUCED,
            dict(sample_weight=FakeCudaArray((2, 2))),
            ValueError,
            "labels and sample_weight must have the same shape",
        ),
        (REDUCED, dict(loss=FakeCudaArray((4,))), ValueError, "loss must hold one value"),
        (REDUCED, dict(reduction="avg"), ValueError, "reduction must be"),
        (
            REDUCED,
            dict(reduction_scale=FakeCudaArray((), "<f4")),
            ValueError,
            "reduction_scale must hold one float64",
        ),
        (
            REDUCED,
            dict(workspace=FakeCudaArray((0,), "|u1")),
            ValueError,
            r"workspace is smaller than embedding_reduced_workspace_bytes\(rows\)",
        ),
        (
            REDUCED,
            dict(workspace=FakeCudaArray((1 << 20,), "|u1", data=0x10004)),
            ValueError,
            "workspace must be aligned to 8 bytes",
        ),
        (
            REDUCED,
            dict(reduction_scale=FakeCudaArray((), "<f8", readonly=True)),
            ValueError,
            "reduction_scale and workspace must be writable",
        ),
    ],
)
def test_cuda_embedding_entry_points_reject_inconsistent_arrays(
    entry_point, replace, error, message
):
    with pytest.raises(error, match=message):
        getattr(_kernels, entry_point)(**_embedding_cuda_arrays(entry_point, **replace))
