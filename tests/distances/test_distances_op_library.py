"""The compiled op library (cc/tf/ops/distances.cc, cc/tf/kernels/distances.cc): its ops
against the reference and NumPy."""

import warnings

import numpy as np
import pytest
import tensorflow as tf
from support import (
    DISTANCE_DTYPES,
    LABEL_DTYPES,
    ODD_BOOL_AS_LABELS,
    ODD_BOOL_LOSSES,
    bits,
    numpy_contrastive_loss,
    odd_bool_labels,
    random_distances,
    random_labels,
    run_python,
)

import fused_contrastive
from fused_contrastive import (
    ContrastiveLoss,
    _distances_ops,
    _library,
    contrastive_loss,
    contrastive_loss_reference,
)
from fused_contrastive._inputs import prepare_inputs

SHAPES = [(), (0,), (1,), (7,), (4, 5), (2, 3, 4), (3, 0, 2)]
OP_REDUCTIONS = ["sum", "mean", "weighted_mean"]


@pytest.mark.parametrize("label_dtype", LABEL_DTYPES)
@pytest.mark.parametrize("distance_dtype", DISTANCE_DTYPES)
def test_matches_reference_for_every_dtype_pair(rng, run, label_dtype, distance_dtype):
    # Same formula, same grouping, same rounding: equal bit for bit.
    for shape in SHAPES:
        for margin in (0.0, 1.0, 0.37):
            y = random_labels(rng, shape, label_dtype)
            d = random_distances(rng, shape, distance_dtype)
            fused = run(lambda a, b: contrastive_loss(a, b, margin), y, d)
            expected = contrastive_loss_reference(y, d, margin)
            assert fused.dtype == d.dtype and fused.shape == d.shape
            np.testing.assert_array_equal(
                bits(fused), bits(expected), err_msg=f"shape {shape} margin {margin}"
            )


def test_tensor_margin_matches_number_margin(rng):
    y = random_labels(rng, (20,), "int32")
    d = random_distances(rng, (20,), "float64")
    variable = tf.Variable(0.3, dtype=tf.float64)
    np.testing.assert_array_equal(contrastive_loss(y, d, variable), contrastive_loss(y, d, 0.3))


def test_float64_margin_is_not_rounded_to_float32():
    # 0.1 is not a float32 value; the float64 loss must use float64(0.1).
    loss = contrastive_loss(tf.constant([0.0], tf.float64), tf.constant([0.0], tf.float64), 0.1)
    assert loss.numpy()[0] == 0.1 * 0.1


def test_nan_and_inf_distances_propagate():
    d = tf.constant([np.nan, np.inf, np.nan, 0.5])
    y = tf.constant([1.0, 1.0, 0.0, 0.0])
    fused = contrastive_loss(y, d)
    np.testing.assert_array_equal(bits(fused), bits(contrastive_loss_reference(y, d)))
    assert np.isnan(fused.numpy()[0]) and np.isinf(fused.numpy()[1]) and np.isnan(fused.numpy()[2])


def test_large_input_uses_thread_pool_and_stays_exact(rng):
    y = random_labels(rng, (1_000_003,), "float32")
    d = random_distances(rng, (1_000_003,), "float32")
    np.testing.assert_array_equal(contrastive_loss(y, d), contrastive_loss_reference(y, d))


# --- similar_label ------------------------------------------------------------


@pytest.mark.parametrize("label_dtype", LABEL_DTYPES)
def test_similar_label_0_is_tfa_formula_on_flipped_labels(rng, run, label_dtype):
    y = random_labels(rng, (6, 7), label_dtype)
    d = random_distances(rng, (6, 7), "float64")
    loss = run(lambda y, d: contrastive_loss(y, d, 0.8, similar_label=0), y, d)
    flipped = 1.0 - tf.cast(y, tf.float64).numpy()
    np.testing.assert_allclose(loss, numpy_contrastive_loss(flipped, d, 0.8), rtol=1e-14)
    np.testing.assert_array_equal(loss, contrastive_loss(flipped, d, 0.8))


def test_similar_label_0_on_tfa_case():
    # TF Addons' own case with the opposite convention: the labels flip.
    loss = contrastive_loss([1, 1, 0, 0, 1, 0], [0.1, 0.3, 1.3, 0.7, 1.1, 0.5], similar_label=0)
    np.testing.assert_allclose(loss, [0.81, 0.49, 1.69, 0.49, 0.0, 0.25], rtol=1e-6)


@pytest.mark.parametrize("reduction", OP_REDUCTIONS)
def test_reduced_op_with_similar_label_0_is_the_flipped_one(rng, reduction):
    y = random_labels(rng, (30,), "float32")
    d = random_distances(rng, (30,), "float32")
    w = tf.constant(rng.uniform(0.1, 2.0, size=30), tf.float32)
    got = _distances_ops.reduced_loss_outputs(y, d, w, 0.9, reduction, 1.0, similar_label=0)
    want = _distances_ops.reduced_loss_outputs(1.0 - y, d, w, 0.9, reduction, 1.0)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


