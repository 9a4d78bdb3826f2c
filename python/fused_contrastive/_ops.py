"""Loads the compiled op library (or the reference fallback) and registers the
op's gradient. Imported once, by the package."""

import functools
import json
import os
import warnings
from pathlib import Path

import tensorflow as tf
from tensorflow.python.eager import record

from fused_contrastive import _cuda, reference
from fused_contrastive._inputs import stacked_operands

# As registered in cc/tf_shared.h (tests check that they name the library's ops).
OP_NAME = "FusedContrastive>ContrastiveLoss"
REDUCED_OP_NAME = "FusedContrastive>ContrastiveLossReduced"
SCALE_OP_NAME = "FusedContrastive>ScaleGradient"
EMBEDDING_OP_NAME = "FusedContrastive>EmbeddingContrastiveLoss"
EMBEDDING_GRAD_OP_NAME = "FusedContrastive>EmbeddingContrastiveLossGrad"
EMBEDDING_REDUCED_OP_NAME = "FusedContrastive>EmbeddingContrastiveLossReduced"
EMBEDDING_PAIR_REDUCED_OP_NAME = "FusedContrastive>EmbeddingPairContrastiveLossReduced"
IN_BATCH_OP_NAME = "FusedContrastive>InBatchContrastiveLoss"
IN_BATCH_GRAD_OP_NAME = "FusedContrastive>InBatchContrastiveLossGrad"
IN_BATCH_REDUCED_OP_NAME = "FusedContrastive>InBatchContrastiveLossReduced"
USE_REFERENCE_ENV = "FUSED_CONTRASTIVE_USE_REFERENCE"
# Another build of the op library to load instead of the packaged one (a CMake
# build directory's copy, the Bazel-built one); its _build_info.json sits beside it.
LIBRARY_ENV = "FUSED_CONTRASTIVE_LIBRARY"


def _library_path():
    override = os.environ.get(LIBRARY_ENV)
    if override:
        return Path(override).resolve()
    return Path(__file__).resolve().parent / "_fused_contrastive_ops.so"


def _read_build_info():
    path = _library_path().parent / "_build_info.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())


