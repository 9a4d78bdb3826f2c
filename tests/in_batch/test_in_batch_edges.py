"""Issue 18, the in-batch kernels: NaN embeddings (item 1), scratch linear in
B and exhausted memory (item 3), extreme scales (item 6), the accuracy near
the Gram-cancellation threshold (item 7) and the pybind11 entry's argument
checks (item 11)."""

import numpy as np
import pytest
import tensorflow as tf
from support import run_python, run_tests_under_hlo
from test_in_batch import numpy_in_batch

import fused_contrastive as fc
from fused_contrastive import _kernels
from fused_contrastive._inputs import PAIR_WEIGHTINGS
from fused_contrastive.reference import in_batch_contrastive_loss_reference

NAN = float("nan")


def nan_batch(dtype):
    """Issue 18's case plus a row with one NaN coordinate among finite ones."""
    labels = np.array([0, 1, 0, 1, 2])
    e = np.array([[0.0, 0.0], [1.0, 0.0], [NAN, 0.0], [0.3, -0.2], [0.5, 0.5]], dtype)
    return labels, e


def loss_and_gradient(function, labels, e, **options):
    x = tf.constant(e)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = function(labels, x, **options)
        total = tf.reduce_sum(loss)
    return loss.numpy(), tape.gradient(total, x).numpy()


PATHS = {
    "eager": fc.in_batch_contrastive_loss,
    "graph": tf.function(fc.in_batch_contrastive_loss, jit_compile=False),
    "xla": tf.function(fc.in_batch_contrastive_loss, jit_compile=True),
    "reference": in_batch_contrastive_loss_reference,
}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("margins", [(1.0, 0.0), (0.0, 5.0)])
def test_a_nan_partner_makes_every_anchor_nan(path, distance, dtype, margins):
    # Every anchor has row 2 as a partner; margins (0, 5) leave no hinge
    # active on finite pairs, so only NaN propagation can make them NaN.
    labels, e = nan_batch(dtype)
    loss, grad = loss_and_gradient(
        PATHS[path], labels, e, margin=margins[0], positive_margin=margins[1], distance=distance
    )
    assert np.isnan(loss).all(), loss
    assert np.isnan(grad).any(axis=1).all(), grad


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_a_nan_partner_in_the_kernel_module_and_the_keras_class(distance):
    labels, e = nan_batch("float64")
    loss, grad = _kernels.in_batch_loss_cpu(labels, e, np.ones(5), distance=distance)
    assert np.isnan(loss).all() and np.isnan(grad).any(axis=1).all(), (loss, grad)
    reduced = fc.InBatchContrastiveLoss(distance=distance)(labels, tf.constant(e))
    assert np.isnan(reduced.numpy())


