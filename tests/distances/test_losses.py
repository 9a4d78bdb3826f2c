"""fused_contrastive.losses: `contrastive_loss` and the Keras 3 `ContrastiveLoss`, end to end."""

import numpy as np
import pytest
import tensorflow as tf
from support import (
    FUSED_REDUCTIONS,
    REDUCTIONS,
    TFA_DISTANCES,
    TFA_LABELS,
    TFA_LOSSES,
    TFA_WEIGHTS,
    KerasReducedReference,
    distance_model,
    load_tfa_h5_in_fresh_process,
    loss_and_gradient,
    pair_data,
    printed_result,
    random_distances,
    random_labels,
    run_python,
    run_workers,
)

import keras
from fused_contrastive import (
    ContrastiveLoss,
    _distances_ops,
    contrastive_loss,
    contrastive_loss_reference,
)


def _close(actual, expected, rtol=1e-6, atol=1e-6):
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=rtol, atol=atol)


class TestTfaCases:
    """TF Addons' own reference cases for tfa.losses.ContrastiveLoss, all of them."""

    def test_per_sample_margin_1(self):
        loss = ContrastiveLoss(margin=1.0, reduction="none")(TFA_LABELS, TFA_DISTANCES)
        _close(loss, TFA_LOSSES)

    def test_sum_over_batch_size(self):
        _close(ContrastiveLoss()(TFA_LABELS, TFA_DISTANCES), 0.621666)

    def test_sum(self):
        _close(ContrastiveLoss(reduction="sum")(TFA_LABELS, TFA_DISTANCES), 3.73)

    def test_sample_weight(self):
        _close(ContrastiveLoss()(TFA_LABELS, TFA_DISTANCES, sample_weight=TFA_WEIGHTS), 0.4425)

    def test_scalar_sample_weight(self):
        _close(ContrastiveLoss()(TFA_LABELS, TFA_DISTANCES, sample_weight=6.0), 3.73)

    def test_zero_weight(self):
        _close(ContrastiveLoss()(TFA_LABELS, TFA_DISTANCES, sample_weight=0.0), 0.0)

    def test_margin_2(self):
        _close(
            ContrastiveLoss(margin=2.0, reduction="none")(TFA_LABELS, TFA_DISTANCES),
            [3.61, 2.89, 1.69, 0.49, 0.81, 0.25],
        )
        _close(ContrastiveLoss(margin=2.0)(TFA_LABELS, TFA_DISTANCES), 1.623333)

    def test_perfect_predictions_give_zero(self):
        _close(ContrastiveLoss()(TFA_LABELS, [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]), 0.0)

    @pytest.mark.parametrize(
        "margin, expected",
        [
            (1.0, [-1.8, -1.4, 2.6, 1.4, 0.0, 1.0]),
            (2.0, [-3.8, -3.4, 2.6, 1.4, -1.8, 1.0]),
        ],
    )
    def test_gradient_of_summed_loss(self, margin, expected):
        distances = tf.Variable(TFA_DISTANCES)
        with tf.GradientTape() as tape:
            total = tf.reduce_sum(contrastive_loss(TFA_LABELS, distances, margin))
        _close(tape.gradient(total, distances), expected)

    def test_documented_usage_runs_unchanged(self):
        # TF Addons' documented API, with only the import line changed.
        from fused_contrastive import ContrastiveLoss as TfaContrastiveLoss

        for reduction, expected in (
            ("sum_over_batch_size", 0.621666),
            ("sum", 3.73),
            ("auto", 0.621666),
            ("none", TFA_LOSSES),
        ):
            loss_obj = TfaContrastiveLoss(margin=1.0, reduction=reduction, name="contrastive_loss")
            np.testing.assert_allclose(
                loss_obj(TFA_LABELS, TFA_DISTANCES), expected, rtol=1e-5, atol=1e-6
            )
            np.testing.assert_allclose(
                loss_obj(TFA_LABELS, TFA_DISTANCES, sample_weight=tf.constant(TFA_WEIGHTS)),
                0.4425
                if reduction in ("sum_over_batch_size", "auto")
                else 2.655
                if reduction == "sum"
                else [0.972, 0.392, 0.845, 0.196, 0.0, 0.25],
                rtol=1e-5,
                atol=1e-6,
            )
            config = loss_obj.get_config()
            restored = TfaContrastiveLoss.from_config(config)
            assert restored.get_config() == config
            assert config["margin"] == 1.0 and config["name"] == "contrastive_loss"


