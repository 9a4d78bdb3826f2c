"""The fused contrastive losses for JAX (issue 22), importable without
TensorFlow: the CPU kernels the TensorFlow ops run, called through their
typed-FFI handlers (cc/ffi: XLA's FFI API only), which the pybind11 module
exports as capsules, with jax.custom_vjp gradients from the kernels' own
backward passes. On the CPU they give the TensorFlow functions' bits.

    import fused_contrastive.jax as fcj

    loss = fcj.contrastive_loss(labels, distances, margin=1.0)              # per pair
    loss = fcj.contrastive_loss_from_embeddings(labels, a, b, margin=1.0)   # per pair
    loss = fcj.contrastive_loss_from_pairs(labels, pairs, margin=1.0)       # pairs [..., 2, D]
    loss = fcj.in_batch_contrastive_loss(labels, embeddings, margin=1.0)    # [B]
    grad = jax.grad(lambda e: fcj.in_batch_contrastive_loss(labels, e).mean())(embeddings)

On the CPU, and on the GPU in builds with CUDA kernels (their CUDA handlers);
float64 needs jax_enable_x64. pair_distance and pair_accuracy, what the
PairDistance layer and PairAccuracy metric compute, are jax.numpy (_array_math).
"""

import functools
import types

import numpy as np

import jax
import jax.numpy as jnp

from fused_contrastive import _array_math, _kernels, _options

if not hasattr(_kernels, "FFI_TARGETS"):
    raise ImportError(
        "fused_contrastive.jax: this build of fused_contrastive has no typed-FFI handlers "
        "(it was built with FUSED_CONTRASTIVE_JAX=off); reinstall it without that setting"
    )

for _target, _capsule in _kernels.FFI_TARGETS.items():
    jax.ffi.register_ffi_target(_target, _capsule, platform="cpu")
# Builds with CUDA kernels have CUDA handlers of the same targets.
for _target, _capsule in _kernels.FFI_CUDA_TARGETS.items():
    jax.ffi.register_ffi_target(_target, _capsule, platform="CUDA")
_ATTRS = _kernels.FFI_ATTRS

__all__ = [
    "contrastive_loss",
    "contrastive_loss_from_embeddings",
    "contrastive_loss_from_pairs",
    "in_batch_contrastive_loss",
    "pair_accuracy",
    "pair_distance",
]

# jax.numpy as _array_math's array namespace.
JAX_OPS = types.SimpleNamespace(
    where=jnp.where,
    ones_like=jnp.ones_like,
    zeros_like=jnp.zeros_like,
    sum=jnp.sum,
    max=jnp.max,
    abs=jnp.abs,
    sign=jnp.sign,
    sqrt=jnp.sqrt,
    isfinite=jnp.isfinite,
    stop_gradient=jax.lax.stop_gradient,
    cast=lambda x, dtype: jnp.asarray(x).astype(dtype),
    equal=jnp.equal,
    logical_not=jnp.logical_not,
)


def _checked(x, dtypes, what):
    """x as a JAX array of one of the dtypes named `dtypes`, or the TF
    function's TypeError."""
    x = jnp.asarray(x)
    problem = _options.dtype_problem(what, x.dtype.name, dtypes)
    if problem:
        raise TypeError(problem)
    return x


def _ffi_call(target, results, vmap_method, *operands, **attrs):
    """jax.ffi.ffi_call of `target` on `operands`, its results typed as
    varying over every shard_map axis that an operand varies over, as any JAX
    primitive's are. ffi_call's results carry no such type, and under
    shard_map a custom_vjp's gradient would then not match its input's type."""
    out = jax.ffi.ffi_call(target, results, vmap_method=vmap_method)(*operands, **attrs)
    axes = set().union(*map(_varying_axes, operands))

    def varying(result):
        missing = tuple(sorted(axes - _varying_axes(result)))
        return jax.lax.pcast(result, missing, to="varying") if missing else result

    return jax.tree.map(varying, out)


