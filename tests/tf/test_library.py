"""fused_contrastive._library: loading, version guard, env overrides, scalar cache; the
distance ops' gradients."""

import json

import numpy as np
import pytest
import tensorflow as tf
from support import (
    DISTANCE_DTYPES,
    TFA_DISTANCES,
    TFA_LABELS,
    KerasReducedReference,
    hessian,
    random_distances,
    random_labels,
    run_python,
)
from tensorflow.python.framework import kernels

import fused_contrastive
from fused_contrastive import (
    ContrastiveLoss,
    _distances_ops,
    _library,
    contrastive_loss,
    contrastive_loss_reference,
)
from fused_contrastive._inputs import prepare_inputs

# --- loading ------------------------------------------------------------------


def test_build_info_records_the_tensorflow_it_was_built_against():
    info = fused_contrastive.build_info()
    assert info["tensorflow_version"] == tf.__version__
    assert info["version"] == fused_contrastive.__version__
    assert info["using_reference"] is False


def test_op_names_are_the_library_ones():
    for name in (_library.OP_NAME, _library.REDUCED_OP_NAME, _library.SCALE_OP_NAME):
        devices = {k.device_type for k in kernels.get_registered_kernels_for_op(name).kernel}
        assert "CPU" in devices, name


def test_tensorflow_mismatch_names_both_versions_and_the_fix():
    with pytest.raises(ImportError) as error:
        _library.check_tensorflow_version("2.20.0", "2.21.0", "/src/fused-contrastive")
    message = str(error.value)
    assert "2.20.0" in message and "2.21.0" in message
    assert (
        "pip install --force-reinstall --no-deps --no-build-isolation /src/fused-contrastive"
        in message
    )
    _library.check_tensorflow_version("2.21.0", "2.21.0", "/src")  # a match passes


def _fake_library(directory, tensorflow_version):
    """A library file (never loaded) with its _build_info.json beside it."""
    directory.mkdir(exist_ok=True)
    (directory / "_build_info.json").write_text(
        json.dumps(
            {"tensorflow_version": tensorflow_version, "source_dir": "/src/fused-contrastive"}
        )
    )
    library = directory / "_fused_contrastive_ops.so"
    library.write_bytes(b"not a library")
    return library


def test_library_override_is_version_checked_before_loading(tmp_path, monkeypatch):
    library = _fake_library(tmp_path / "old", "2.0.0")
    monkeypatch.setenv(_library.LIBRARY_ENV, str(library))
    assert _library._library_path() == library.resolve()
    with pytest.raises(ImportError, match=rf"TensorFlow 2\.0\.0.*{tf.__version__}"):
        _library._load()


def test_missing_library_or_build_info_names_the_path_and_the_fallback(tmp_path, monkeypatch):
    library = _fake_library(tmp_path / "lib", tf.__version__)
    for missing in (library, tmp_path / "lib" / "_build_info.json"):
        missing.unlink()
        monkeypatch.setenv(_library.LIBRARY_ENV, str(library))
        with pytest.raises(ImportError, match=_library.USE_REFERENCE_ENV) as error:
            _library._load()
        assert str(library) in str(error.value)
        _fake_library(tmp_path / "lib", tf.__version__)


@pytest.mark.parametrize(
    "value, uses_reference",
    [("1", True), ("true", True), ("yes", True), ("", False), ("0", False), ("false", False)],
)
def test_reference_environment_flag(monkeypatch, value, uses_reference):
    monkeypatch.setenv(_library.USE_REFERENCE_ENV, value)
    assert _library._env_flag(_library.USE_REFERENCE_ENV) is uses_reference
    if uses_reference:
        with pytest.warns(RuntimeWarning, match=_library.USE_REFERENCE_ENV):
            assert _library._load() is None


def test_reference_fallback_by_environment_variable():
    result = run_python(
        f"""
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import fused_contrastive as fc
        assert fc.using_reference()
        assert fc.build_info()["using_reference"] and fc.build_info()["library"] is None
        assert any(fc.USE_REFERENCE_ENV in str(w.message) for w in caught), caught
        print(float(fc.ContrastiveLoss()({TFA_LABELS}, {TFA_DISTANCES})))
    """,
        FUSED_CONTRASTIVE_USE_REFERENCE="1",
    )
    assert result.returncode == 0, result.stderr
    assert abs(float(result.stdout.split()[-1]) - 0.621666) < 1e-6


