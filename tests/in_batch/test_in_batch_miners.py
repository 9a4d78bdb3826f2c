"""miner="batch_hard" and miner="multi_similarity" (issue 21): each anchor keeps
some of its pairs, chosen from a statistics sweep (its hardest positive and
hardest negative), and the weighting's means run over the kept pairs. Checked
against float64 explicit pairs (numpy_mined in test_in_batch.py) on every
path that mines: the function (eager, tf.function, XLA on CPU, and the HLO
lowering that XLA on GPU runs: test_the_hlo_lowering_passes_the_xla_cases runs
the XLA cases again with it on the CPU), the reference, the pybind11 module,
the references, the memory and the Keras classes. The CUDA kernel's miners are
checked against the CPU kernel by tests/gpu/check_gpu.py."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from support import HLO_ON_CPU, run_python, run_tests_under_hlo
from test_in_batch import PAIR_WEIGHTINGS, assert_close, batch, numpy_in_batch
from test_in_batch_references import oracle

import fused_contrastive as fc
from fused_contrastive import _inputs, _kernels, keras2

MINERS = list(_inputs.MINERS)
MARGIN, POSITIVE_MARGIN, EPSILON = 1.25, 0.25, 0.25


def options(miner, weighting, distance="euclidean", **extra):
    return dict(
        margin=MARGIN,
        positive_margin=POSITIVE_MARGIN,
        distance=distance,
        pair_weighting=weighting,
        miner=miner,
        miner_epsilon=EPSILON,
        **extra,
    )


def run(function, labels, e, upstream, jit=None, **kwargs):
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = function(labels, x, **kwargs)
            total = tf.reduce_sum(loss * tf.cast(upstream, loss.dtype))
        return loss, tape.gradient(total, x)

    step = step if jit is None else tf.function(step, jit_compile=jit)
    return [t.numpy() for t in step(tf.constant(e))]


@pytest.mark.parametrize("miner", MINERS)
@pytest.mark.parametrize("weighting", PAIR_WEIGHTINGS)
@pytest.mark.parametrize("distance", _inputs.IN_BATCH_DISTANCES)
@pytest.mark.parametrize("b", [0, 1, 2, 9, 37])
@pytest.mark.parametrize("classes", [3, 1000])
def test_matches_float64_explicit_pairs(rng, miner, weighting, distance, b, classes):
    # 1000 classes: few positive pairs, where multi_similarity finds the
    # positives from each class's rows (RunMultiSimilarityFirst).
    labels, e = batch(rng, b, duplicates=False)
    labels = rng.integers(0, classes, size=b)
    upstream = rng.normal(size=b)
    want_loss, want_grad = numpy_in_batch(
        labels, e, MARGIN, POSITIVE_MARGIN, distance, weighting, upstream, miner, EPSILON
    )
    kwargs = options(miner, weighting, distance)
    # Graphs and XLA at one size (each traces and compiles anew: CI time);
    # the HLO lowering's run compiles the fused loss at every size.
    jits = (None, False, True) if b == 37 else (None,)
    functions = (fc.in_batch_contrastive_loss, fc.in_batch_contrastive_loss_reference)
    if HLO_ON_CPU:
        jits, functions = (True,), functions[:1]
    for function in functions:
        for jit in jits:
            loss, grad = run(function, labels, e, upstream, jit, **kwargs)
            what = f"{function.__name__}, jit={jit}"
            assert_close(loss, want_loss, "float64", f"loss, {what}")
            assert_close(grad, want_grad, "float64", f"gradient, {what}")
    if HLO_ON_CPU:
        return
    # The kernel itself, in blocks of 4 rows too (tiles of two blocks offer
    # their columns' hardest pairs).
    for max_block_rows in (0, 4):
        loss, grad = _kernels.in_batch_loss_cpu(
            labels,
            e,
            upstream,
            MARGIN,
            POSITIVE_MARGIN,
            distance,
            weighting,
            max_block_rows,
            miner=miner,
            miner_epsilon=EPSILON,
        )
        assert_close(loss, want_loss, "float64", f"pybind loss, blocks {max_block_rows}")
        assert_close(grad, want_grad, "float64", f"pybind gradient, blocks {max_block_rows}")


def test_the_miners_change_the_loss_and_keep_what_they_say(rng):
    labels, e = batch(rng, 37, duplicates=False)
    unmined = numpy_in_batch(labels, e, MARGIN, POSITIVE_MARGIN)[0]
    d = np.linalg.norm(e[:, None] - e[None, :], axis=-1)
    same = labels[:, None] == labels[None, :]
    others = ~np.eye(len(e), dtype=bool)
    for miner in MINERS:
        loss = fc.in_batch_contrastive_loss(labels, e, **options(miner, "uniform")).numpy()
        assert not np.allclose(loss, unmined), miner
    # batch_hard, "balanced": the hardest positive's term plus the hardest
    # negative's, from the distances themselves.
    hardest_pos = np.where(same & others, d, -np.inf).max(1)
    hardest_neg = np.where(~same, d, np.inf).min(1)
    want = np.maximum(hardest_pos - POSITIVE_MARGIN, 0) ** 2
    want += np.maximum(MARGIN - hardest_neg, 0) ** 2
    got = fc.in_batch_contrastive_loss(labels, e, **options("batch_hard", "balanced"))
    assert_close(got, want, "float64", "batch_hard, balanced")


@pytest.mark.parametrize("jit", [None, True])
def test_batch_hard_ties_go_to_the_lowest_row(jit):
    # Points on a line (exact distances): anchor 2 has positives at rows 0 and
    # 4, both 2 away, and negatives at rows 1 and 3, both 1 away. Only the
    # lowest of each tie (rows 0 and 1) gets anchor 2's gradient.
    x = np.array([[-2.0], [-1.0], [0.0], [1.0], [2.0]])
    labels = np.array([0, 1, 0, 1, 0])
    upstream = np.array([0.0, 0.0, 1.0, 0.0, 0.0])
    kwargs = dict(margin=2.0, miner="batch_hard", pair_weighting="balanced")
    for function in (fc.in_batch_contrastive_loss, fc.in_batch_contrastive_loss_reference):
        loss, grad = run(function, labels, x, upstream, jit, **kwargs)
        np.testing.assert_allclose(loss[2], 2.0**2 + (2.0 - 1.0) ** 2)
        # d(d²)/dx = 2(x_2 − x_j) for the positive, −2(2 − d)·d'(x) for the negative.
        np.testing.assert_allclose(grad[:, 0], [-4.0, 2.0, 2.0, 0.0, 0.0], err_msg=str(jit))


@pytest.mark.parametrize("jit", [None, True])
@pytest.mark.parametrize("miner", MINERS)
def test_anchors_without_positives_or_negatives(miner, jit):
    # Row 0 has no positive; rows 1 and 2 have one positive and one negative.
    labels, e = np.array([7, 1, 1]), np.array([[0.0, 0.0], [0.5, 0.0], [0.0, 0.75]])
    for weighting in PAIR_WEIGHTINGS:
        want = numpy_in_batch(
            labels, e, MARGIN, POSITIVE_MARGIN, "euclidean", weighting, None, miner, EPSILON
        )[0]
        got = run(fc.in_batch_contrastive_loss, labels, e, 1.0, jit, **options(miner, weighting))
        assert_close(got[0], want, "float64", weighting)
    # One class, two equal rows: multi_similarity keeps no positive without a
    # negative, batch_hard keeps the positive, whose term is 0.
    one_class = run(fc.in_batch_contrastive_loss, [3, 3], [[1.0], [1.0]], 1.0, jit, miner=miner)
    for output in one_class:  # the loss and its gradient
        np.testing.assert_array_equal(output, 0.0)


@pytest.mark.parametrize("jit", [None, True])
@pytest.mark.parametrize("miner", MINERS)
def test_a_nan_row_keeps_the_loss_nan(miner, jit):
    labels = np.array([0, 0, 1, 1])
    e = np.array([[0.0, 0.0], [0.5, 0.0], [np.nan, 0.0], [0.0, 3.0]])
    for function in (fc.in_batch_contrastive_loss, fc.in_batch_contrastive_loss_reference):
        loss = run(function, labels, e, 1.0, jit, miner=miner)[0]
        # Every anchor pairs with the NaN row, which is its hardest pair.
        assert np.isnan(loss).all(), (function.__name__, loss)


@pytest.mark.parametrize("miner", MINERS)
@pytest.mark.parametrize("labels", [[0, 1, 0, 1, 2, 0, 2, 1], [0, 1, 2, 3, 4, 0, 5, 6]])
def test_a_nan_row_in_tiles_of_two_blocks_keeps_the_loss_nan(rng, miner, labels):
    # Blocks of 1 to 3 rows: the NaN row meets the others in tiles of two
    # blocks, as a tile's row and as its column, before and after finite
    # distances in the order the tile's passes read them. The second labels
    # have few positive pairs (multi_similarity's RunMultiSimilarityFirst).
    labels = np.array(labels)
    e = rng.normal(size=(8, 5))
    e[5, 2] = np.nan
    for max_block_rows in (1, 2, 3):
        loss, _ = _kernels.in_batch_loss_cpu(
            labels,
            e,
            np.ones(8),
            MARGIN,
            POSITIVE_MARGIN,
            "euclidean",
            "uniform",
            max_block_rows,
            miner=miner,
            miner_epsilon=EPSILON,
        )
        assert np.isnan(loss).all(), (max_block_rows, loss)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("weighting", PAIR_WEIGHTINGS)
def test_multi_similarity_with_few_positives_and_exact_rows(rng, dtype, weighting):
    # Few positive pairs (RunMultiSimilarityFirst: the first sweep keeps no
    # positive and finds the hardest negatives as it goes). Rows 3 and 14
    # copy rows 2 and 5 in classes of their own, each with one positive 0.02
    # away: each anchor's hardest negative is its copy at d = 0, a Gram
    # distance that cancels (ExactRow), and keeps that positive, which the
    # next negative, far away, would drop. In blocks of 4, row 3 finds it as
    # a row of a diagonal tile, row 14 as a column of a tile of two blocks.
    labels, e = batch(rng, 37, duplicates=False)
    labels = np.arange(37) % 30
    for copy, of, label, positive in ((3, 2, 31, 25), (14, 5, 32, 20)):
        e[copy], labels[copy] = e[of], label
        step = rng.normal(size=e.shape[1])
        e[positive], labels[positive] = e[of] + 0.02 * step / np.linalg.norm(step), label
    upstream = rng.normal(size=37)
    want_loss, want_grad = numpy_in_batch(
        labels,
        e,
        MARGIN,
        POSITIVE_MARGIN,
        "euclidean",
        weighting,
        upstream,
        "multi_similarity",
        EPSILON,
    )
    for max_block_rows in (0, 4):
        loss, grad = _kernels.in_batch_loss_cpu(
            labels,
            e.astype(dtype),
            upstream.astype(dtype),
            MARGIN,
            POSITIVE_MARGIN,
            "euclidean",
            weighting,
            max_block_rows,
            miner="multi_similarity",
            miner_epsilon=EPSILON,
        )
        assert_close(loss, want_loss, dtype, f"loss, blocks {max_block_rows}")
        assert_close(grad, want_grad, dtype, f"gradient, blocks {max_block_rows}")


@pytest.mark.parametrize("miner", MINERS)
@pytest.mark.parametrize("weighting", PAIR_WEIGHTINGS)
def test_with_references(rng, miner, weighting):
    labels, e = batch(rng, 9, duplicates=False)
    ref_labels, refs = batch(rng, 13, duplicates=False)
    upstream = rng.normal(size=9)
    kwargs = options(miner, weighting)
    want_loss, want_grad, want_ref_grad = oracle(labels, e, ref_labels, refs, upstream, **kwargs)
    for jit in (None, True):

        def step(x, r):
            with tf.GradientTape() as tape:
                tape.watch([x, r])
                loss = fc.in_batch_contrastive_loss(
                    labels, x, reference_labels=ref_labels, reference_embeddings=r, **kwargs
                )
                total = tf.reduce_sum(loss * upstream)
            return (loss, *tape.gradient(total, [x, r]))

        step = step if jit is None else tf.function(step, jit_compile=jit)
        loss, grad, ref_grad = step(tf.constant(e), tf.constant(refs))
        assert_close(loss, want_loss, "float64", f"loss, jit={jit}")
        assert_close(grad, want_grad, "float64", f"gradient, jit={jit}")
        assert_close(ref_grad, want_ref_grad, "float64", f"reference gradient, jit={jit}")


@pytest.mark.parametrize("cls", [fc.InBatchContrastiveLoss, keras2.InBatchContrastiveLoss])
@pytest.mark.parametrize("miner", MINERS)
def test_the_memory_is_mined_as_references(rng, cls, miner):
    # Keras 3's class computes in its dtype, tf_keras' in the inputs'.
    extra = dict(dtype="float64") if cls is fc.InBatchContrastiveLoss else {}
    loss_object = cls(memory_size=10, **extra, **options(miner, "uniform"))
    held_labels, held = np.zeros(0, np.int64), np.zeros((0, 6))
    for step in range(3):
        labels, e = batch(rng, 4, duplicates=False)
        x = tf.constant(e)
        with tf.GradientTape() as tape:
            tape.watch(x)
            value = loss_object(labels, x)
        grad = tape.gradient(value, x)
        want_loss, want_grad, _ = oracle(
            labels, e, held_labels, held, np.full(4, 0.25), **options(miner, "uniform")
        )
        assert_close(float(value), want_loss.mean(), "float32", f"loss, step {step}")
        assert_close(grad, want_grad, "float32", f"gradient, step {step}")
        held_labels = np.concatenate([held_labels, labels])[-10:]
        held = np.concatenate([held, e])[-10:]


@pytest.mark.parametrize("cls", [fc.InBatchContrastiveLoss, keras2.InBatchContrastiveLoss])
def test_keras_classes_carry_the_miner_in_their_config(cls):
    loss = cls(miner="multi_similarity", miner_epsilon=0.3)
    config = loss.get_config()
    assert (config["miner"], config["miner_epsilon"]) == ("multi_similarity", 0.3)
    again = cls.from_config(config)
    assert (again.miner, again.miner_epsilon) == ("multi_similarity", 0.3)
    again.miner = "batch_hard"
    assert again.get_config()["miner"] == "batch_hard"
    with pytest.raises(ValueError, match="miner must be one of None, 'batch_hard'"):
        again.miner = "hardest"


@pytest.mark.parametrize("jit_compile", [False, True])
def test_fit_with_a_miner_trains(rng, jit_compile):
    keras.utils.set_random_seed(0)
    labels = rng.integers(0, 4, size=64)
    x = rng.normal(size=(64, 8)).astype("float32") + labels[:, None]
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    model.compile(
        keras.optimizers.Adam(1e-2),
        fc.InBatchContrastiveLoss(miner="multi_similarity", margin=2.0),
        jit_compile=jit_compile,
    )
    history = model.fit(x, labels, batch_size=32, epochs=5, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(miner="hard"), ValueError, "one of None, 'batch_hard', 'multi_similarity'; got"),
        (dict(miner=1), ValueError, "miner must be one of None"),
        (dict(miner="batch_hard", miner_epsilon=-0.5), ValueError, "miner_epsilon must be finite"),
        (dict(miner_epsilon=float("inf")), ValueError, "miner_epsilon must be finite"),
        (dict(miner_epsilon="0.1"), TypeError, "miner_epsilon must be a number"),
    ],
)
def test_bad_miner_arguments_raise_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        fc.in_batch_contrastive_loss([0, 1], [[0.0], [1.0]], **kwargs)
    with pytest.raises(error, match=match):
        fc.InBatchContrastiveLoss(**kwargs)


def test_the_pybind_module_names_bad_miners():
    assert _kernels.MINERS == _inputs.MINERS
    with pytest.raises(ValueError, match="miner must be one of None, 'batch_hard', 'multi_sim"):
        _kernels.in_batch_loss_cpu([0, 1], np.zeros((2, 1)), miner="hard")
    with pytest.raises(ValueError, match="miner_epsilon must be finite and >= 0"):
        _kernels.in_batch_loss_cpu([0, 1], np.zeros((2, 1)), miner="batch_hard", miner_epsilon=-1)


@pytest.mark.skipif(HLO_ON_CPU, reason="this is the run it starts")
def test_the_hlo_lowering_passes_the_xla_cases(tmp_path):
    # What XLA on GPU compiles, checked on the CPU: the cases above that
    # compile with XLA, again with FUSED_CONTRASTIVE_XLA_CPU_HLO=1.
    cases = "(explicit_pairs and not 1000) or ties or without or nan_row or with_references or fit"
    run_tests_under_hlo(__file__, tmp_path, keyword=cases)


@pytest.mark.parametrize("miner", MINERS)
def test_linear_memory_at_32768_rows(miner):
    # B = 32,768, D = 64: one B x B float32 matrix is 4 GiB (PML's miners build
    # several); forward and backward must stay under 1.5 GB of extra peak RSS.
    result = run_python(f"""
        import resource
        import numpy as np
        import tensorflow as tf
        import fused_contrastive as fc
        rng = np.random.default_rng(0)
        x = tf.constant(rng.normal(size=(32768, 64)).astype(np.float32))
        labels = tf.constant(rng.integers(0, 1000, size=32768))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_mean(fc.in_batch_contrastive_loss(
                labels, x, margin=16.0, miner={miner!r}))
        grad = tape.gradient(loss, x)
        assert np.all(np.isfinite(grad)) and float(loss) > 0
        print("extra_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
        """)
    assert result.returncode == 0, result.stderr[-3000:]
    extra_kib = int(result.stdout.split()[-1])
    assert extra_kib < 1.5 * 2**20, f"extra peak RSS {extra_kib / 2**20:.2f} GiB"