def check_tensorflow_version(built, installed, source_dir):
    """Raises ImportError when the library was built against another TensorFlow:
    custom-op libraries have no stable ABI across TensorFlow releases."""
    if built != installed:
        raise ImportError(
            f"fused_contrastive was built against TensorFlow {built}, but TensorFlow "
            f"{installed} is installed. Rebuild it with: {_cuda.rebuild_command(source_dir)}  "
            f"(or set {USE_REFERENCE_ENV}=1 to use the slower pure-TensorFlow implementation)"
        )


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _load():
    if _env_flag(USE_REFERENCE_ENV):
        warnings.warn(
            f"{USE_REFERENCE_ENV} is set: fused_contrastive uses its pure-TensorFlow "
            "implementation instead of the compiled op (same results, slower).",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    path = _library_path()
    info = _read_build_info()
    if info is None or not path.exists():
        raise ImportError(
            f"fused_contrastive's compiled op library or its _build_info.json is missing: {path}. "
            "Install the package with 'pip install .' from its source tree (or set "
            f"{USE_REFERENCE_ENV}=1 to use the pure-TensorFlow implementation)"
        )
    check_tensorflow_version(info["tensorflow_version"], tf.__version__, info["source_dir"])
    # Before loading: loading registers the CUDA kernels' fatbinary with the
    # driver. A CPU-only build needs no driver, so none is looked up.
    too_old = _cuda.required_driver(info) and _cuda.driver_too_old_message(
        info, _cuda.installed_driver()
    )
    if too_old:
        raise ImportError(
            f"{too_old}; or set {USE_REFERENCE_ENV}=1 to use the slower "
            "pure-TensorFlow implementation"
        )
    return tf.load_op_library(str(path))


_library = _load()


def gpu_without_cuda_message(info, gpus):
    """What the import warns when TensorFlow sees GPUs (`gpus`) but the loaded
    library (build info `info`) has no CUDA kernels, else None: the losses then
    run on the CPU, and every step copies their inputs off the GPU and back."""
    if not gpus or info is None or info.get("cuda"):
        return None
    source = info.get("source_dir") or _cuda.UNKNOWN_SOURCE
    return (
        f"fused_contrastive: TensorFlow sees {len(gpus)} GPU(s), but this build of "
        f"fused_contrastive has CPU kernels only (built by {info.get('build_system', '?')} "
        f"from {source} without a CUDA compiler: nvcc was not found, or "
        "FUSED_CONTRASTIVE_CUDA=off), so its losses run on the CPU and copy their inputs from "
        "the GPU every step. Rebuild with CUDA kernels (without a CUDA toolkit, the build "
        "fetches the CUDA 13 compiler from PyPI into its temporary directory): "
        f"FUSED_CONTRASTIVE_CUDA=on {_cuda.rebuild_command(source)}"
    )


def _warn_if_gpu_without_cuda():
    if using_reference():
        return
    message = gpu_without_cuda_message(_read_build_info(), tf.config.list_physical_devices("GPU"))
    if message:
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def using_reference():
    """True when the pure-TensorFlow fallback is in use instead of the compiled op."""
    return _library is None


_warn_if_gpu_without_cuda()


def build_info():
    """How the compiled library was built (TensorFlow and its CUDA version,
    compilers, CUDA version, architectures and compiler source), the driver its
    CUDA kernels need and the one found, where it was loaded from, and whether
    the fallback is in use."""
    info = dict(_read_build_info() or {})
    needed = _cuda.required_driver(info)
    info["cuda_driver_required"] = (
        f"CUDA {_cuda.api_version_name(needed[0])} (Linux driver >= {needed[1]})" if needed else ""
    )
    driver = _cuda.installed_driver()
    info["cuda_driver_found"] = (
        f"{driver[1] or 'unknown'} (CUDA {_cuda.api_version_name(driver[0])})" if driver else ""
    )
    info["library"] = None if using_reference() else str(_library_path())
    info["using_reference"] = using_reference()
    return info


@functools.lru_cache(maxsize=256)
def _eager_scalar(value, dtype):
    with tf.device("/cpu:0"):
        return tf.constant(value, dtype)


def scalar(value, dtype=tf.float64):
    """A scalar constant: margin and loss_scale (float64, host memory), or a
    sample weight of 1."""
    if not isinstance(value, (int, float)):  # a tensor already (tf.is_tensor is slow)
        return value
    if not tf.executing_eagerly():
        return tf.constant(value, dtype)  # a Const node in the graph
    # Eager calls reuse one tensor per value instead of building one per step
    # (which costs more than the op itself on small inputs). The cache is
    # bounded: a margin schedule passed as Python floats would otherwise keep
    # one tensor per value forever.
    return _eager_scalar(value, dtype)


def loss_and_grad(labels, distances, margin, similar_label=1):
    """Runs the fused op on prepared inputs: (per-sample loss, d(loss)/d(distance))."""
    return _library.fused_contrastive_contrastive_loss(
        labels, distances, scalar(margin), similar_label=similar_label
    )


def reduced_loss_outputs(
    labels, distances, sample_weight, margin, reduction, loss_scale, similar_label=1
):
    """Runs the fused-reduction op on prepared inputs: (reduced loss, its gradient
    with respect to the distances, reduction_scale).

    reduction is "sum", "mean" or "weighted_mean"; sample_weight a scalar or a
    tensor of the distances' shape and dtype; loss_scale multiplies the result.
    """
    return _library.fused_contrastive_contrastive_loss_reduced(
        labels,
        distances,
        sample_weight,
        scalar(margin),
        scalar(loss_scale),
        reduction=reduction,
        similar_label=similar_label,
    )


def reduced_loss(*args, **kwargs):
    """The reduced loss of reduced_loss_outputs."""
    return reduced_loss_outputs(*args, **kwargs)[0]


def scale_gradient(gradient, scale):
    """gradient * scale for a scalar scale of its dtype (the reduced op's backward)."""
    return _library.fused_contrastive_scale_gradient(gradient, scale)


def embedding_loss(labels, embeddings_a, embeddings_b, margin, distance, similar_label=1):
    """Runs the embedding op on prepared inputs: the per-pair loss (its gradient
    reuses the row coefficients the op writes beside it)."""
    return _library.fused_contrastive_embedding_contrastive_loss(
        labels,
        embeddings_a,
        embeddings_b,
        scalar(margin),
        distance=distance,
        similar_label=similar_label,
    )[0]


def _reference_embedding_gradients(loss_fn, tensors, upstream):
    """Gradients of loss_fn(*tensors) (the reference) by autodiff.

    Used while a tape records the backward pass itself (a Hessian, a gradient
    penalty, or gradient() called inside a persistent tape's block): the fused
    kernels' gradients are first-order only, the reference's can be
    differentiated again.
    """
    with tf.GradientTape() as tape:
        tape.watch(tensors)
        loss = loss_fn(*tensors)
    return tape.gradient(loss, tensors, output_gradients=upstream)


def _constant_scale(scale, dtype):
    """A fused-reduction op's reduction_scale output, cast to dtype, as the
    constant it is to autodiff: it depends on the weights and the batch size
    only, and the op has no registered gradient, so an outer tape recording a
    second-order backward pass must not trace it back to the op."""
    return tf.cast(tf.stop_gradient(scale), dtype)


def reduced_embedding_loss(
    labels,
    embeddings_a,
    embeddings_b,
    sample_weight,
    margin,
    reduction,
    loss_scale,
    distance,
    similar_label=1,
):
    """The reduced loss from the embedding op with the Keras reduction fused in.

    The op writes the fully scaled gradients of both embeddings in the same
    pass; backward multiplies them by the upstream scalar (nothing on CPU when
    it is 1). Meant for calls a tape records: otherwise the gradients are
    written for nothing. Arguments as reduced_loss_outputs.
    """
    op = _library.fused_contrastive_embedding_contrastive_loss_reduced

    # custom_gradient hides the gradient outputs from the tape, which would
    # otherwise hand the backward pass zero tensors as large as the embeddings.
    @tf.custom_gradient
    def fused(a, b):
        loss, grad_a, grad_b, scale = op(
            labels,
            a,
            b,
            sample_weight,
            scalar(margin),
            scalar(loss_scale),
            distance=distance,
            reduction=reduction,
            similar_label=similar_label,
        )

        def reference_loss(a, b):
            losses = reference.reference_embedding_loss(
                labels, a, b, margin, distance, similar_label
            )
            return tf.reduce_sum(losses * sample_weight) * _constant_scale(scale, losses.dtype)

        def backward(upstream):
            if record.could_possibly_record():
                return _reference_embedding_gradients(reference_loss, [a, b], upstream)
            return scale_gradient(grad_a, upstream), scale_gradient(grad_b, upstream)

        return loss, backward

    return fused(embeddings_a, embeddings_b)


def reduced_pair_loss(
    labels, pairs, sample_weight, margin, reduction, loss_scale, distance, similar_label=1
):
    """reduced_embedding_loss on the stacked pairs [..., 2, D] a Keras model
    outputs. Where the graph shows the pair's two halves (stacked_operands),
    the two-tensor op reads them; otherwise the pair op reads the pairs, and
    writes their gradient, in place (no unstack before it, no stack of the two
    gradients after it)."""
    operands = stacked_operands(pairs)
    if operands is not None:
        return reduced_embedding_loss(
            labels, *operands, sample_weight, margin, reduction, loss_scale, distance, similar_label
        )
    op = _library.fused_contrastive_embedding_pair_contrastive_loss_reduced

    @tf.custom_gradient
    def fused(pairs):
        loss, grad, scale = op(
            labels,
            pairs,
            sample_weight,
            scalar(margin),
            scalar(loss_scale),
            distance=distance,
            reduction=reduction,
            similar_label=similar_label,
        )

        def reference_loss(pairs):
            losses = reference.reference_embedding_loss(
                labels, pairs[..., 0, :], pairs[..., 1, :], margin, distance, similar_label
            )
            return tf.reduce_sum(losses * sample_weight) * _constant_scale(scale, losses.dtype)

        def backward(upstream):
            if record.could_possibly_record():
                return _reference_embedding_gradients(reference_loss, [pairs], upstream)[0]
            return scale_gradient(grad, upstream)

        return loss, backward

    return fused(pairs)


def _is_known_zero(grad):
    """True when a gradient is the zero tensor TensorFlow's tape makes up for an
    op output nothing depends on.

    The tape fills unconnected outputs with zeros instead of passing None (a
    list of exempt ops is compiled into TensorFlow), so without this check every
    first-order backward pass would also compute the second-order term.
    """
    if grad is None:
        return True
    if tf.executing_eagerly():
        if grad.device.endswith("CPU:0"):  # zero-copy view: cheaper than two TF ops
            return not grad.numpy().any()
        return not bool(tf.reduce_any(tf.not_equal(grad, 0)))
    if grad.op.type == "ZerosLike":
        return True
    if grad.op.type == "Fill":  # zeros of a shape known only at run time
        value = tf.get_static_value(grad.op.inputs[1])
        return value is not None and value == 0
    value = tf.get_static_value(grad)  # small zeros are a Const
    return value is not None and not value.any()


@tf.RegisterGradient(OP_NAME)
def _contrastive_loss_grad(op, grad_loss, grad_dloss):
    # First order reuses the derivative the forward pass saved. A gradient
    # flowing into that derivative output (second-order autodiff, e.g. a
    # Hessian) needs d2(loss)/d(distance)2, which only then touches the inputs.
    labels, distances, margin = op.inputs
    grad = grad_loss * op.outputs[1]
    if not _is_known_zero(grad_dloss):
        grad += grad_dloss * reference.reference_second_derivative(
            labels, distances, margin, op.get_attr("similar_label")
        )
    # Labels and margin get no gradient (as documented in README).
    return [None, grad, None]


@tf.RegisterGradient(REDUCED_OP_NAME)
def _reduced_loss_grad(op, grad_loss, grad_dloss, _):
    # The forward pass wrote the fully scaled per-sample gradient; backward only
    # multiplies it by the upstream scalar (skipped on CPU when that is 1).
    labels, distances, weights, margin, _ = op.inputs
    grad = scale_gradient(op.outputs[1], grad_loss)
    if not _is_known_zero(grad_dloss):
        # dloss_ddistances = w * reduction_scale * dloss/dd: its derivative.
        scale = weights * tf.cast(op.outputs[2], weights.dtype)
        grad += (
            grad_dloss
            * scale
            * reference.reference_second_derivative(
                labels, distances, margin, op.get_attr("similar_label")
            )
        )
    # Labels, sample weights, margin and loss scale get no gradient.
    return [None, grad, None, None, None]


@tf.RegisterGradient(SCALE_OP_NAME)
def _scale_gradient_grad(op, upstream):
    # Reached only by higher-order differentiation through the reduced op.
    gradient, scale = op.inputs
    return [scale_gradient(upstream, scale), tf.reduce_sum(upstream * gradient)]


@tf.RegisterGradient(EMBEDDING_OP_NAME)
def _embedding_loss_grad(op, grad_loss, _):
    # row_coefficients are an implementation detail: only the backward below
    # reads them, so no gradient flows into them.
    labels, a, b, margin = op.inputs
    distance = op.get_attr("distance").decode()
    if record.could_possibly_record():
        grad_a, grad_b = _reference_embedding_gradients(
            lambda a, b: reference.reference_embedding_loss(
                labels, a, b, margin, distance, op.get_attr("similar_label")
            ),
            [a, b],
            grad_loss,
        )
    else:
        grad_a, grad_b = _library.fused_contrastive_embedding_contrastive_loss_grad(
            a, b, op.outputs[1], grad_loss, distance=distance
        )
    # Labels and margin get no gradient.
    return [None, grad_a, grad_b, None]


def _no_second_order(op, loss, reference_name):
    """The error for tf.gradients of a fused gradient op. Only graph-mode
    gradients of gradients (tf.hessians) get there: backward passes that a
    tape records use the reference instead."""
    return NotImplementedError(
        f"{op.name}: tf.gradients cannot differentiate the fused {loss} loss twice; use "
        "tf.GradientTape (nested tapes differentiate it to any order) or "
        f"fused_contrastive.{reference_name}"
    )


@tf.RegisterGradient(EMBEDDING_GRAD_OP_NAME)
def _embedding_grad_grad(op, *_):
    raise _no_second_order(op, "embedding", "contrastive_loss_from_embeddings_reference")


def class_ids(labels):
    """Class labels as the in-batch ops take them: int64 ids equal exactly
    where the labels compare equal. Float labels (Keras passes y_true as
    floats) become the bits of their float64 value, with -0 made +0, and NaN
    labels ids of their own (NaN equals nothing, as in the reference): NaN bit
    patterns with the row number as payload, which no number has. No assert:
    XLA could not raise it anyway."""
    if labels.dtype.is_integer:
        return tf.cast(labels, tf.int64)
    x = tf.cast(labels, tf.float64)
    x = tf.where(tf.equal(x, 0.0), tf.zeros_like(x), x)
    rows = tf.range(1, tf.size(x, out_type=tf.int64) + 1, dtype=tf.int64)
    nan_ids = tf.bitwise.bitwise_or(rows, tf.constant(0x7FF8000000000000, tf.int64))
    return tf.where(tf.math.is_nan(x), nan_ids, tf.bitcast(x, tf.int64))


def _in_batch_compute(labels, embeddings):
    """int64 class ids, and the embeddings in the ops' dtype (16-bit ones in
    float32, as everywhere in the package)."""
    return class_ids(labels), tf.cast(embeddings, reference.compute_dtype(embeddings.dtype))


def _in_batch_reference_gradient(labels, embeddings, options, upstream):
    """Autodiff of the reference: the gradient while a tape records the
    backward pass itself (see _reference_embedding_gradients)."""
    with tf.GradientTape() as tape:
        tape.watch(embeddings)
        loss = reference.reference_in_batch_loss(labels, embeddings, *options)
    return tape.gradient(loss, embeddings, output_gradients=upstream)


def in_batch_loss(
    labels, embeddings, margin, positive_margin, distance, pair_weighting, max_block_rows
):
    """Runs the in-batch op on prepared inputs: the per-anchor loss [B]."""
    ids, e = _in_batch_compute(labels, embeddings)
    loss = _library.fused_contrastive_in_batch_contrastive_loss(
        ids,
        e,
        scalar(margin),
        scalar(positive_margin),
        distance=distance,
        pair_weighting=pair_weighting,
        max_block_rows=max_block_rows,
    )
    return tf.cast(loss, embeddings.dtype)


def reduced_in_batch_loss(
    labels,
    embeddings,
    sample_weight,
    margin,
    positive_margin,
    distance,
    pair_weighting,
    max_block_rows,
    reduction,
    loss_scale,
):
    """The reduced in-batch loss, with the Keras reduction fused in: one sweep
    writes the fully scaled gradient (see reduced_embedding_loss). sample_weight:
    a scalar or [B], of the embeddings' dtype."""
    ids, e = _in_batch_compute(labels, embeddings)
    weights = tf.cast(sample_weight, e.dtype)
    options = (margin, positive_margin, distance, pair_weighting)

    @tf.custom_gradient
    def fused(e):
        loss, grad, scale = _library.fused_contrastive_in_batch_contrastive_loss_reduced(
            ids,
            e,
            weights,
            scalar(margin),
            scalar(positive_margin),
            scalar(loss_scale),
            distance=distance,
            pair_weighting=pair_weighting,
            max_block_rows=max_block_rows,
            reduction=reduction,
        )

        def backward(upstream):
            if record.could_possibly_record():
                per_anchor = weights * _constant_scale(scale, e.dtype) * upstream
                return _in_batch_reference_gradient(
                    ids, e, options, per_anchor * tf.ones_like(e[:, 0])
                )
            return scale_gradient(grad, upstream)

        return loss, backward

    return tf.cast(fused(e), embeddings.dtype)


@tf.RegisterGradient(IN_BATCH_OP_NAME)
def _in_batch_loss_grad(op, grad_loss):
    labels, e, margin, positive_margin = op.inputs
    attrs = {name: op.get_attr(name) for name in ("distance", "pair_weighting")}
    attrs = {name: value.decode() for name, value in attrs.items()}
    if record.could_possibly_record():
        grad = _in_batch_reference_gradient(
            labels,
            e,
            (margin, positive_margin, attrs["distance"], attrs["pair_weighting"]),
            grad_loss,
        )
    else:
        grad = _library.fused_contrastive_in_batch_contrastive_loss_grad(
            labels,
            e,
            grad_loss,
            margin,
            positive_margin,
            max_block_rows=op.get_attr("max_block_rows"),
            **attrs,
        )
    # Labels and margins get no gradient.
    return [None, grad, None, None]


@tf.RegisterGradient(IN_BATCH_GRAD_OP_NAME)
def _in_batch_grad_grad(op, *_):
    raise _no_second_order(op, "in-batch", "in_batch_contrastive_loss_reference")
