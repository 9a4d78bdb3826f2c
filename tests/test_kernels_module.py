"""The pybind11 kernel module's boundary: whatever Python hands it, the kernels
get native-endian, aligned, C-contiguous arrays of the shape they are told, or
the call raises TypeError/ValueError naming the argument. It never crashes."""

import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf
from conftest import DISTANCE_DTYPES, LABEL_DTYPES, random_distances, random_labels, run_python

from fused_contrastive import _kernels, _ops, contrastive_loss
from fused_contrastive._inputs import prepare_inputs

DISTANCES = np.array([0.5, 0.3, 2.0, 1.5])
LABELS = np.array([1, 0, 1, 0])


def outcomes_in_subprocess(calls):
    """What each call does in a fresh process, so that a crash fails the test
    instead of killing pytest. Calls are Python expressions over `k` (the
    module file imported here, loaded without TensorFlow), `np`, `f4` and
    `Unconvertible`. Returns, per call, 'returned' or 'ExceptionName: message'
    plus ' (from CauseName)' for a chained cause."""
    result = run_python(f"""
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
    """, timeout=120)
    assert result.returncode == 0, f"exit status {result.returncode}\n{result.stderr}"
    return dict(zip(calls, result.stdout.splitlines(), strict=True))


def test_arguments_that_cannot_become_arrays_raise_instead_of_crashing():
    reduced = "k.contrastive_loss_reduced_cpu"
    not_an_array = "cannot be converted to a NumPy array"
    # (call, start and end of its outcome)
    want = {
        f"{reduced}(f4, f4, Unconvertible())": (f"TypeError: sample_weight {not_an_array}",
                                                "(from RuntimeError)"),
        f"{reduced}(f4, f4, [[1.0], [1.0, 2.0]])": (f"TypeError: sample_weight {not_an_array}",
                                                    "(from ValueError)"),
        f"{reduced}(f4, f4, [None, 1.0])": ("TypeError: sample_weight: unsupported dtype object",
                                            ""),
        f"{reduced}(f4, f4, 'ab')": ("TypeError: sample_weight: unsupported dtype", ""),
        # labels and distances must be arrays already; pybind11 lists the signature.
        f"{reduced}(Unconvertible(), f4)": ("TypeError: contrastive_loss_reduced_cpu(): "
                                            "incompatible function arguments", ""),
        "k.contrastive_loss_cpu(f4, [[1.0], [1.0, 2.0]])": ("TypeError: contrastive_loss_cpu(): "
                                                            "incompatible function arguments", ""),
    }
    got = outcomes_in_subprocess(want)
    for call, (start, end) in want.items():
        assert got[call].startswith(start) and got[call].endswith(end), (call, got[call])


def test_sample_weight_of_another_dtype_names_both():
    with pytest.raises(TypeError, match=r"sample_weight .* distances \(float32\), got float64"):
        _kernels.contrastive_loss_reduced_cpu(np.ones(2, np.float32), np.ones(2, np.float32),
                                              np.ones(2))


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
    _assert_same_results(_kernels.contrastive_loss_cpu(big(y), big(d), 0.9),
                         _kernels.contrastive_loss_cpu(y, d, 0.9))
    _assert_same_results(
        _kernels.contrastive_loss_reduced_cpu(big(y), big(d), big(w), 0.9, "weighted_mean"),
        _kernels.contrastive_loss_reduced_cpu(y, d, w, 0.9, "weighted_mean"))
    _assert_same_results(
        _kernels.contrastive_loss_reduced_cpu(y, d, big(w[:1].reshape(())), 0.9, "sum"),
        _kernels.contrastive_loss_reduced_cpu(y, d, w[:1].reshape(()), 0.9, "sum"))


def _at_offset(a, offset):
    """The values of `a` in a read-only view `offset` bytes into a buffer, as
    np.frombuffer gives them."""
    return np.frombuffer(b"\0" * offset + a.tobytes(), a.dtype, offset=offset).reshape(a.shape)


# Misaligned pointers are undefined behaviour that x86 forgives, so these
# results matched before the fix too; tests/test_sanitizers.py is what sees
# such a pointer reach the kernel (UBSan: "load of misaligned address").
@pytest.mark.parametrize("dtype, offset", [("float32", 1), ("float64", 4), ("float64", 7),
                                           ("float16", 1)])
def test_misaligned_views_give_the_aligned_results(rng, dtype, offset):
    y = rng.integers(0, 2, 1001).astype("int64")
    d = rng.uniform(0, 2, 1001).astype(dtype)
    w = rng.uniform(0, 2, 1001).astype(dtype)
    assert not _at_offset(d, offset).flags.aligned
    _assert_same_results(
        _kernels.contrastive_loss_cpu(_at_offset(y, offset), _at_offset(d, offset)),
        _kernels.contrastive_loss_cpu(y, d))
    _assert_same_results(
        _kernels.contrastive_loss_reduced_cpu(_at_offset(y, offset), _at_offset(d, offset),
                                              _at_offset(w, offset), 1.0, "weighted_mean"),
        _kernels.contrastive_loss_reduced_cpu(y, d, w, 1.0, "weighted_mean"))


def test_bool_labels_read_any_nonzero_byte_as_true():
    labels = np.frombuffer(b"\x02\x01\x00\xff", np.bool_)
    d = DISTANCES.astype(np.float32)
    want = np.array([True, True, False, True])
    _assert_same_results(_kernels.contrastive_loss_cpu(labels, d),
                         _kernels.contrastive_loss_cpu(want, d))
    _assert_same_results(_kernels.contrastive_loss_reduced_cpu(labels, d, None, 1.0, "sum"),
                         _kernels.contrastive_loss_reduced_cpu(want, d, None, 1.0, "sum"))