# --- reductions: the fused-reduction op against Keras' own ----------------------


def _weights(rng, kind, shape):
    return {
        "none": None,
        "scalar": 1.7,
        "vector": rng.uniform(0.1, 2.0, size=shape),
        "column": rng.uniform(0.1, 2.0, size=shape + (1,)),
    }[kind]


def _spy_on_reduced_op(monkeypatch):
    """The reductions the class handed to the fused-reduction op."""
    calls = []
    original = _distances_ops.reduced_loss

    def spy(*args, **kwargs):
        calls.append(args[4] if len(args) > 4 else kwargs["reduction"])
        return original(*args, **kwargs)

    monkeypatch.setattr(_distances_ops, "reduced_loss", spy)
    return calls


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weights", ["none", "scalar", "vector", "column"])
def test_matches_keras_reduction_values_and_gradients(rng, run, monkeypatch, reduction, weights):
    calls = _spy_on_reduced_op(monkeypatch)
    y = random_labels(rng, (40,), "float32")
    d = random_distances(rng, (40, 1), "float32")
    w = _weights(rng, weights, (40,))
    w = None if w is None else tf.constant(w, tf.float32)

    def loss_and_grad(loss_obj, d):
        return loss_and_gradient(loss_obj, y, d, w, upstream=3.0)  # upstream != 1

    fused = run(loss_and_grad, ContrastiveLoss(margin=1.3, reduction=reduction), d)
    keras_way = loss_and_grad(KerasReducedReference(1.3, reduction=reduction), d)
    assert bool(calls) == (reduction in FUSED_REDUCTIONS), calls
    for got, want in zip(fused, keras_way):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("distance_dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("reduction", ["sum", "sum_over_batch_size", "mean_with_sample_weight"])
def test_every_dtype_and_rank(rng, distance_dtype, reduction):
    tol = {"float16": 2e-3, "bfloat16": 2e-2, "float32": 1e-5, "float64": 1e-12}[distance_dtype]
    for shape in [(1,), (7,), (3, 5), (2, 3, 4)]:
        y = random_labels(rng, shape, "int32")
        d = random_distances(rng, shape, distance_dtype)
        w = tf.cast(rng.uniform(0, 2, size=shape), distance_dtype)
        got = ContrastiveLoss(reduction=reduction, dtype=distance_dtype)(y, d, w)
        want = KerasReducedReference(1.0, reduction=reduction, dtype=distance_dtype)(y, d, w)
        assert got.dtype == want.dtype
        np.testing.assert_allclose(tf.cast(got, tf.float64), tf.cast(want, tf.float64), rtol=tol)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(
    "label_shape, distance_shape", [([1], [1]), ([1], [1, 1]), ([1, 1], [1]), ([], [])]
)
@pytest.mark.parametrize("weight", [None, 2.0, "scalar tensor", "per sample"])
def test_single_sample_follows_keras_reduction(reduction, label_shape, distance_shape, weight):
    # Keras returns a [1] loss with a scalar weight unreduced (w * loss, no
    # divisor): the class must give Keras' number, whatever the reduction.
    y, d = tf.ones(label_shape), tf.fill(distance_shape, 0.5)
    w = {"scalar tensor": tf.constant(2.0), "per sample": tf.fill(label_shape, 2.0)}.get(
        weight, weight
    )
    got = ContrastiveLoss(reduction=reduction)(y, d, sample_weight=w)
    want = KerasReducedReference(reduction=reduction)(y, d, sample_weight=w)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-7)


def test_mean_with_sample_weight_of_one_sample_is_keras_number():
    loss = ContrastiveLoss(reduction="mean_with_sample_weight")(
        tf.ones([1]), tf.fill([1], 0.5), sample_weight=2.0
    )
    assert float(loss) == 0.5


