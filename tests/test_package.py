"""Build metadata, the version guard, the reference fallback and the pybind11 kernels."""

import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf
from conftest import DISTANCE_DTYPES, LABEL_DTYPES, random_distances, random_labels, run_python

import fused_contrastive
from fused_contrastive import _kernels, _ops, contrastive_loss
from fused_contrastive._inputs import prepare_inputs


def test_build_info_records_the_tensorflow_it_was_built_against():
    info = fused_contrastive.build_info()
    assert info["tensorflow_version"] == tf.__version__
    assert info["version"] == fused_contrastive.__version__
    assert info["using_reference"] is False


def test_tensorflow_mismatch_names_both_versions_and_the_fix():
    with pytest.raises(ImportError) as error:
        _ops.check_tensorflow_version("2.20.0", "2.21.0", "/src/fused-contrastive")
    message = str(error.value)
    assert "2.20.0" in message and "2.21.0" in message
    assert ("pip install --force-reinstall --no-deps --no-build-isolation /src/fused-contrastive"
            in message)
    _ops.check_tensorflow_version("2.21.0", "2.21.0", "/src")  # a match passes


def test_reference_fallback_by_environment_variable():
    result = run_python("""
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import fused_contrastive as fc
        assert fc.using_reference()
        assert any(fc.USE_REFERENCE_ENV in str(w.message) for w in caught), caught
        print(float(fc.ContrastiveLoss()([0, 0, 1, 1, 0, 1], [0.1, 0.3, 1.3, 0.7, 1.1, 0.5])))
    """, FUSED_CONTRASTIVE_USE_REFERENCE="1")
    assert result.returncode == 0, result.stderr
    assert abs(float(result.stdout.split()[-1]) - 0.621666) < 1e-6


def _tf_to_numpy(t):
    return t.numpy()  # bfloat16 tensors come back as ml_dtypes.bfloat16 arrays


@pytest.mark.parametrize("label_dtype", LABEL_DTYPES)
@pytest.mark.parametrize("distance_dtype", DISTANCE_DTYPES)
def test_pybind_kernel_equals_tf_op_bit_for_bit(rng, label_dtype, distance_dtype):
    y = random_labels(rng, (3, 17), label_dtype)
    d = random_distances(rng, (3, 17), distance_dtype)
    op_loss, op_grad = _ops.loss_and_grad(*prepare_inputs(y, d), 0.9)
    loss, grad = _kernels.contrastive_loss_cpu(_tf_to_numpy(y), _tf_to_numpy(d), 0.9)
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
    op_loss, op_grad, op_scale = _ops._library.fused_contrastive_contrastive_loss_reduced(
        y, d, tf.ones([]) if w is None else w, tf.constant(0.8, tf.float64),
        tf.constant(0.5, tf.float64), reduction=reduction)
    loss, grad, scale = _kernels.contrastive_loss_reduced_cpu(
        y.numpy(), d.numpy(), None if w is None else np.asarray(w), 0.8, reduction, 0.5)
    assert loss.shape == () and loss.dtype == np.float32
    assert loss.tobytes() == op_loss.numpy().tobytes()
    assert grad.tobytes() == op_grad.numpy().tobytes()
    assert scale == float(op_scale)