def test_the_hlo_lowering_gives_nan_too():
    result = run_python(
        """
        import numpy as np, tensorflow as tf
        import fused_contrastive as fc
        e = np.array([[0.0, 0.0], [1.0, 0.0], [np.nan, 0.0]])
        for distance in ("euclidean", "cosine"):
            f = tf.function(fc.in_batch_contrastive_loss, jit_compile=True)
            print(distance, np.isnan(f([0, 1, 0], e, distance=distance).numpy()).all())
        """,
        FUSED_CONTRASTIVE_XLA_CPU_HLO="1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["euclidean", "True", "cosine", "True"], result.stdout


def test_keras_fit_with_a_nan_row_reports_nan_and_terminates():
    import keras

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    x[5, 1] = NAN
    y = rng.integers(0, 3, size=64)
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(optimizer="sgd", loss=fc.InBatchContrastiveLoss(), jit_compile=False)
    history = model.fit(
        x, y, batch_size=64, epochs=5, verbose=0, callbacks=[keras.callbacks.TerminateOnNaN()]
    )
    assert len(history.history["loss"]) == 1  # stopped after the first epoch
    assert np.isnan(history.history["loss"][0])
    assert model.stop_training


# --- item 6: extreme scales ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_huge_margin_is_no_nan(rng, dtype):
    # Margin 1e30: negative terms 1e60, inf in float32; the pairs outside a
    # mask (positives, each row with itself) must still add exactly 0.
    labels = np.array([0, 0, 1, 1, 2, 2])
    e = rng.normal(size=(6, 3))
    for weighting in PAIR_WEIGHTINGS:
        want, _ = numpy_in_batch(labels, e, margin=1e30, weighting=weighting)
        for function in (fc.in_batch_contrastive_loss, in_batch_contrastive_loss_reference):
            loss, grad = loss_and_gradient(
                function, labels, e.astype(dtype), margin=1e30, pair_weighting=weighting
            )
            assert not np.isnan(loss).any() and np.isfinite(grad).all(), (function, loss)
            if dtype == "float64":
                np.testing.assert_allclose(loss, want, rtol=1e-12)
            else:
                assert np.isposinf(loss).all()


def test_the_hlo_lowering_takes_a_huge_margin_as_the_kernel_does(rng):
    # The loop selects masked terms as the kernel does: multiplying them by
    # the mask made 0·inf = NaN of every anchor at margin 1e30.
    labels = np.array([0, 0, 1, 1, 2, 2])
    e = rng.normal(size=(6, 3))
    want = [
        fc.in_batch_contrastive_loss(labels, e.astype(dtype), margin=1e30, pair_weighting=weighting)
        .numpy()
        .tolist()
        for dtype in ("float32", "float64")
        for weighting in PAIR_WEIGHTINGS
    ]
    result = run_python(
        f"""
        import numpy as np, tensorflow as tf
        import fused_contrastive as fc
        e = np.array({e.tolist()})
        f = tf.function(fc.in_batch_contrastive_loss, jit_compile=True)
        print([f({labels.tolist()}, e.astype(dtype), margin=1e30,
                 pair_weighting=weighting).numpy().tolist()
               for dtype in ("float32", "float64") for weighting in {PAIR_WEIGHTINGS}])
        """,
        FUSED_CONTRASTIVE_XLA_CPU_HLO="1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    got = eval(result.stdout.strip(), {"inf": float("inf")})
    n = len(PAIR_WEIGHTINGS)  # float32's cases, then float64's
    np.testing.assert_allclose(np.array(got[n:]), np.array(want[n:]), rtol=1e-12)
    assert np.isposinf(got[:n]).all(), got  # float32: the terms overflow, as in the kernel


@pytest.mark.parametrize("scale", [1e19, 1e-20, 1e-30, 1e30])
@pytest.mark.parametrize("path", ["eager", "xla", "reference"])
def test_cosine_is_scale_invariant_in_float32(rng, scale, path):
    labels = np.array([0, 0, 1, 1, 2])
    e = rng.normal(size=(5, 4)).astype(np.float32)
    e[1] = e[0]  # identical rows: distance 0
    loss, grad = loss_and_gradient(PATHS[path], labels, e, distance="cosine")
    scaled = (e.astype(np.float64) * scale).astype(np.float32)
    got, got_grad = loss_and_gradient(PATHS[path], labels, scaled, distance="cosine")
    np.testing.assert_allclose(got, loss, rtol=1e-5, atol=1e-6)
    # d(loss)/de scales as 1/scale.
    np.testing.assert_allclose(got_grad * scale, grad, rtol=1e-4, atol=1e-5)


def test_the_hlo_lowering_keeps_cosine_scale_invariant(tmp_path):
    # The HLO loop divides rows of extreme scale by 2^k as the kernels do:
    # unscaled, Σe² overflowed to NaN losses at 1e19 in float32.
    run_tests_under_hlo(__file__, tmp_path, "cosine_is_scale_invariant_in_float32 and xla")


def test_ordinary_cosine_rows_keep_their_bits(rng):
    # Rows of moderate scale are read in place, as before the scaling rule;
    # rows of extreme scale next to them do not change their bits either.
    labels = rng.integers(0, 3, size=40)
    e = rng.normal(size=(40, 7))
    mixed = e.copy()
    mixed[3] *= 2.0**60  # the cosine distance of row 3 is the same, exactly
    for max_block_rows in (0, 8):
        a = _kernels.in_batch_loss_cpu(
            labels, e, np.ones(40), distance="cosine", max_block_rows=max_block_rows
        )
        b = _kernels.in_batch_loss_cpu(
            labels, mixed, np.ones(40), distance="cosine", max_block_rows=max_block_rows
        )
        assert a[0].tobytes() == b[0].tobytes()
        others = np.arange(40) != 3
        assert a[1][others].tobytes() == b[1][others].tobytes()
        assert np.array_equal(a[1][3], b[1][3] * 2.0**60)


# --- item 11: the kernel module's argument checks ----------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(positive_margin=-1.0), "positive_margin must be finite and non-negative"),
        (dict(margin=NAN), "^margin must be finite"),
        (dict(max_block_rows=-5), "max_block_rows must be >= 0"),
    ],
)
def test_kernel_module_names_the_bad_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _kernels.in_batch_loss_cpu([0, 1], np.ones((2, 2)), None, **kwargs)


# --- item 3: scratch linear in B, exhausted memory is an error ----------------------------