def test_falls_back_to_keras_where_it_must(rng, monkeypatch):
    calls = _spy_on_reduced_op(monkeypatch)
    y = random_labels(rng, (4, 3), "float32")
    d = random_distances(rng, (4, 3), "float32")
    # Per-row weights broadcast over columns: Keras' divisor rules apply.
    w = tf.constant(rng.uniform(0.5, 1.5, size=(4, 1)), tf.float32)
    for reduction in FUSED_REDUCTIONS:
        np.testing.assert_allclose(
            ContrastiveLoss(reduction=reduction)(y, d, w),
            KerasReducedReference(1.0, reduction=reduction)(y, d, w),
            rtol=1e-6,
        )
    # Scalar losses are returned unreduced by Keras.
    assert ContrastiveLoss()(1.0, 0.5).shape == ()
    assert ContrastiveLoss(reduction="none")(y, d).shape == (4, 3)
    assert not calls


def test_zero_weights_give_zero_not_nan(rng):
    y = random_labels(rng, (5,), "float32")
    d = tf.Variable(random_distances(rng, (5,), "float32"))
    with tf.GradientTape() as tape:
        loss = ContrastiveLoss(reduction="mean_with_sample_weight")(y, d, tf.zeros([5]))
    assert float(loss) == 0.0
    np.testing.assert_array_equal(tape.gradient(loss, d), np.zeros(5))


def test_empty_batch_with_unknown_shape_gives_zero():
    f = tf.function(
        lambda y, d: ContrastiveLoss()(y, d),
        input_signature=[tf.TensorSpec([None]), tf.TensorSpec([None])],
    )
    assert float(f(tf.zeros([0]), tf.zeros([0]))) == 0.0


UNKNOWN_RANK_CASES = [
    (reduction, weights)
    for reduction in FUSED_REDUCTIONS + ["none"]
    # With reduction "none" Keras' own weighting runs, which needs known ranks.
    for weights in (["none", "scalar", "per sample", "column"] if reduction != "none" else ["none"])
]


@pytest.mark.parametrize("reduction, weights", UNKNOWN_RANK_CASES)
@pytest.mark.parametrize(
    "label_shape, distance_shape, loss_shape",
    [((6,), (6, 1), (6,)), ((6, 1), (6,), (6,)), ((2, 3), (2, 3), (2, 3))],
)
def test_unknown_rank_gives_the_eager_value(
    rng, reduction, weights, label_shape, distance_shape, loss_shape
):
    y = random_labels(rng, label_shape, "float32")
    d = random_distances(rng, distance_shape, "float32")
    weight_shape = {"scalar": (), "per sample": loss_shape, "column": loss_shape + (1,)}
    w = (
        None
        if weights == "none"
        else tf.constant(rng.uniform(0.1, 2.0, size=weight_shape[weights]), tf.float32)
    )
    loss_obj = ContrastiveLoss(margin=1.2, reduction=reduction)
    unknown = tf.TensorSpec(None, tf.float32)
    if w is None:
        got = tf.function(lambda y, d: loss_obj(y, d), input_signature=[unknown] * 2)(y, d)
    else:
        got = tf.function(lambda y, d, w: loss_obj(y, d, w), input_signature=[unknown] * 3)(y, d, w)
    want = loss_obj(y, d, w)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-6)


# --- similar_label --------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weights", ["none", "scalar", "vector", "column"])
def test_similar_label_0_is_the_loss_of_flipped_labels(rng, reduction, weights):
    y = random_labels(rng, (24,), "float32")
    d = random_distances(rng, (24, 1), "float32")
    w = _weights(rng, weights, (24,))
    w = None if w is None else tf.constant(w, tf.float32)

    def loss_and_grad(loss_obj, labels):
        return loss_and_gradient(loss_obj, labels, d, w)

    got = loss_and_grad(ContrastiveLoss(margin=1.1, reduction=reduction, similar_label=0), y)
    for want in (
        loss_and_grad(KerasReducedReference(1.1, reduction=reduction), 1.0 - y),
        loss_and_grad(KerasReducedReference(1.1, 0, reduction=reduction), y),
    ):
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7)
    same_labels = loss_and_grad(ContrastiveLoss(margin=1.1, reduction=reduction), y)
    assert not np.allclose(got[0], same_labels[0])


@pytest.mark.parametrize(
    "similar_label, error",
    [(2, ValueError), (-1, ValueError), (0.5, TypeError), (True, TypeError), ("1", TypeError)],
)
def test_bad_similar_label_raises_at_construction(similar_label, error):
    with pytest.raises(error, match="similar_label"):
        ContrastiveLoss(similar_label=similar_label)