# --- the eager scalar cache ---------------------------------------------------


def test_eager_scalars_are_reused():
    assert _library.scalar(0.3) is _library.scalar(0.3)
    assert _library.scalar(0.3, tf.float32).dtype == tf.float32
    tensor = tf.constant(2.0)
    assert _library.scalar(tensor) is tensor


def test_scalar_cache_stays_bounded_under_a_margin_schedule():
    y, d = tf.constant([1.0, 0.0]), tf.constant([0.5, 0.25])
    maxsize = _library._eager_scalar.cache_info().maxsize
    assert maxsize is not None
    for step in range(10_000):
        margin = 1.0 + step * 1e-4
        loss = contrastive_loss(y, d, margin)
        assert _library._eager_scalar.cache_info().currsize <= maxsize
    np.testing.assert_allclose(loss, [0.25, (margin - 0.25) ** 2], rtol=1e-6)


def test_graph_scalars_are_constants_not_cached_tensors():
    @tf.function
    def margin_node():
        return _library.scalar(0.7)

    assert float(margin_node()) == 0.7
    graph = margin_node.get_concrete_function().graph
    assert any(op.type == "Const" for op in graph.get_operations())


# --- gradients ----------------------------------------------------------------


@pytest.mark.parametrize("distance_dtype", DISTANCE_DTYPES)
def test_gradient_equals_autodiff_of_reference(rng, run, distance_dtype):
    y = random_labels(rng, (6, 5), "float32")
    d = random_distances(rng, (6, 5), distance_dtype)
    upstream = tf.cast(tf.constant(rng.normal(size=(6, 5))), distance_dtype)

    def grads(d):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(d)
            fused = tf.reduce_sum(contrastive_loss(y, d, 0.8) * upstream)
            ref = tf.reduce_sum(contrastive_loss_reference(y, d, 0.8) * upstream)
        return tape.gradient(fused, d), tape.gradient(ref, d)

    fused, ref = run(grads, d)
    tol = {"float16": 2e-3, "bfloat16": 2e-2, "float32": 1e-6, "float64": 1e-14}[distance_dtype]
    np.testing.assert_allclose(
        tf.cast(fused, tf.float64), tf.cast(ref, tf.float64), rtol=tol, atol=tol
    )


def test_first_order_gradient_is_the_saved_derivative(rng):
    # Backward multiplies by the forward pass's derivative output, no recomputation.
    y = random_labels(rng, (50,), "float32")
    d = random_distances(rng, (50,), "float32")
    _, dloss = _distances_ops.loss_and_grad(*prepare_inputs(y, d), 1.0)
    with tf.GradientTape() as tape:
        tape.watch(d)
        total = tf.reduce_sum(contrastive_loss(y, d))
    np.testing.assert_array_equal(tape.gradient(total, d), dloss)


@pytest.mark.parametrize("dtype, max_error", [("float32", 1e-4), ("float64", 1e-10)])
def test_numeric_gradient_away_from_hinge(rng, dtype, max_error):
    margin = 1.0
    d = rng.uniform(0.0, 2.0, size=12)
    d = np.where(np.abs(d - margin) < 0.05, d + 0.1, d)  # keep off the kink
    y = random_labels(rng, (12,), dtype)
    theoretical, numerical = tf.test.compute_gradient(
        lambda x: contrastive_loss(y, x, margin), [tf.constant(d, dtype)]
    )
    assert np.max(np.abs(theoretical[0] - numerical[0])) < max_error


def test_second_derivative(rng):
    y = random_labels(rng, (9,), "float64")
    d = tf.constant(rng.uniform(0.0, 2.0, size=9))
    got = hessian(lambda d: tf.reduce_sum(contrastive_loss(y, d, 1.0)), d)
    expected = 2 * y + 2 * (1 - y) * tf.cast(d < 1.0, tf.float64)
    np.testing.assert_allclose(got, np.diag(expected), rtol=1e-12)


