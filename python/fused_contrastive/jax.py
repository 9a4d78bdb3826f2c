"""The fused in-batch contrastive loss for JAX (issue 22), importable without
TensorFlow: the CPU kernels the TensorFlow ops run, called through their
typed-FFI handlers (cc/ffi: XLA's FFI API only), which the pybind11 module
exports as capsules, with a jax.custom_vjp gradient from the kernels' own
backward sweep. On the CPU it gives the TensorFlow function's bits.

    import fused_contrastive.jax as fcj

    loss = fcj.in_batch_contrastive_loss(labels, embeddings, margin=1.0)  # [B]
    grad = jax.grad(lambda e: fcj.in_batch_contrastive_loss(labels, e).mean())(embeddings)

So far: in_batch_contrastive_loss on the CPU (float32; float64 with
jax_enable_x64). The pair and per-sample losses, the CUDA handlers and Keras 3
on JAX are issue 22's next steps.
"""

import functools

import numpy as np

import jax
import jax.numpy as jnp

from fused_contrastive import _kernels, _options

if not hasattr(_kernels, "FFI_TARGETS"):
    raise ImportError(
        "fused_contrastive.jax: this build of fused_contrastive has no typed-FFI handlers "
        "(it was built with FUSED_CONTRASTIVE_JAX=off); reinstall it without that setting"
    )

for _target, _capsule in _kernels.FFI_TARGETS.items():
    jax.ffi.register_ffi_target(_target, _capsule, platform="cpu")
_ATTRS = _kernels.FFI_ATTRS

__all__ = ["in_batch_contrastive_loss"]


def in_batch_contrastive_loss(
    labels,
    embeddings,
    margin=1.0,
    positive_margin=0.0,
    distance="euclidean",
    pair_weighting="uniform",
    miner=None,
    miner_epsilon=0.1,
    max_block_rows=None,
):
    """Each anchor's loss against every other row of the batch, [B]: what
    fused_contrastive.in_batch_contrastive_loss computes, with the same
    options (see its docstring; margins are numbers here), by the same CPU
    kernel.

    Args:
      labels: integer class ids [B] (or [B, 1]).
      embeddings: float32 or float64 [B, D] (float64 needs jax_enable_x64).

    Differentiable in `embeddings` (jax.grad, under jax.jit, and jax.vmap
    over a leading batch axis, one call per batch element); the selection of
    a miner carries no gradient.
    """
    options = (
        _options.real_margin(margin),
        _options.renamed_errors(_options.real_margin, positive_margin, "positive_margin"),
        _options.validate_choice(distance, _options.IN_BATCH_DISTANCES, "distance"),
        _options.validate_choice(pair_weighting, _options.PAIR_WEIGHTINGS, "pair_weighting"),
        *_options._check_miner(miner, miner_epsilon),
        _options._check_max_block_rows(max_block_rows) or 0,
    )
    labels = jnp.asarray(labels)
    embeddings = jnp.asarray(embeddings)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels must be integer class ids, got {labels.dtype}")
    if embeddings.dtype not in (jnp.float32, jnp.float64):
        raise TypeError(f"embeddings must be float32 or float64, got {embeddings.dtype}")
    if embeddings.ndim != 2 or labels.shape != embeddings.shape[:1]:
        raise ValueError(
            "in-batch contrastive loss: labels must be [B] (or [B, 1]) and embeddings [B, D], "
            f"got {labels.shape} and {embeddings.shape}"
        )
    return _in_batch(options, labels, embeddings)


def _call(options, labels, embeddings, upstream=None):
    """The loss handler, or with `upstream` the gradient handler (grad, loss)."""
    margin, positive_margin, distance, weighting, miner, epsilon, block_rows = options
    rows, dtype = embeddings.shape[0], embeddings.dtype
    attrs = dict(
        distance=np.int32(_ATTRS["distance"][distance]),
        pair_weighting=np.int32(_ATTRS["pair_weighting"][weighting]),
        max_block_rows=np.int32(block_rows),
        miner=np.int32(_ATTRS["miner"]["none" if miner is None else miner]),
        # The TF ops' float attr: epsilon in float32 on every path.
        miner_epsilon_bits=np.float32(epsilon).view(np.int32),
    )
    # Every row an anchor: [begin, end, grad, used].
    anchors = jnp.full(4, rows, labels.dtype).at[0].set(0)
    margins = jnp.asarray(margin, dtype), jnp.asarray(positive_margin, dtype)
    loss = jax.ShapeDtypeStruct((rows,), dtype)
    if upstream is None:
        call = jax.ffi.ffi_call("fused_contrastive_in_batch_loss", loss, vmap_method="sequential")
        return call(labels, embeddings, anchors, *margins, **attrs)
    grad = jax.ShapeDtypeStruct(embeddings.shape, dtype)
    call = jax.ffi.ffi_call(
        "fused_contrastive_in_batch_loss_grad", (grad, loss), vmap_method="sequential"
    )
    return call(labels, embeddings, anchors, upstream.astype(dtype), *margins, **attrs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _in_batch(options, labels, embeddings):
    return _call(options, labels, embeddings)


def _in_batch_forward(options, labels, embeddings):
    return _call(options, labels, embeddings), (labels, embeddings)


def _in_batch_backward(options, residuals, upstream):
    labels, embeddings = residuals
    grad, _ = _call(options, labels, embeddings, upstream)
    return None, grad


_in_batch.defvjp(_in_batch_forward, _in_batch_backward)