# --- ragged ---------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "none"])
@pytest.mark.parametrize("sample_weight", [None, 2.0])
def test_ragged_inputs_are_rejected_with_the_way_out(reduction, sample_weight):
    y = tf.ragged.constant([[1.0], [0.0, 1.0]])
    d = tf.ragged.constant([[0.5], [0.2, 0.3]])
    with pytest.raises(TypeError, match=r"ragged.*not supported") as error:
        ContrastiveLoss(reduction=reduction)(y, d, sample_weight=sample_weight)
    assert "flat_values" in str(error.value)


# --- the class: construction, config, registration -----------------------------


def test_config_round_trip():
    loss = ContrastiveLoss(
        margin=0.7, reduction="sum", name="pairs", dtype="float64", similar_label=0
    )
    config = loss.get_config()
    assert config["margin"] == 0.7 and config["similar_label"] == 0
    restored = ContrastiveLoss.from_config(config)
    assert (
        restored.margin,
        restored.reduction,
        restored.name,
        restored.dtype,
        restored.similar_label,
    ) == (0.7, "sum", "pairs", "float64", 0)
    again = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(again, ContrastiveLoss) and again.margin == 0.7
    assert again.similar_label == 0
    assert ContrastiveLoss().get_config()["similar_label"] == 1


def test_registered_under_package_name():
    registered = keras.saving.get_registered_object("fused_contrastive>ContrastiveLoss")
    assert registered is ContrastiveLoss


def test_tfa_name_is_an_alias_not_a_registration():
    assert keras.saving.get_custom_objects()["Addons>ContrastiveLoss"] is ContrastiveLoss
    assert keras.saving.get_registered_name(ContrastiveLoss) == "fused_contrastive>ContrastiveLoss"


@pytest.mark.parametrize("margin", [-0.5, float("nan"), float("inf")])
def test_bad_margin_raises_at_construction(margin):
    with pytest.raises(ValueError, match="margin"):
        ContrastiveLoss(margin=margin)


def test_tensor_margin_is_refused_by_the_class():
    with pytest.raises(TypeError, match="number margin"):
        ContrastiveLoss(margin=tf.constant(1.0))


def test_bad_reduction_raises():
    with pytest.raises(ValueError):
        ContrastiveLoss(reduction="median")


def test_dtype_float64_computes_in_float64(rng):
    y = random_labels(rng, (10,), "float64")
    d = random_distances(rng, (10,), "float64")
    loss = ContrastiveLoss(dtype="float64", reduction="none")(y, d)
    assert loss.dtype == tf.float64
    np.testing.assert_array_equal(loss, contrastive_loss_reference(y, d))


# --- Keras models: fit, evaluate, predict, masks ----------------------------------


def _siamese_data(rng, n=512, dim=8):
    a = rng.normal(size=(n, dim)).astype("float32")
    similar = rng.integers(0, 2, size=n)
    b = np.where(
        similar[:, None] == 1, a + 0.1 * rng.normal(size=(n, dim)), rng.normal(size=(n, dim))
    ).astype("float32")
    return a, b, similar.astype("float32")


@keras.saving.register_keras_serializable(package="fused_contrastive_tests")
class PairDistance(keras.layers.Layer):
    """Euclidean distance between two embeddings, [B, 1]; epsilon keeps d/dx finite at 0."""

    def call(self, a, b):
        return keras.ops.sqrt(keras.ops.sum(keras.ops.square(a - b), axis=-1, keepdims=True) + 1e-9)


def _siamese_model(dim=8, margin=1.0):
    left, right = keras.Input((dim,)), keras.Input((dim,))
    embed = keras.Sequential([keras.layers.Dense(16, activation="relu"), keras.layers.Dense(8)])
    model = keras.Model([left, right], PairDistance()(embed(left), embed(right)))
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss=ContrastiveLoss(margin=margin),
        jit_compile=False,
    )
    return model