# --- bool labels whose bytes are not 0/1 ---------------------------------------


def test_bool_labels_read_any_nonzero_byte_as_true(run):
    labels = odd_bool_labels()
    d = tf.fill([4], 0.3)
    np.testing.assert_allclose(run(contrastive_loss, labels, d), ODD_BOOL_LOSSES, rtol=1e-6)
    np.testing.assert_array_equal(
        run(contrastive_loss, labels, d), contrastive_loss(tf.constant(ODD_BOOL_AS_LABELS), d)
    )
    for similar_label in (0, 1):
        np.testing.assert_array_equal(
            run(lambda y, d: contrastive_loss(y, d, 1.0, similar_label), labels, d),
            contrastive_loss(tf.constant(ODD_BOOL_AS_LABELS), d, 1.0, similar_label),
        )


@pytest.mark.parametrize("reduction", OP_REDUCTIONS)
def test_reduced_op_reads_any_nonzero_bool_byte_as_true(reduction):
    d = tf.fill([4], 0.3)
    w = tf.constant([1.0, 2.0, 0.5, 1.5])
    got = _distances_ops.reduced_loss_outputs(odd_bool_labels(), d, w, 1.0, reduction, 1.0)
    want = _distances_ops.reduced_loss_outputs(
        tf.constant(ODD_BOOL_AS_LABELS), d, w, 1.0, reduction, 1.0
    )
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    # The per-sample gradient: 2d for a similar pair, -2(1 - d) for a dissimilar one.
    scale = float(want[2])
    np.testing.assert_allclose(
        got[1], np.array([0.6, 0.6, -1.4, 0.6]) * w.numpy() * scale, rtol=1e-6
    )


# --- bad input the op itself checks -------------------------------------------


def test_mismatched_shapes_known_only_at_run_time():
    f = tf.function(
        lambda y, d: contrastive_loss(y, d),
        input_signature=[tf.TensorSpec([None]), tf.TensorSpec([None])],
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"labels \[3\] and distances \[4\]"):
        f(tf.zeros([3]), tf.zeros([4]))


def test_bad_tensor_margin_fails_in_the_op():
    with pytest.raises(tf.errors.InvalidArgumentError, match="margin must be finite"):
        contrastive_loss([1.0], [0.5], tf.Variable(-1.0))


@pytest.mark.parametrize("margin", [-1.0, float("nan"), float("inf")])
@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_bad_tensor_margin_raises_in_both_ops(margin, mode):
    m = tf.Variable(margin, dtype=tf.float64)
    y, d = tf.constant([1.0, 0.0, 1.0]), tf.constant([0.5, 0.2, 0.3])
    calls = {
        "per-sample": lambda: contrastive_loss(y, d, m),
        "reduced": lambda: _distances_ops.reduced_loss_outputs(
            y, d, tf.constant(1.0), m, "mean", 1.0
        )[0],
    }
    for name, call in calls.items():
        if mode == "graph":
            call = tf.function(call)
        with pytest.raises(tf.errors.InvalidArgumentError, match="margin must be finite"):
            call()


# --- the fused reduction and its backward -------------------------------------


def test_backward_passes_the_gradient_through_when_upstream_is_one(rng):
    y = random_labels(rng, (100,), "float32")
    d = random_distances(rng, (100,), "float32")
    labels, distances = prepare_inputs(y, d)
    _, grad, scale = _distances_ops.reduced_loss_outputs(
        labels, distances, tf.ones([]), 1.0, "mean", 1.0
    )
    assert float(scale) == 1 / 100
    np.testing.assert_array_equal(_distances_ops.scale_gradient(grad, tf.constant(1.0)), grad)
    np.testing.assert_array_equal(_distances_ops.scale_gradient(grad, tf.constant(2.5)), grad * 2.5)


VECTOR_WEIGHTS = [1.0, 2.0, 1.0, 1.0, 1.0, 2.0, 1.0, 1.0]  # sum 10


