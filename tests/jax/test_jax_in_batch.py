"""fused_contrastive.jax.in_batch_contrastive_loss (issue 22): the CPU kernels
through their typed-FFI handlers, against the TensorFlow function (the same
kernels: the same bits), under jax.jit, jax.grad and jax.vmap; float64 in a
process with jax_enable_x64; and every loss of fused_contrastive.jax in a
process where TensorFlow cannot be imported."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from support import run_python

import fused_contrastive as fc
import fused_contrastive.jax as fcj

OPTIONS = [
    dict(),
    dict(margin=1.25, positive_margin=0.25, distance="cosine", pair_weighting="balanced"),
    dict(margin=2.0, pair_weighting="active", miner="batch_hard"),
    dict(margin=2.0, distance="cosine", miner="multi_similarity", miner_epsilon=0.3),
]


def _tf_loss_and_grad(labels, e, upstream, **options):
    x = tf.constant(e)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = fc.in_batch_contrastive_loss(labels, x, **options)
        total = tf.reduce_sum(loss * upstream)
    return loss.numpy(), tape.gradient(total, x).numpy()


@pytest.mark.parametrize("options", OPTIONS)
def test_jax_gives_the_tensorflow_functions_bits(rng, options):
    labels = rng.integers(0, 5, 40)
    e = rng.normal(size=(40, 8)).astype(np.float32)
    upstream = rng.normal(size=40).astype(np.float32)
    want_loss, want_grad = _tf_loss_and_grad(labels, e, upstream, **options)

    def total(x):
        return jnp.sum(fcj.in_batch_contrastive_loss(labels, x, **options) * upstream)

    loss = fcj.in_batch_contrastive_loss(labels, e, **options)
    grad = jax.jit(jax.grad(total))(e)
    np.testing.assert_array_equal(np.asarray(loss).view(np.int32), want_loss.view(np.int32))
    np.testing.assert_array_equal(np.asarray(grad).view(np.int32), want_grad.view(np.int32))
    jitted = jax.jit(lambda x: fcj.in_batch_contrastive_loss(labels, x, **options))(e)
    np.testing.assert_array_equal(np.asarray(jitted), np.asarray(loss))


@pytest.mark.parametrize("options", OPTIONS[:2])
def test_the_gradient_of_a_mean_scales_the_one_sweeps_gradient_as_tensorflow_does(rng, options):
    labels = rng.integers(0, 5, 33)
    e = rng.normal(size=(33, 8)).astype(np.float32)
    x = tf.constant(e)
    with tf.GradientTape() as tape:
        tape.watch(x)
        total = tf.reduce_mean(fc.in_batch_contrastive_loss(labels, x, **options))
    want = tape.gradient(total, x).numpy()
    grad = jax.jit(jax.grad(lambda y: fcj.in_batch_contrastive_loss(labels, y, **options).mean()))
    np.testing.assert_array_equal(np.asarray(grad(e)).view(np.int32), want.view(np.int32))


@pytest.mark.parametrize(
    "labels_dtype, reference_dtype, upstream",
    [
        (np.int64, np.int32, "mean"),
        (np.float32, np.int64, "weights"),
        (np.int32, np.int32, "weights"),
    ],
)
def test_references_give_the_tensorflow_functions_bits(
    rng, labels_dtype, reference_dtype, upstream
):
    labels = rng.integers(0, 4, 21).astype(labels_dtype)
    references = rng.integers(0, 6, 13).astype(reference_dtype)
    e, r = rng.normal(size=(21, 5)).astype(np.float32), rng.normal(size=(13, 5)).astype(np.float32)
    weights = rng.uniform(0.5, 2, 21).astype(np.float32) if upstream == "weights" else None
    options = dict(margin=1.5, pair_weighting="balanced", miner="multi_similarity")
    x, y = tf.constant(e), tf.constant(r)
    with tf.GradientTape() as tape:
        tape.watch([x, y])
        loss = fc.in_batch_contrastive_loss(
            labels, x, reference_labels=references, reference_embeddings=y, **options
        )
        total = tf.reduce_mean(loss) if weights is None else tf.reduce_sum(loss * weights)
    want_e, want_r = (g.numpy() for g in tape.gradient(total, [x, y]))

    def objective(a, b):
        got = fcj.in_batch_contrastive_loss(
            labels, a, reference_labels=references, reference_embeddings=b, **options
        )
        return (jnp.mean(got) if weights is None else jnp.sum(got * weights)), got

    (_, got), (grad_e, grad_r) = jax.jit(jax.value_and_grad(objective, (0, 1), has_aux=True))(e, r)
    assert got.shape == (21,)
    np.testing.assert_array_equal(np.asarray(got).view(np.int32), loss.numpy().view(np.int32))
    np.testing.assert_array_equal(np.asarray(grad_e).view(np.int32), want_e.view(np.int32))
    np.testing.assert_array_equal(np.asarray(grad_r).view(np.int32), want_r.view(np.int32))


def test_vmap_runs_each_batch_of_a_leading_axis(rng):
    labels = rng.integers(0, 3, (4, 12))
    e = rng.normal(size=(4, 12, 5)).astype(np.float32)
    got = jax.vmap(lambda y, x: fcj.in_batch_contrastive_loss(y, x, margin=1.5))(labels, e)
    grads = jax.vmap(jax.grad(lambda y, x: fcj.in_batch_contrastive_loss(y, x).sum(), 1))(labels, e)
    for b in range(4):
        want_loss, want_grad = _tf_loss_and_grad(labels[b], e[b], np.ones(12, np.float32))
        np.testing.assert_array_equal(
            got[b], fcj.in_batch_contrastive_loss(labels[b], e[b], margin=1.5)
        )
        np.testing.assert_array_equal(np.asarray(grads[b]), want_grad)


def test_float_labels_compare_by_value_as_in_tensorflow(rng):
    # -0 equals 0; NaN equals nothing, not even another NaN; 0.1 is not 0.
    labels = np.array([0.0, -0.0, np.nan, np.nan, 0.1, 0.1, 2.5, 0.0], np.float32)
    e = rng.normal(size=(8, 3)).astype(np.float32)
    want_loss, want_grad = _tf_loss_and_grad(labels, e, np.ones(8, np.float32), margin=2.0)
    loss, grad = jax.value_and_grad(
        lambda x: fcj.in_batch_contrastive_loss(labels, x, margin=2.0).sum()
    )(e)
    np.testing.assert_array_equal(fcj.in_batch_contrastive_loss(labels, e, margin=2.0), want_loss)
    np.testing.assert_array_equal(grad, want_grad)
    integer = np.array([0, 0, 1, 2, 3, 3, 4, 0])  # the same classes
    np.testing.assert_array_equal(fcj.in_batch_contrastive_loss(integer, e, margin=2.0), want_loss)


@pytest.mark.parametrize("dtype", [np.float16, jnp.bfloat16])
def test_16_bit_embeddings_are_computed_in_float32_as_in_tensorflow(rng, dtype):
    labels = rng.integers(0, 3, 11)
    e = rng.normal(size=(11, 4)).astype(dtype)
    want_loss, want_grad = _tf_loss_and_grad(labels, e, np.ones(11, dtype), distance="cosine")
    loss, grad = jax.value_and_grad(
        lambda x: fcj.in_batch_contrastive_loss(labels, x, distance="cosine").sum()
    )(e)
    got = fcj.in_batch_contrastive_loss(labels, e, distance="cosine")
    assert got.dtype == grad.dtype == dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), want_loss.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(grad, np.float32), want_grad.astype(np.float32))


def test_labels_of_shape_b_by_1_and_empty_batches(rng):
    e = rng.normal(size=(6, 3)).astype(np.float32)
    labels = rng.integers(0, 2, 6)
    np.testing.assert_array_equal(
        fcj.in_batch_contrastive_loss(labels[:, None], e), fcj.in_batch_contrastive_loss(labels, e)
    )
    assert fcj.in_batch_contrastive_loss(np.zeros(0, int), np.zeros((0, 3), np.float32)).shape == (
        0,
    )


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(miner="hard"), ValueError, "miner must be one of None, 'batch_hard'"),
        (dict(pair_weighting="mean"), ValueError, "pair_weighting must be one of 'uniform'"),
        (dict(distance="manhattan"), ValueError, "distance must be one of 'euclidean', 'cosine'"),
        (dict(margin=-1.0), ValueError, "margin must be finite and non-negative"),
        (dict(positive_margin="1"), TypeError, "positive_margin must be a real number"),
        (dict(max_block_rows=0), ValueError, "max_block_rows must be None or a positive int"),
    ],
)
def test_bad_options_raise_the_tensorflow_functions_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        fcj.in_batch_contrastive_loss([0, 1], np.zeros((2, 2), np.float32), **kwargs)
    with pytest.raises(error, match=match):
        fc.in_batch_contrastive_loss([0, 1], np.zeros((2, 2), np.float32), **kwargs)


def test_bad_inputs_raise_clear_errors():
    e = np.zeros((3, 2), np.float32)
    with pytest.raises(TypeError, match="labels must be class ids"):
        fcj.in_batch_contrastive_loss([True, False, True], e)
    with pytest.raises(TypeError, match="embeddings must be float16, bfloat16, float32, float64"):
        fcj.in_batch_contrastive_loss([0, 1, 0], e.astype(np.int32))
    with pytest.raises(ValueError, match=r"labels must have shape \[B\] or \[B, 1\] for"):
        fcj.in_batch_contrastive_loss([0, 1], e)
    with pytest.raises(ValueError, match=r"embeddings must have rank 2, \[B, D\]"):
        fcj.in_batch_contrastive_loss([0, 1, 0], e[:, :, None])
    with pytest.raises(ValueError, match="must be given together"):
        fcj.in_batch_contrastive_loss([0, 1, 0], e, reference_labels=[1])
    with pytest.raises(ValueError, match=r"must have the embeddings' D"):
        fcj.in_batch_contrastive_loss(
            [0, 1, 0], e, reference_labels=[1], reference_embeddings=[[1.0]]
        )
    with pytest.raises(ValueError, match=r"reference_labels must have shape \[R\] or \[R, 1\]"):
        fcj.in_batch_contrastive_loss(
            [0, 1, 0], e, reference_labels=[1, 2], reference_embeddings=e[:1]
        )
    with pytest.raises(ValueError, match="the name of the mapped axis to gather along"):
        fcj.in_batch_contrastive_loss([0, 1, 0], e, gather_across_replicas=True)
    with pytest.raises(NameError, match="unbound axis name: batch"):
        fcj.in_batch_contrastive_loss([0, 1, 0], e, gather_across_replicas="batch")


# Four CPU devices (set before JAX starts, so in a process of its own): a
# shard_map over them, each with its slice of the global batch and references,
# against one device on the whole batch.
GATHER_RUN = """
import json
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import fused_contrastive.jax as fcj