def test_fit_reduces_the_loss(rng):
    keras.utils.set_random_seed(1)
    a, b, y = _siamese_data(rng)
    model = _siamese_model()
    history = model.fit([a, b], y, epochs=8, batch_size=64, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.6 * losses[0]
    assert np.isfinite(model.evaluate([a, b], y, verbose=0))


def test_fit_evaluate_predict(rng):
    keras.utils.set_random_seed(4)
    x, y = pair_data(rng)
    model = distance_model()
    model.compile(
        optimizer=keras.optimizers.Adam(0.02), loss=ContrastiveLoss(margin=1.0), jit_compile=False
    )
    losses = model.fit(x, y, epochs=5, batch_size=32, verbose=0).history["loss"]
    assert losses[-1] < losses[0]
    distances = model.predict(x, verbose=0)
    assert distances.shape == (256, 1)
    expected = float(tf.reduce_mean(contrastive_loss_reference(y, distances)))
    np.testing.assert_allclose(model.evaluate(x, y, batch_size=256, verbose=0), expected, rtol=1e-5)


def test_masked_timesteps_are_handled_like_any_keras_loss(rng):
    keras.utils.set_random_seed(5)
    x = rng.normal(size=(16, 7, 3)).astype("float32")
    x[:, 4:, :] = 0.0  # padding: masked by the Masking layer
    y = rng.integers(0, 2, size=(16, 7)).astype("float32")
    model = keras.Sequential(
        [
            keras.Input((7, 3)),
            keras.layers.Masking(0.0),
            keras.layers.Dense(1, activation="softplus"),
        ]
    )
    results = {}
    for loss in (ContrastiveLoss(), KerasReducedReference()):
        model.compile(loss=loss, jit_compile=False)
        results[type(loss).__name__] = model.evaluate(x, y, batch_size=16, verbose=0)
    np.testing.assert_allclose(
        results["ContrastiveLoss"], results["KerasReducedReference"], rtol=1e-6
    )
    # And the padded steps really are excluded: changing their labels changes nothing.
    y_padded = y.copy()
    y_padded[:, 4:] = 1.0 - y_padded[:, 4:]
    model.compile(loss=ContrastiveLoss(), jit_compile=False)
    np.testing.assert_allclose(
        model.evaluate(x, y_padded, batch_size=16, verbose=0), results["ContrastiveLoss"], rtol=1e-6
    )


def test_lookup_by_registered_name(rng):
    # Keras 3's compile() resolves plain strings among its built-in losses only
    # (and reads a dict as one loss per output), so the registered name goes
    # through Keras' deserialisation instead.
    x, y = pair_data(rng, n=32)
    loss = keras.losses.deserialize(
        {"class_name": "fused_contrastive>ContrastiveLoss", "config": {"margin": 2.0}}
    )
    assert isinstance(loss, ContrastiveLoss) and loss.margin == 2.0
    registered = keras.saving.get_registered_object("fused_contrastive>ContrastiveLoss")
    assert registered is ContrastiveLoss
    model = distance_model()
    model.compile(loss=loss)
    expected = tf.reduce_mean(contrastive_loss_reference(y, model.predict(x, verbose=0), 2.0))
    np.testing.assert_allclose(model.evaluate(x, y, batch_size=32, verbose=0), expected, rtol=1e-6)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_trains_with_the_loss_in_float32(rng, policy):
    keras.utils.set_random_seed(7)
    x, y = pair_data(rng)
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = distance_model()
        assert model(x[:2]).dtype == ("float16" if policy == "mixed_float16" else "bfloat16")
        loss = ContrastiveLoss()
        assert loss.dtype == "float32"
        assert loss(y[:8], model(x[:8])).dtype == tf.float32
        model.compile(optimizer=keras.optimizers.Adam(0.02), loss=loss, jit_compile=False)
        if policy == "mixed_float16":  # Keras wraps the optimizer for float16
            assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        losses = model.fit(x, y, epochs=5, batch_size=32, verbose=0).history["loss"]
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_explicit_loss_scale_optimizer(rng):
    keras.utils.set_random_seed(8)
    x, y = pair_data(rng)
    model = distance_model()
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(0.02))
    model.compile(optimizer=optimizer, loss=ContrastiveLoss(), jit_compile=False)
    losses = model.fit(x, y, epochs=4, batch_size=32, verbose=0).history["loss"]
    assert losses[-1] < losses[0]


# --- saving: .keras files, TF Addons' h5 files ------------------------------------