@pytest.mark.parametrize(
    "reduction, weights, divisor",
    [
        ("sum", 1.0, 1.0),
        ("mean", 1.0, 8.0),
        ("mean", VECTOR_WEIGHTS, 8.0),
        ("weighted_mean", 2.0, 2.0),
        ("weighted_mean", VECTOR_WEIGHTS, 10.0),
        ("weighted_mean", 0.0, None),
    ],
)
def test_reduction_scale_is_the_loss_scale_over_the_divisor(reduction, weights, divisor):
    # Keras' divisors: the count for means, the sum of the weights (or the
    # scalar weight itself) for the weighted mean, and 0 for a zero divisor.
    y = tf.constant([1.0, 0.0] * 4)
    d = tf.fill([8], 0.5)
    w = tf.constant(weights)
    outputs = _distances_ops.reduced_loss_outputs(y, d, w, 1.0, reduction, 3.0)
    assert outputs._fields == ("loss", "dloss_ddistances", "reduction_scale")
    loss, grad, reduction_scale = outputs
    assert reduction_scale.dtype == tf.float64
    want_scale = 0.0 if divisor is None else 3.0 / divisor
    assert float(reduction_scale) == pytest.approx(want_scale, rel=1e-15)
    weighted = numpy_contrastive_loss(y, d) * np.broadcast_to(weights, 8)
    np.testing.assert_allclose(float(loss), weighted.sum() * want_scale, rtol=1e-6)
    np.testing.assert_allclose(
        grad, np.where(y.numpy() == 1, 1.0, -1.0) * w.numpy() * want_scale, rtol=1e-6
    )


def test_reduced_loss_is_accurate_at_ten_million(rng):
    n = 10_000_000
    y = (rng.random(n) < 0.5).astype(np.float32)
    d = (2.0 * rng.random(n)).astype(np.float32)
    w = rng.uniform(0, 2, n).astype(np.float32)
    per_sample = numpy_contrastive_loss(y, d)
    for weights in (None, w):
        got = float(ContrastiveLoss()(y, d, weights))
        exact = np.mean(per_sample * (1.0 if weights is None else w.astype(np.float64)))
        assert abs(got - exact) / exact <= 1e-6


def test_deterministic_and_independent_of_thread_count(rng, tmp_path):
    n = 3_000_017
    data = {
        "y": (rng.random(n) < 0.5).astype(np.float32),
        "d": (2.0 * rng.random(n)).astype(np.float32),
        "w": rng.uniform(0, 2, n).astype(np.float32),
    }
    np.savez(tmp_path / "data.npz", **data)
    script = f"""
        import hashlib, numpy as np, tensorflow as tf
        tf.config.threading.set_intra_op_parallelism_threads(THREADS)
        from fused_contrastive import ContrastiveLoss
        e = np.load({str(tmp_path / "data.npz")!r})
        d = tf.constant(e["d"])
        for _ in range(2):  # twice in one process, then in another
            with tf.GradientTape() as tape:
                tape.watch(d)
                loss = ContrastiveLoss(reduction="mean_with_sample_weight")(e["y"], d, e["w"])
            grad = tape.gradient(loss, d).numpy()
            print(np.float32(loss).tobytes().hex(), hashlib.sha256(grad.tobytes()).hexdigest())
    """
    outputs = []
    for threads in ("1", "2"):
        result = run_python(script.replace("THREADS", threads))
        assert result.returncode == 0, result.stderr[-3000:]
        outputs += result.stdout.split("\n")[:2]
    assert len(outputs) == 4 and len(set(outputs)) == 1, outputs


def test_import_warns_when_tensorflow_sees_a_gpu_and_the_library_has_no_cuda_kernels(monkeypatch):
    # No GPU here: the device list is faked, as TensorFlow would report one.
    gpu = tf.config.PhysicalDevice(name="/physical_device:GPU:0", device_type="GPU")
    monkeypatch.setattr(
        tf.config, "list_physical_devices", lambda kind=None: [gpu] if kind in ("GPU", None) else []
    )
    info = {**fused_contrastive.build_info(), "cuda": False, "source_dir": "/src/fc"}
    monkeypatch.setattr(_library, "_read_build_info", lambda: info)
    with pytest.warns(RuntimeWarning) as caught:
        _library._warn_if_gpu_without_cuda()
    message = str(caught[0].message)
    assert "TensorFlow sees 1 GPU(s)" in message and "CPU kernels only" in message
    assert message.endswith(
        "FUSED_CONTRASTIVE_CUDA=on pip install --force-reinstall --no-deps "
        "--no-build-isolation /src/fc"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monkeypatch.setattr(_library, "_read_build_info", lambda: {**info, "cuda": True})
        _library._warn_if_gpu_without_cuda()  # CUDA kernels: silent
        monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
        monkeypatch.setattr(_library, "_read_build_info", lambda: info)
        _library._warn_if_gpu_without_cuda()  # no GPU: silent


def test_import_without_a_gpu_does_not_warn():
    result = run_python("import fused_contrastive")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "RuntimeWarning" not in result.stderr and "CPU kernels only" not in result.stderr


def test_package_namespace_holds_no_foreign_modules():
    # dir(fused_contrastive) listed os, sys and importlib: the modules it uses
    # are not its API. Its own submodules are (fused_contrastive.losses, ...).
    import types

    foreign = [
        name
        for name, value in vars(fused_contrastive).items()
        if isinstance(value, types.ModuleType)
        and not value.__name__.startswith("fused_contrastive.")
    ]
    assert foreign == []
    assert set(fused_contrastive.__all__) <= set(dir(fused_contrastive))