def test_one_row_blocks_keep_scratch_linear():
    # The block-pair schedule of B = 16384 one-row blocks held 16 bytes per
    # pair: 2 GiB. Peak RSS may now grow by the inputs' and outputs' size
    # (about 1 MiB) and allocator slack only.
    result = run_python(
        """
        import resource
        import numpy as np
        from fused_contrastive import _kernels
        b = 16384
        labels = np.arange(b) % 7
        e = np.random.default_rng(0).normal(size=(b, 1)).astype(np.float32)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        loss, _ = _kernels.in_batch_loss_cpu(labels, e, None, max_block_rows=1)
        assert np.isfinite(loss).all()
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
        """,
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    extra_kib = int(result.stdout.split()[-1])
    assert extra_kib < 64 * 1024, f"extra peak RSS {extra_kib / 1024:.0f} MiB"


def test_exhausted_memory_is_an_error_not_a_crash():
    # The address space is capped a little above what the process holds with
    # its inputs, far below the in-batch kernel's linear scratch for 2^24
    # rows (about 1 GiB); every path must raise, and the process go on.
    result = run_python(
        """
        import resource
        import numpy as np
        import tensorflow as tf
        import fused_contrastive as fc
        from fused_contrastive import _kernels

        def call(name, f):
            try:
                f()
                print(name, "no error")
            except (tf.errors.ResourceExhaustedError, MemoryError) as e:
                print(name, type(e).__name__, "out of memory" in str(e))

        b = 1 << 24
        labels = np.arange(b, dtype=np.int64) % 5
        e = np.zeros((b, 1), np.float32)
        small = fc.in_batch_contrastive_loss(labels[:8], e[:8])  # pools and kernels loaded
        x = tf.constant(e)
        y = tf.constant(labels)
        jit = tf.function(fc.in_batch_contrastive_loss, jit_compile=True)
        jit(labels[:8], e[:8])

        def loss_and_gradient():
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = fc.in_batch_contrastive_loss(y, x)
            tape.gradient(loss, x)

        with open("/proc/self/status") as f:
            vm = [int(l.split()[1]) for l in f if l.startswith("VmSize")][0] * 1024
        limit = vm + (384 << 20)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        call("op", lambda: fc.in_batch_contrastive_loss(y, x))
        call("grad", loss_and_gradient)
        call("keras", lambda: fc.InBatchContrastiveLoss()(y, x))
        call("xla", lambda: jit(y, x))
        call("pybind", lambda: _kernels.in_batch_loss_cpu(labels, e, None))
        print("alive", float(small[0]))
        """,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[-1].startswith("alive"), result.stdout
    # The op's error is the kernels' own (its scratch), not TF's allocator's.
    want = [
        "op ResourceExhaustedError True",
        "grad ResourceExhaustedError",
        "keras ResourceExhaustedError",
        "xla ResourceExhaustedError",
        "pybind MemoryError",
    ]
    got = [line for line in lines if line.split()[0] in ("op", "grad", "keras", "xla", "pybind")]
    assert [g[: len(w)] for g, w in zip(got, want)] == want and len(got) == 5, result.stdout


# --- item 7: accuracy on both sides of the Gram-cancellation threshold -------------------


def exact_squared_distance(a, b):
    from fractions import Fraction

    return float(sum((Fraction(float(x)) - Fraction(float(y))) ** 2 for x, y in zip(a, b)))


@pytest.mark.parametrize(
    "dtype, bound, exponents",
    [
        ("float32", 2e-4, range(-16, -4)),
        ("float64", 1e-9, range(-30, -12)),
    ],
)
def test_close_positive_pairs_meet_the_readme_accuracy(rng, dtype, bound, exponents):
    # README: float32 losses within 2e-4 relative of the exact value, float64
    # within 1e-9. A positive pair (margins 0, B = 2) has loss d²; its Gram
    # form cancels most near the threshold below which the kernels take
    # e_i - e_j directly, so d²/(|e_i|² + |e_j|²) sweeps both sides of it.
    worst = 0.0
    for exponent in exponents:
        for step in (1.0, 1.19, 1.41, 1.68):
            for _ in range(12):
                a = rng.normal(size=16)
                a *= rng.uniform(0.5, 50) / np.linalg.norm(a)
                u = rng.normal(size=16)
                b = a + np.sqrt(step * 2.0**exponent * 2 * (a @ a)) * u / np.linalg.norm(u)
                e = np.stack([a, b]).astype(dtype)
                loss, _ = _kernels.in_batch_loss_cpu(np.array([3, 3]), e, None, margin=0.0)
                want = exact_squared_distance(e[0], e[1])
                worst = max(worst, abs(float(loss[0]) - want) / want)
    assert worst <= bound, f"worst relative error {worst:.2e}"