def test_keras_file_round_trip_keeps_the_margin(rng, tmp_path):
    keras.utils.set_random_seed(2)
    a, b, y = _siamese_data(rng, n=64)
    model = _siamese_model(margin=2.5)
    model.fit([a, b], y, epochs=1, verbose=0)
    path = tmp_path / "siamese.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.loss, ContrastiveLoss) and loaded.loss.margin == 2.5
    np.testing.assert_allclose(
        loaded.evaluate([a, b], y, verbose=0), model.evaluate([a, b], y, verbose=0), rtol=1e-6
    )


def test_keras_file_loads_in_a_fresh_process(rng, tmp_path):
    keras.utils.set_random_seed(6)
    x, y = pair_data(rng, n=64)
    model = distance_model()
    loss = ContrastiveLoss(margin=1.7, reduction="sum", similar_label=0)
    model.compile(optimizer="adam", loss=loss)
    model.fit(x, y, epochs=1, verbose=0)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    model.save(tmp_path / "model.keras")
    expected = model.evaluate(x, y, batch_size=64, verbose=0)
    # similar_label=0 is in use: the flipped labels under the default give it too.
    np.testing.assert_allclose(
        expected,
        float(ContrastiveLoss(margin=1.7, reduction="sum")(1.0 - y, model.predict(x, verbose=0))),
        rtol=1e-5,
    )
    result = run_python(f"""
        import numpy as np, keras
        import fused_contrastive
        model = keras.models.load_model({str(tmp_path / "model.keras")!r})
        assert isinstance(model.loss, fused_contrastive.ContrastiveLoss)
        assert model.loss.margin == 1.7 and model.loss.reduction == "sum"
        assert model.loss.similar_label == 0, model.loss.get_config()
        data = np.load({str(tmp_path / "data.npz")!r})
        print(repr(model.evaluate(data["x"], data["y"], batch_size=64, verbose=0)))
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.split()[-1]) == pytest.approx(expected, rel=1e-6)


def test_tfa_h5_model_loads_with_this_loss():
    # A model TF Addons compiled and saved (TF 2.15, tensorflow-addons 0.23):
    # Keras 3 fails to load it on its own, and loads it with nothing but
    # `import fused_contrastive`, giving TF Addons' numbers.
    measured = load_tfa_h5_in_fresh_process("keras")
    assert measured["loss_class"] == "fused_contrastive.losses.ContrastiveLoss"
    assert measured["package_class"] == measured["loss_class"]
    assert measured["config"]["reduction"] == "sum_over_batch_size"


# --- SavedModel -------------------------------------------------------------------


class Exported(tf.Module):
    """What a user serves: the model, plus loss and gradients for fine-tuning."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.loss = ContrastiveLoss(margin=1.2)

    @tf.function(input_signature=[tf.TensorSpec([None, 6], tf.float32)])
    def serve(self, x):
        return {"distance": self.model(x)}

    @tf.function(
        input_signature=[tf.TensorSpec([None, 6], tf.float32), tf.TensorSpec([None], tf.float32)]
    )
    def loss_and_gradients(self, x, y):
        with tf.GradientTape() as tape:
            loss = self.loss(y, self.model(x))
        return {"loss": loss, "gradients": tape.gradient(loss, self.model.trainable_variables)}


def test_saved_model_round_trip_in_a_fresh_process(rng, tmp_path):
    keras.utils.set_random_seed(9)
    x, y = pair_data(rng, n=64)
    model = distance_model()
    model.compile(optimizer="adam", loss=ContrastiveLoss(margin=1.2), jit_compile=False)
    model.fit(x, y, epochs=2, verbose=0)
    exported = Exported(model)
    path = str(tmp_path / "saved")
    tf.saved_model.save(exported, path, signatures={"serving_default": exported.serve})
    expected = exported.loss_and_gradients(x, y)
    np.savez(
        tmp_path / "expected.npz",
        x=x,
        y=y,
        distance=exported.serve(x)["distance"],
        loss=expected["loss"],
        **{f"g{i}": g for i, g in enumerate(expected["gradients"])},
    )

    result = run_python(f"""
        import numpy as np, tensorflow as tf
        import fused_contrastive
        loaded = tf.saved_model.load({path!r})
        e = np.load({str(tmp_path / "expected.npz")!r})
        served = loaded.signatures["serving_default"](x=tf.constant(e["x"]))["distance"]
        assert np.array_equal(served, e["distance"])
        out = loaded.loss_and_gradients(e["x"], e["y"])
        assert np.array_equal(out["loss"], e["loss"]), (out["loss"], e["loss"])
        for i, g in enumerate(out["gradients"]):
            assert np.array_equal(g, e[f"g{{i}}"])
        # The op's registered gradient works on the loaded function too.
        x = tf.constant(e["x"])
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = loaded.loss_and_gradients(x, e["y"])["loss"]
        assert tape.gradient(loss, x) is not None
        print("identical")
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == "identical"

    # Without the package the op is unknown; TensorFlow's error names it.
    result = run_python(f"""
        import tensorflow as tf
        tf.saved_model.load({path!r})
    """)
    assert result.returncode != 0
    assert "FusedContrastive>ContrastiveLoss" in result.stderr


# --- tf.distribute ----------------------------------------------------------------

# Shared by the scripts below: data, a model, and one custom-loop step that
# returns the globally averaged loss and gradients.
COMMON = """
    import json, os
    import numpy as np, tensorflow as tf, keras
    from fused_contrastive import ContrastiveLoss

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype("float32")
    y = (x[:, 0] > 0).astype("float32")
    GLOBAL_BATCH = 16

    def make_model():
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"),
                                  keras.layers.Dense(1, activation="softplus")])
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss=ContrastiveLoss(),
                      jit_compile=False)
        return model

    def custom_loop_step(strategy):
        with strategy.scope():
            model = make_model()
            loss_fn = ContrastiveLoss(reduction="none")
        dataset = strategy.experimental_distribute_dataset(
            tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH).take(1))

        @tf.function
        def step(batch):
            xb, yb = batch
            with tf.GradientTape() as tape:
                per_example = loss_fn(yb, model(xb))
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=GLOBAL_BATCH)
            grads = tape.gradient(loss, model.trainable_variables)
            ctx = tf.distribute.get_replica_context()
            return ctx.all_reduce("sum", loss), ctx.all_reduce("sum", grads)

        loss, grads = strategy.run(step, args=(next(iter(dataset)),))
        first = lambda v: strategy.experimental_local_results(v)[0].numpy()
        return float(first(loss)), [first(g).tolist() for g in grads]