mesh = jax.make_mesh((4,), ("batch",))
rng = np.random.default_rng(3)
labels = rng.integers(0, 5, 24).astype(np.int32)
e = rng.normal(size=(24, 6)).astype(np.float32)
ref_labels = rng.integers(0, 5, 7).astype(np.int32)
refs = rng.normal(size=(7, 6)).astype(np.float32)
out = {}
for name, options in OPTIONS.items():
    def per_anchor(y, x, r):
        return fcj.in_batch_contrastive_loss(
            y, x, reference_labels=ref_labels, reference_embeddings=r,
            gather_across_replicas="batch", **options)

    def global_mean(x, r):
        # Each device's mean over its anchors, averaged over the devices.
        local = jax.shard_map(
            lambda y, x, r: jax.lax.pmean(jnp.mean(per_anchor(y, x, r)), "batch"),
            mesh=mesh, in_specs=(P("batch"), P("batch"), P()), out_specs=P())
        return local(labels_on, x, r)

    shard = lambda v, spec: jax.device_put(v, NamedSharding(mesh, spec))
    labels_on, e_on, refs_on = shard(labels, P("batch")), shard(e, P("batch")), shard(refs, P())
    losses = jax.jit(jax.shard_map(per_anchor, mesh=mesh, in_specs=(P("batch"), P("batch"), P()),
                                   out_specs=P("batch")))(labels_on, e_on, refs_on)
    loss, (grad, ref_grad) = jax.jit(jax.value_and_grad(global_mean, (0, 1)))(e_on, refs_on)
    def one_device(x, r):
        return fcj.in_batch_contrastive_loss(
            labels, x, reference_labels=ref_labels, reference_embeddings=r, **options)
    want_loss, (want_grad, want_ref_grad) = jax.value_and_grad(
        lambda x, r: jnp.mean(one_device(x, r)), (0, 1))(e, refs)
    out[name] = [
        np.asarray(v, np.float64).ravel().tolist()
        for v in (losses, one_device(e, refs), loss, want_loss, grad, want_grad, ref_grad,
                  want_ref_grad)
    ]