def test_second_derivative_at_the_kink_counts_the_hinge_inactive():
    # README: at d == margin the fused Hessian is 2y, while autodiff of the
    # reference (TF's maximum gradient) gives 2y + 2(1-y); both one-sided.
    y = tf.constant([0.0, 0.5, 1.0], tf.float64)
    d = tf.constant([1.0, 1.0, 1.0], tf.float64)
    fused = hessian(lambda d: tf.reduce_sum(contrastive_loss(y, d, 1.0)), d)
    autodiff = hessian(lambda d: tf.reduce_sum(contrastive_loss_reference(y, d, 1.0)), d)
    np.testing.assert_array_equal(np.diag(fused), [0.0, 1.0, 2.0])
    np.testing.assert_array_equal(np.diag(autodiff), [2.0, 2.0, 2.0])


def test_labels_and_margin_get_no_gradient(rng):
    y = tf.Variable(random_labels(rng, (5,), "float32"))
    margin = tf.Variable(1.0, dtype=tf.float64)
    d = random_distances(rng, (5,), "float32")
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(contrastive_loss(y, d, margin))
    assert tape.gradient(total, [y, margin]) == [None, None]


def _first_and_second_order(loss_of_d, d, upstream):
    """Gradient of sum(loss * upstream) and the Hessian of that sum."""
    with tf.GradientTape() as outer:
        outer.watch(d)
        with tf.GradientTape() as inner:
            inner.watch(d)
            total = tf.reduce_sum(loss_of_d(d) * upstream)
        grad = inner.gradient(total, d)
    return grad, outer.jacobian(grad, d)


def test_similar_label_0_gradients_are_those_of_flipped_labels(rng, run):
    y = random_labels(rng, (11,), "float64")  # soft labels: 1 - y is not a permutation
    d = tf.constant(rng.uniform(0.0, 2.0, size=11))
    upstream = tf.constant(rng.normal(size=11))

    def both(d):
        return (
            _first_and_second_order(lambda d: contrastive_loss(y, d, 0.9, 0), d, upstream),
            _first_and_second_order(
                lambda d: contrastive_loss_reference(1.0 - y, d, 0.9), d, upstream
            ),
        )

    (grad, hessian), (want_grad, want_hessian) = run(both, d)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(hessian, want_hessian, rtol=1e-12, atol=1e-15)
    # And it is not the similar_label=1 gradient.
    assert not np.allclose(
        grad, _first_and_second_order(lambda d: contrastive_loss(y, d, 0.9), d, upstream)[0]
    )


@pytest.mark.parametrize("similar_label", [1, 0])
def test_second_derivative_through_the_reduced_loss(rng, similar_label):
    y = random_labels(rng, (6,), "float64")
    d = tf.constant(rng.uniform(0, 2, size=6))
    w = tf.constant(rng.uniform(0.5, 1.5, size=6))
    fused, keras_way = (
        hessian(lambda d: loss_obj(y, d, w), d)
        for loss_obj in (
            ContrastiveLoss(dtype="float64", similar_label=similar_label),
            KerasReducedReference(1.0, similar_label, dtype="float64"),
        )
    )
    np.testing.assert_allclose(fused, keras_way, rtol=1e-12)


def test_reduced_op_gradient_is_its_scaled_output(rng):
    y = random_labels(rng, (40,), "float32")
    d = random_distances(rng, (40,), "float32")
    w = tf.constant(rng.uniform(0.1, 2.0, size=40), tf.float32)
    labels, distances = prepare_inputs(y, d)
    with tf.GradientTape() as tape:
        tape.watch(distances)
        loss, dloss, _ = _distances_ops.reduced_loss_outputs(
            labels, distances, w, 1.0, "weighted_mean", 1.0
        )
        scaled = loss * 2.5
    np.testing.assert_allclose(tape.gradient(scaled, distances), dloss * 2.5, rtol=1e-6)
    with tf.GradientTape() as tape:
        tape.watch([w, distances])
        loss = _distances_ops.reduced_loss(labels, distances, w, 1.0, "weighted_mean", 1.0)
    # Sample weights get no gradient (README).
    assert tape.gradient(loss, w) is None