def _varying_axes(x):
    """The shard_map axes x varies over: its type's manual_axis_type.varying
    (jax 0.10; `vma` before), empty outside shard_map."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)
    return manual.varying if manual is not None else getattr(aval, "vma", frozenset())


def contrastive_loss(y_true, y_pred, margin=1.0, similar_label=1):
    """Per-sample contrastive loss `y*d^2 + (1-y)*max(margin-d, 0)^2`: what
    fused_contrastive.contrastive_loss computes (see its docstring; the margin
    is a number here), by the same CPU kernel.

    Args:
      y_true: labels (bool, int32, int64 or float; soft labels are used
        linearly), 1 for similar pairs unless `similar_label=0`.
      y_pred: distances (float16, bfloat16, float32 or float64), the shape of
        `y_true`; a trailing axis of size 1 on either side is squeezed.

    Differentiable in `y_pred` (jax.grad, jax.jit, jax.vmap); labels get no
    gradient.
    """
    options = (_options.real_margin(margin), _options.validate_similar_label(similar_label))
    distances = _checked(y_pred, _options.DISTANCE_DTYPES, "y_pred (distances)")
    labels = _checked(y_true, _options.LABEL_DTYPES, "y_true (labels)")
    change = _options.unit_axis_change(labels.shape, distances.shape)
    if change < 0:
        labels = labels[..., 0]
    elif change > 0:
        distances = distances[..., 0]
    if labels.shape != distances.shape:
        raise ValueError(
            "contrastive loss: labels and distances must have the same shape, got labels "
            f"{labels.shape} and distances {distances.shape}"
        )
    return _distances_loss(options, labels, distances)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _distances_loss(options, labels, distances):
    return _distances_call(options, labels, distances)[0]


def _distances_call(options, labels, distances):
    """The kernel's loss and d(loss)/d(distance), elementwise (so a vmap
    batches it as one call): the output and the residual of the VJP."""
    margin, similar_label = options
    out = jax.ShapeDtypeStruct(distances.shape, distances.dtype)
    return _ffi_call(
        "fused_contrastive_loss",
        (out, out),
        "broadcast_all",
        labels,
        distances,
        margin=np.float64(margin),
        similar_label=np.int32(similar_label),
    )


def _distances_backward(options, grad, upstream):
    return None, (upstream * grad).astype(grad.dtype)


_distances_loss.defvjp(_distances_call, _distances_backward)


def contrastive_loss_from_embeddings(
    y_true, embeddings_a, embeddings_b, margin=1.0, distance="euclidean", similar_label=1
):
    """Per-pair contrastive loss from the pairs' embeddings in one pass: what
    fused_contrastive.contrastive_loss_from_embeddings computes (see its
    docstring; the margin is a number here), by the same CPU kernels.

    Args:
      y_true: labels `[...]`, as in `contrastive_loss`.
      embeddings_a, embeddings_b: `[..., D]` (float16, bfloat16, float32 or
        float64), the same shape and dtype, `D >= 1`.
      distance: "euclidean", "cosine" or "manhattan".

    Returns the loss `[...]`, differentiable in both embeddings.
    """
    options = _pair_options(margin, distance, similar_label)
    a = _checked(embeddings_a, _options.DISTANCE_DTYPES, "embeddings_a")
    b = _checked(embeddings_b, _options.DISTANCE_DTYPES, "embeddings_b")
    if a.dtype != b.dtype:
        raise TypeError(
            "contrastive loss: embeddings_a and embeddings_b must have the same dtype; "
            f"got {a.dtype.name} and {b.dtype.name}"
        )
    if a.ndim == 0 or a.shape != b.shape or a.shape[-1] == 0:
        raise ValueError(
            "contrastive loss: embeddings_a and embeddings_b must have the same shape [..., D] "
            f"with D >= 1; got {a.shape} and {b.shape}"
        )
    rows = a.shape[:-1]
    labels = _pair_labels(y_true, rows)
    dim = a.shape[-1]
    loss = _pairs_loss(options, labels.reshape(-1), a.reshape(-1, dim), b.reshape(-1, dim))
    return loss.reshape(rows)


def contrastive_loss_from_pairs(y_true, pairs, margin=1.0, distance="euclidean", similar_label=1):
    """contrastive_loss_from_embeddings on the two embeddings of each pair
    stacked on axis -2, `pairs` `[..., 2, D]` (what a Keras model outputs for
    ContrastiveLoss(distance=...)): the kernels read the pairs, and write
    their gradient `[..., 2, D]`, in place, where slicing the halves out
    would copy them and assemble their gradients again.

    Returns the loss `[...]`, differentiable in `pairs`.
    """
    options = _pair_options(margin, distance, similar_label)
    pairs = _stacked(pairs)
    rows = pairs.shape[:-2]
    labels = _pair_labels(y_true, rows)
    loss = _pairs_loss(options, labels.reshape(-1), pairs.reshape(-1, 2, pairs.shape[-1]))
    return loss.reshape(rows)


def _pair_options(margin, distance, similar_label):
    return (
        _options.real_margin(margin),
        _options.validate_choice(distance, _options.DISTANCES, "distance"),
        _options.validate_similar_label(similar_label),
    )


def _pair_labels(y_true, rows):
    """y_true as the labels of pairs of shape `rows`: a trailing unit axis
    dropped or added as the TF functions do, other mismatches an error."""
    labels = _checked(y_true, _options.LABEL_DTYPES, "y_true (labels)")
    change = _options.unit_axis_change(labels.shape, rows)
    if change:
        labels = labels[..., 0] if change < 0 else labels[..., None]
    if labels.shape != rows:
        raise ValueError(
            "contrastive loss: labels must have the shape of the embeddings without their last "
            f"axis, {rows}; got {labels.shape}"
        )
    return labels


def _stacked(y_pred):
    """y_pred, checked to be stacked pairs `[..., 2, D]` of embeddings."""
    y_pred = _checked(y_pred, _options.DISTANCE_DTYPES, "y_pred")
    problem = _options.stacked_pairs_problem(y_pred.shape)
    if problem:
        raise ValueError(problem)
    return y_pred


def _pair_distances(pairs, distance):
    """The distances `[...]` of stacked pairs in their compute dtype (16-bit in float32)."""
    distance = _options.validate_choice(distance, _options.DISTANCES, "distance")
    pairs = _stacked(pairs)
    a, b = pairs[..., 0, :], pairs[..., 1, :]
    dtype = jnp.float32 if a.dtype.itemsize == 2 else a.dtype
    return _array_math.distance(JAX_OPS, a.astype(dtype), b.astype(dtype), distance)


def pair_distance(pairs, distance="euclidean"):
    """The distance between the two embeddings of each pair of `pairs`
    `[..., 2, D]`: shape `[...]`, the dtype of `pairs`; what
    fused_contrastive.pair_distance computes, in jax.numpy."""
    return _pair_distances(pairs, distance).astype(jnp.asarray(pairs).dtype)


def pair_accuracy(y_true, pairs, threshold=0.5, distance="euclidean", similar_label=1):
    """Per pair, 1.0 where the pair's distance (below `threshold`: similar)
    says what its label says, else 0.0; see fused_contrastive.pair_accuracy."""
    threshold = _options.validate_threshold(threshold)
    similar_label = _options.validate_similar_label(similar_label)
    d = _pair_distances(pairs, distance)
    labels = _pair_labels(y_true, d.shape)
    return _array_math.pair_accuracy(JAX_OPS, labels, d, threshold, similar_label)


# The pair targets by their embedding operands: a and b, or the stacked pairs.
_PAIR_TARGETS = {
    2: ("fused_contrastive_embedding_loss_jax", "fused_contrastive_embedding_loss_grad"),
    1: ("fused_contrastive_embedding_pair_loss_jax", "fused_contrastive_embedding_pair_loss_grad"),
}


def _pairs_call(options, labels, *embeddings):
    """The kernel's loss [rows] and its gradient coefficients: float64s,
    declared as pairs of uint32 (JAX has no float64 without jax_enable_x64;
    the gradient handler checks their size). `embeddings`: a and b
    [rows, D], or the stacked pairs [rows, 2, D]."""
    margin, distance, similar_label = options
    rows, dtype = embeddings[0].shape[0], embeddings[0].dtype
    words = (rows, _kernels.row_coefficients[distance], 2)
    return _ffi_call(
        _PAIR_TARGETS[len(embeddings)][0],
        (jax.ShapeDtypeStruct((rows,), dtype), jax.ShapeDtypeStruct(words, jnp.uint32)),
        "sequential",
        labels,
        *embeddings,
        margin=np.float64(margin),
        distance=np.int32(_ATTRS["distance"][distance]),
        similar_label=np.int32(similar_label),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _pairs_loss(options, labels, *embeddings):
    return _pairs_call(options, labels, *embeddings)[0]


def _pairs_forward(options, labels, *embeddings):
    loss, coefficients = _pairs_call(options, labels, *embeddings)
    return loss, (embeddings, coefficients)


def _pairs_backward(options, residuals, upstream):
    embeddings, coefficients = residuals
    grads = _ffi_call(
        _PAIR_TARGETS[len(embeddings)][1],
        tuple(jax.ShapeDtypeStruct(e.shape, e.dtype) for e in embeddings),
        "sequential",
        *embeddings,
        coefficients,
        upstream.astype(embeddings[0].dtype),
        distance=np.int32(_ATTRS["distance"][options[1]]),
    )
    return (None, *grads)


_pairs_loss.defvjp(_pairs_forward, _pairs_backward)


def in_batch_contrastive_loss(
    labels,
    embeddings,
    margin=1.0,
    positive_margin=0.0,
    distance="euclidean",
    pair_weighting="uniform",
    max_block_rows=None,
    reference_labels=None,
    reference_embeddings=None,
    gather_across_replicas=False,
    miner=None,
    miner_epsilon=0.1,
):
    """Each anchor's loss against every other row of the batch (and every
    reference), [B]: what fused_contrastive.in_batch_contrastive_loss
    computes, with the same options and errors (see its docstring; margins
    are numbers here), by the same CPU kernel.

    Args:
      labels: class ids [B] (or [B, 1]): int32, int64, or floats, compared by
        value.
      embeddings: [B, D], float16, bfloat16 (both computed in float32),
        float32 or float64 (which needs jax_enable_x64).
      reference_labels, reference_embeddings: optional references [R] and
        [R, D], given together (embeddings cast to the embeddings' dtype).
      gather_across_replicas: False, or the name (or tuple of names) of the
        mapped axis of an enclosing `jax.shard_map` (or `pmap`): every
        device's labels and embeddings are gathered along it, and each
        local anchor pairs with every other row of the global batch, as the
        TF function does across tf.distribute replicas. The loss of all
        devices' anchors, and its gradient (all_gather's transpose sums each
        row's gradients from every device), are the single-device loss and
        gradient of the concatenated global batch. Every device's batch has
        the same size (all_gather's rule). True raises a ValueError asking
        for the axis name.

    Differentiable in `embeddings` and `reference_embeddings` (jax.grad,
    under jax.jit, and jax.vmap over a leading batch axis, one call per batch
    element); the selection of a miner carries no gradient.
    """
    options = (
        _options.real_margin(margin),
        _options.renamed_errors(_options.real_margin, positive_margin, "positive_margin"),
        _options.validate_choice(distance, _options.IN_BATCH_DISTANCES, "distance"),
        _options.validate_choice(pair_weighting, _options.PAIR_WEIGHTINGS, "pair_weighting"),
        *_options._check_miner(miner, miner_epsilon),
        _options._check_max_block_rows(max_block_rows) or 0,
    )
    axis = _replica_axis(gather_across_replicas)
    labels, embeddings = _batch(labels, embeddings)
    partners = []  # (labels, rows) of the partners beyond the batch
    if axis is not None:
        partners.append(_other_devices_rows(axis, labels, embeddings))
    if reference_labels is not None or reference_embeddings is not None:
        if reference_labels is None or reference_embeddings is None:
            raise ValueError(
                "in-batch contrastive loss: reference_labels and reference_embeddings must be "
                "given together"
            )
        others, references = _batch(reference_labels, reference_embeddings, "reference_", "R")
        if references.shape[1] != embeddings.shape[1]:
            raise ValueError(
                "in-batch contrastive loss: reference_embeddings [R, D] must have the "
                f"embeddings' D; got {references.shape} for embeddings {embeddings.shape}"
            )
        partners.append((others, references))
    rows = embeddings
    if partners:
        if not all(jnp.issubdtype(y.dtype, jnp.integer) for y, _ in [(labels, None), *partners]):
            # Compared by value, in the widest float: equal values stay equal.
            labels = labels.astype(jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)
        labels = jnp.concatenate([labels, *(y.astype(labels.dtype) for y, _ in partners)])
        rows = jnp.concatenate([embeddings, *(e.astype(embeddings.dtype) for _, e in partners)])
    # 16-bit embeddings are computed in float32, as everywhere in the package.
    compute = rows.astype(jnp.float32) if rows.dtype.itemsize == 2 else rows
    loss = _in_batch(options, embeddings.shape[0], _class_ids(labels), compute)
    return loss.astype(embeddings.dtype)


def _replica_axis(gather_across_replicas):
    """The mapped axis name(s) to gather along, or None for False."""
    if gather_across_replicas is False or gather_across_replicas is None:
        return None
    names = gather_across_replicas
    if isinstance(names, str) or (
        isinstance(names, tuple) and names and all(isinstance(n, str) for n in names)
    ):
        return names
    raise ValueError(
        "in-batch contrastive loss: under JAX, gather_across_replicas is False or the name of "
        "the mapped axis to gather along (of an enclosing jax.shard_map or pmap), e.g. "
        f"gather_across_replicas='batch'; got {gather_across_replicas!r}"
    )


def _other_devices_rows(axis, labels, embeddings):
    """The labels [(N - 1) * B] and embeddings [(N - 1) * B, D] of the other
    devices along `axis`, in device order after this one's: the references
    that make this device's anchors pair with the whole global batch."""
    gathered_labels = jax.lax.all_gather(labels, axis)
    gathered = jax.lax.all_gather(embeddings, axis)
    devices = gathered.shape[0]
    others = (jax.lax.axis_index(axis) + jnp.arange(1, devices)) % devices
    return gathered_labels[others].reshape(-1), gathered[others].reshape(-1, gathered.shape[-1])


def _batch(labels, embeddings, prefix="", n="B"):
    """Class labels [n] (or [n, 1], squeezed) and embeddings [n, D], checked
    as the TF function checks them; prefix: what the arguments' names start
    with in the messages, n: the row count's name there."""
    labels = jnp.asarray(labels)
    embeddings = jnp.asarray(embeddings)
    what = "in-batch contrastive loss"
    if embeddings.dtype.name not in _options.DISTANCE_DTYPES:
        raise TypeError(
            f"{what}: {prefix}embeddings must be {', '.join(_options.DISTANCE_DTYPES)}; got "
            f"{embeddings.dtype.name}"
        )
    if embeddings.ndim != 2:
        raise ValueError(
            f"{what}: {prefix}embeddings must have rank 2, [{n}, D]; got shape {embeddings.shape}"
        )
    if labels.dtype.name not in _options.CLASS_LABEL_DTYPES:
        raise TypeError(
            f"{what}: {prefix}labels must be class ids ({', '.join(_options.CLASS_LABEL_DTYPES)}); "
            f"got {labels.dtype.name}"
        )
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.shape != embeddings.shape[:1]:
        raise ValueError(
            f"{what}: {prefix}labels must have shape [{n}] or [{n}, 1] for {prefix}embeddings "
            f"[{n}, D] = {embeddings.shape}; got {labels.shape}"
        )
    return labels, embeddings


def _class_ids(labels):
    """Class labels as the kernels take them: integer ids equal exactly where
    the labels compare equal. Float labels become the bits of their value in
    the widest float JAX has (float64 with jax_enable_x64, else float32),
    with -0 made +0, and NaN labels ids of their own (NaN equals nothing):
    NaN bit patterns with the row number as payload, which no number has
    (distinct for 2**23 rows in float32)."""
    if jnp.issubdtype(labels.dtype, jnp.integer):
        return labels
    x64 = jax.config.jax_enable_x64
    x = labels.astype(jnp.float64 if x64 else jnp.float32)
    x = jnp.where(x == 0, jnp.zeros_like(x), x)
    ids_type, nan_bits = (jnp.int64, 0x7FF0000000000000) if x64 else (jnp.int32, 0x7F800000)
    rows = jnp.arange(1, x.shape[0] + 1, dtype=ids_type)
    return jnp.where(jnp.isnan(x), rows | nan_bits, jax.lax.bitcast_convert_type(x, ids_type))


def _call(options, anchors, labels, embeddings, upstream=None):
    """The loss handler, or with `upstream` the gradient handler (grad,
    loss): the first `anchors` rows are the anchors, the rest references."""
    margin, positive_margin, distance, weighting, miner, epsilon, block_rows = options
    rows, dtype = embeddings.shape[0], embeddings.dtype
    attrs = dict(
        margin=np.float64(margin),
        positive_margin=np.float64(positive_margin),
        distance=np.int32(_ATTRS["distance"][distance]),
        pair_weighting=np.int32(_ATTRS["pair_weighting"][weighting]),
        max_block_rows=np.int32(block_rows),
        miner=np.int32(_ATTRS["miner"]["none" if miner is None else miner]),
        # The TF ops' float attr: epsilon in float32 on every path.
        miner_epsilon_bits=np.float32(epsilon).view(np.int32),
        anchors=np.int64(anchors),
    )
    if labels.dtype != jnp.int64:
        # The handlers take int64 ids; without jax_enable_x64 each id's two
        # 32-bit halves, which are its bytes (little-endian), as int32 [B, 2].
        labels = labels.astype(jnp.int32)
        labels = jnp.stack([labels, labels >> 31], axis=1)
    loss = jax.ShapeDtypeStruct((rows,), dtype)
    if upstream is None:
        return _ffi_call(
            "fused_contrastive_in_batch_loss_jax", loss, "sequential", labels, embeddings, **attrs
        )
    grad = jax.ShapeDtypeStruct(embeddings.shape, dtype)
    return _ffi_call(
        "fused_contrastive_in_batch_loss_grad_jax",
        (grad, loss),
        "sequential",
        labels,
        embeddings,
        upstream.astype(dtype),
        **attrs,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _in_batch(options, anchors, labels, embeddings):
    return _call(options, anchors, labels, embeddings)[:anchors]


def _in_batch_forward(options, anchors, labels, embeddings):
    """One sweep gives the loss and the gradient of the anchors' loss sum,
    which serves any upstream gradient equal on every anchor (a mean or sum
    of the losses, the usual case) scaled by it, as in the TF function."""
    ones = jnp.ones(embeddings.shape[:1], embeddings.dtype)  # the references' go unused
    grad_of_sum, loss = _call(options, anchors, labels, embeddings, ones)
    return loss[:anchors], (labels, embeddings, grad_of_sum)


def _in_batch_backward(options, anchors, residuals, upstream):
    """Another upstream (sample weights) takes a second sweep."""
    labels, embeddings, grad_of_sum = residuals
    first = upstream[:1]  # none without anchors: the gradient is 0 then
    references = jnp.zeros(embeddings.shape[0] - anchors, upstream.dtype)
    grad = jax.lax.cond(
        jnp.all(upstream == first),
        lambda: grad_of_sum * jnp.sum(first).astype(grad_of_sum.dtype),
        lambda: _call(
            options, anchors, labels, embeddings, jnp.concatenate([upstream, references])
        )[0],
    )
    return None, grad


_in_batch.defvjp(_in_batch_forward, _in_batch_backward)