def test_every_bool_byte_on_the_vectorised_path(rng):
    raw = rng.permutation(np.repeat(np.arange(256, dtype=np.uint8), 8))
    d = rng.uniform(0, 2, raw.size).astype(np.float32)
    _assert_same_results(_kernels.contrastive_loss_cpu(raw.view(np.bool_), d, similar_label=0),
                         _kernels.contrastive_loss_cpu(raw != 0, d, similar_label=0))


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
        self.__cuda_array_interface__ = {"shape": shape, "typestr": typestr,
                                         "data": (data, readonly), "strides": strides,
                                         "version": 3}


CUDA_ENTRY_POINTS = {
    "contrastive_loss_cuda": ("labels", 4),
    "contrastive_loss_reduced_cuda": ("labels", 7),
    "scale_cuda": ("gradient", 3),
}
BAD_CUDA_ARRAYS = {
    "extent overflow": (dict(shape=(2**62, 8)), ValueError, "more bytes than int64"),
    "byte count overflow": (dict(shape=(2**61,), typestr="<f8"), ValueError,
                            "more bytes than int64"),
    "negative extent": (dict(shape=(4, -1)), ValueError, "negative extent"),
    "misaligned pointer": (dict(data=0x10002), ValueError, "not aligned to its 4-byte"),
    "null pointer": (dict(data=0), ValueError, "null data pointer"),
    "strides of another rank": (dict(strides=(4, 4)), ValueError, "strides and shape"),
    "big-endian typestr": (dict(typestr=">f4"), TypeError, "native byte order"),
    "malformed shape": (dict(shape=("a",)), TypeError, "malformed"),
}
needs_cuda = pytest.mark.skipif(not _kernels.has_cuda,
                                reason="module built without CUDA (CI builds it with nvcc)")


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
    arrays = dict(labels=FakeCudaArray((n,)), distances=FakeCudaArray((n,)),
                  sample_weight=FakeCudaArray(()), loss=FakeCudaArray(()),
                  grad=FakeCudaArray((n,)), reduction_scale=FakeCudaArray((), "<f8"),
                  workspace=FakeCudaArray((_kernels.reduced_workspace_bytes(n),), "|u1"))
    return {**arrays, **replace}


@needs_cuda
@pytest.mark.parametrize("replace, message", [
    (dict(workspace=FakeCudaArray((1 << 20,), "|u1", data=0x10004)),
     "workspace must be aligned to 8 bytes"),
    (dict(workspace=FakeCudaArray((1 << 20,), "|u1", readonly=True)),
     "reduction_scale and workspace must be writable"),
    (dict(reduction_scale=FakeCudaArray((), "<f8", readonly=True)),
     "reduction_scale and workspace must be writable"),
])
def test_cuda_reduced_rejects_unusable_scratch_arrays(replace, message):
    with pytest.raises(ValueError, match=message):
        _kernels.contrastive_loss_reduced_cuda(**_reduced_cuda_arrays(**replace))


# --- the pybind11 kernels compute what the TensorFlow ops compute --------------

@pytest.mark.parametrize("label_dtype", LABEL_DTYPES)
@pytest.mark.parametrize("distance_dtype", DISTANCE_DTYPES)
def test_pybind_kernel_equals_tf_op_bit_for_bit(rng, label_dtype, distance_dtype):
    y = random_labels(rng, (3, 17), label_dtype)
    d = random_distances(rng, (3, 17), distance_dtype)
    for similar_label in (1, 0):
        op_loss, op_grad = _ops.loss_and_grad(*prepare_inputs(y, d), 0.9, similar_label)
        # bfloat16 tensors come back as ml_dtypes.bfloat16 arrays.
        loss, grad = _kernels.contrastive_loss_cpu(y.numpy(), d.numpy(), 0.9, similar_label)
        assert loss.dtype == op_loss.numpy().dtype and loss.shape == (3, 17)
        assert loss.tobytes() == op_loss.numpy().tobytes()
        assert grad.tobytes() == op_grad.numpy().tobytes()


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_16_bit_conversions_over_every_bit_pattern(dtype):
    # Label 1, margin 0: the float32 loss and gradient are d*d and 2*d, exact for
    # every 16-bit input (the hinge term is 0 * finite except where d*d is inf,
    # hence the same float32 formula below), so this checks both conversions
    # against NumPy's / ml_dtypes' round-to-nearest-even over all 65536 inputs.
    x = np.arange(1 << 16, dtype=np.uint16).view(dtype)
    loss, grad = _kernels.contrastive_loss_cpu(np.ones(x.shape, np.float32), x, 0.0)
    d = x.astype(np.float32)
    hinge = np.maximum(-d, np.float32(0))
    zero = np.float32(0)
    with np.errstate(all="ignore"):
        want_loss = (d * d + zero * (hinge * hinge)).astype(dtype)
        want_grad = (np.float32(2) * (d - zero * hinge)).astype(dtype)
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
    w = {"none": None, "scalar": np.float32(0.6),
         "vector": rng.uniform(0, 2, 70_001).astype(np.float32)}[weights]
    for similar_label in (1, 0):
        op_loss, op_grad, op_scale = _ops.reduced_loss_outputs(
            y, d, tf.ones([]) if w is None else w, 0.8, reduction, 0.5, similar_label)
        loss, grad, scale = _kernels.contrastive_loss_reduced_cpu(
            y.numpy(), d.numpy(), None if w is None else np.asarray(w), 0.8, reduction, 0.5,
            similar_label)
        assert loss.shape == () and loss.dtype == np.float32
        assert loss.tobytes() == op_loss.numpy().tobytes()
        assert grad.tobytes() == op_grad.numpy().tobytes()
        assert scale == float(op_scale)