print(json.dumps(out))
"""


def test_gathered_across_a_shard_map_axis_is_the_global_batch_on_one_device():
    options = {
        "uniform": {},
        "balanced-cosine": dict(pair_weighting="balanced", distance="cosine", margin=0.6),
        "batch_hard": dict(miner="batch_hard", margin=1.5),
    }
    result = run_python(
        f"OPTIONS = {options!r}\n" + GATHER_RUN,
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_PLATFORMS="cpu",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    for name, values in out.items():
        losses, want_losses, loss, want_loss, *grads = (np.array(v) for v in values)
        assert losses.shape == (24,) and np.abs(want_losses).max() > 0
        np.testing.assert_allclose(losses, want_losses, rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(loss, want_loss, rtol=1e-5, err_msg=name)
        for got, want in zip(grads[::2], grads[1::2]):
            assert np.abs(want).max() > 0
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=name)


def test_float64_and_without_tensorflow():
    # jax_enable_x64 for float64, and TensorFlow made unimportable, as on a
    # machine with JAX alone: the package imports, its TF names say why not.
    labels = [0, 1, 0, 1, 2, 2, 0]
    e = np.random.default_rng(3).normal(size=(7, 4))
    result = run_python(
        f"""
        import importlib.abc, json, sys
        import numpy as np

        class NoTensorFlow(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "tensorflow":
                    raise ModuleNotFoundError("No module named 'tensorflow'", name="tensorflow")

        sys.meta_path.insert(0, NoTensorFlow())
        import jax
        jax.config.update("jax_enable_x64", True)
        import fused_contrastive as fc
        import fused_contrastive.jax as fcj
        try:
            fc.ContrastiveLoss
            missing = ""
        except ImportError as error:
            missing = str(error)
        e = np.array({e.tolist()})
        loss = fcj.in_batch_contrastive_loss({labels}, e, miner="batch_hard", margin=2.0)
        grad = jax.grad(lambda x: fcj.in_batch_contrastive_loss({labels}, x, margin=2.0).sum())(e)
        pairs = fcj.contrastive_loss_from_embeddings({labels}, e, e[::-1], distance="cosine")
        per_sample = fcj.contrastive_loss({labels}, e[:, 0] ** 2, margin=0.3)
        print(json.dumps([str(loss.dtype), np.asarray(loss).view(np.int64).tolist(),
                          np.asarray(grad).view(np.int64).tolist(),
                          np.asarray(pairs).view(np.int64).tolist(),
                          np.asarray(per_sample).view(np.int64).tolist(),
                          "tensorflow" in sys.modules, missing]))
        """,
        JAX_PLATFORMS="cpu",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = json.loads(result.stdout.strip().splitlines()[-1])
    dtype, loss, grad, pairs, per_sample, tf_imported, missing = output
    assert dtype == "float64" and not tf_imported
    assert "fused_contrastive.ContrastiveLoss needs TensorFlow" in missing, missing
    want_loss = fc.in_batch_contrastive_loss(labels, e, miner="batch_hard", margin=2.0).numpy()
    assert loss == want_loss.view(np.int64).tolist()
    _, want_grad = _tf_loss_and_grad(labels, e, np.ones(7), margin=2.0)
    assert grad == want_grad.view(np.int64).tolist()
    want = fc.contrastive_loss_from_embeddings(labels, e, e[::-1], distance="cosine").numpy()
    assert pairs == want.view(np.int64).tolist()
    want = fc.contrastive_loss(labels, e[:, 0] ** 2, margin=0.3).numpy()
    assert per_sample == want.view(np.int64).tolist()


def test_second_derivatives_raise_a_clear_error(rng):
    # The gradient is the kernel's backward sweep, itself not differentiable.
    labels = rng.integers(0, 2, 5)
    e = rng.normal(size=(5, 3)).astype(np.float32)

    def grad_norm(x):
        return jnp.sum(jax.grad(lambda y: fcj.in_batch_contrastive_loss(labels, y).sum())(x) ** 2)

    with pytest.raises(ValueError, match="in_batch_loss.* cannot be differentiated"):
        jax.grad(grad_norm)(e)