"""

MIRRORED_SCRIPT = (
    COMMON
    + """
    def fit_losses(strategy):
        with strategy.scope():
            model = make_model()
        return model.fit(x, y, epochs=3, batch_size=GLOBAL_BATCH, shuffle=False,
                         verbose=0).history["loss"]

    one = tf.distribute.OneDeviceStrategy("/cpu:0")
    two = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert two.num_replicas_in_sync == 2
    np.testing.assert_allclose(fit_losses(two), fit_losses(one), rtol=1e-5)
    loss_two, grads_two = custom_loop_step(two)
    loss_one, grads_one = custom_loop_step(one)
    np.testing.assert_allclose(loss_two, loss_one, rtol=1e-6)
    for a, b in zip(grads_two, grads_one):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    print("mirrored matches one device")
"""
)

# Logical devices must be configured before TensorFlow initialises them.
TWO_CPUS = """
    import tensorflow as tf
    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2)
"""


def test_mirrored_strategy_matches_one_device():
    result = run_python(TWO_CPUS + MIRRORED_SCRIPT)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "mirrored matches one device" in result.stdout


# Keras 3's fit() cannot take MultiWorkerMirroredStrategy's per-replica inputs
# (it fails converting a PerReplica value, with or without this loss), so the
# workers run the custom training loop step.
WORKER_SCRIPT = (
    COMMON
    + """
    strategy = (tf.distribute.MultiWorkerMirroredStrategy() if "TF_CONFIG" in os.environ
                else tf.distribute.OneDeviceStrategy("/cpu:0"))
    loss, grads = custom_loop_step(strategy)
    print("RESULT", json.dumps([loss, grads]))
"""
)


def test_multi_worker_mirrored_strategy_on_localhost():
    outputs = [printed_result(result) for result in run_workers(WORKER_SCRIPT)]
    single = run_python(WORKER_SCRIPT)
    assert single.returncode == 0, single.stderr[-3000:]
    want_loss, want_grads = printed_result(single)
    for loss, grads in outputs:
        np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
        for a, b in zip(grads, want_grads):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
