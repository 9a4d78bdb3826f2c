"""The public losses: the functions, the Keras 3 Loss classes, and the mixins
that the tf_keras classes (keras2.py) share with them."""

import keras
import tensorflow as tf

from fused_contrastive import _distances_ops, _in_batch_ops, _pairs_ops
from fused_contrastive._inputs import (
    number_margin,
    prepare_embedding_inputs,
    prepare_in_batch_inputs,
    partner_rows,
    prepare_inputs,
    prepare_pair_inputs,
    reject_ragged,
    split_pairs,
    squeeze_extra_unit_axis,
    stacked_operands,
    validate_distance,
    validate_margin,
    validate_similar_label,
)
from fused_contrastive._keras_backend import jax_functions, on_jax
from fused_contrastive._library import scalar, using_reference
from fused_contrastive._private_api import could_possibly_record, dtype_policy, keras_mask
from fused_contrastive.in_batch import InBatchLossMixin
from fused_contrastive.reference import (
    reference_embedding_loss,
    reference_loss,
)


def contrastive_loss(y_true, y_pred, margin=1.0, similar_label=1):
    """Per-sample contrastive loss `y*d^2 + (1-y)*max(margin-d, 0)^2`.

    Args:
      y_true: labels, 1 for similar pairs and 0 for dissimilar ones (bool, int32,
        int64 or float; soft labels in [0, 1] are used linearly); see
        `similar_label` for the opposite convention.
      y_pred: distances between the two embeddings of each pair (float16,
        bfloat16, float32 or float64), the same shape as `y_true`. A trailing
        axis of size 1 on either side is squeezed, so a model's [B, 1] output
        pairs with [B] labels.
      margin: non-negative, finite number (or scalar tensor) that dissimilar
        pairs should exceed.
      similar_label: the label of a similar pair: 1 (TF Addons, the default) or
        0 (the Hadsell paper and keras.io's Siamese example). With 0, a label y
        acts as 1 - y.

    Returns:
      The per-sample loss, with the shape and dtype of `y_pred`. Its gradient
      flows to `y_pred` only; labels and margin get none.

    The numbers of TF Addons' own test (`test_zero_loss`, `test_unweighted`):

    >>> print(contrastive_loss([0, 0, 1, 1, 0, 1], [1.0, 1.4, 0.0, 0.0, 1.2, 0.0]).numpy())
    [0. 0. 0. 0. 0. 0.]
    >>> print(contrastive_loss([0, 0, 1, 1, 0, 1], [0.1, 0.3, 1.3, 0.7, 1.1, 0.5]).numpy().round(4))
    [0.81 0.49 1.69 0.49 0.   0.25]
    >>> print(contrastive_loss([1, 1, 0, 0, 1, 0], [0.1, 0.3, 1.3, 0.7, 1.1, 0.5],
    ...                        similar_label=0).numpy().round(4))
    [0.81 0.49 1.69 0.49 0.   0.25]
    """
    margin = validate_margin(margin)
    similar_label = validate_similar_label(similar_label)
    labels, distances = prepare_inputs(y_true, y_pred)
    if using_reference():
        return reference_loss(labels, distances, margin, similar_label)
    loss, _ = _distances_ops.loss_and_grad(labels, distances, margin, similar_label)
    return loss


def contrastive_loss_from_embeddings(
    y_true, embeddings_a, embeddings_b, margin=1.0, distance="euclidean", similar_label=1
):
    """Per-pair contrastive loss computed from the pairs' embeddings in one pass.

    The distance d between the rows of `embeddings_a` and `embeddings_b`, the
    loss `y*d^2 + (1-y)*max(margin-d, 0)^2` and, for backprop, what its
    gradient needs are computed by one fused kernel; `a - b` is never
    materialised.

    Args:
      y_true: labels of shape `[...]`, as in `contrastive_loss` (a trailing axis
        of size 1 is aligned the same way).
      embeddings_a: `[..., D]` embeddings (float16, bfloat16, float32 or
        float64; 16-bit ones are computed in float32), `D >= 1`.
      embeddings_b: the other embedding of each pair: same shape and dtype.
      margin: non-negative, finite number (or scalar tensor).
      distance: "euclidean" (`‖a − b‖₂`), "cosine" (`1 − a·b / (‖a‖‖b‖)`) or
        "manhattan" (`Σ|a − b|`).
      similar_label: the label of a similar pair, 1 (TF Addons) or 0.

    Returns:
      The per-pair loss, shape `embeddings_a.shape[:-1]`, dtype of the
      embeddings. Gradients flow to both embeddings and are finite everywhere:
      at `a == b` the Euclidean distance's gradient is 0 (PyTorch's convention
      for `cdist` and `vector_norm`), a zero vector has cosine similarity 0 and
      no gradient, and `sign(0) = 0` for Manhattan.

    >>> print(contrastive_loss_from_embeddings(
    ...     [1, 0], [[0.0, 3.0], [1.0, 1.0]], [[4.0, 0.0], [1.0, 1.0]], margin=2.0).numpy())
    [25.  4.]
    """
    margin = validate_margin(margin)
    distance = validate_distance(distance)
    similar_label = validate_similar_label(similar_label)
    labels, a, b = prepare_embedding_inputs(y_true, embeddings_a, embeddings_b)
    if using_reference():
        return reference_embedding_loss(labels, a, b, margin, distance, similar_label)
    return _pairs_ops.embedding_loss(labels, a, b, margin, distance, similar_label)


# Keras reduction -> the fused op's (None: Keras reduces the per-sample losses).
_FUSED_REDUCTIONS = {
    "sum": "sum",
    "sum_over_batch_size": "mean",
    "mean": "mean",
    "mean_with_sample_weight": "weighted_mean",
}


def _align_weights(weights, distances):
    """sample_weight as the fused ops take it (a scalar, or the shape of the
    per-sample losses `distances` after Keras' squeeze of a trailing unit
    axis), else None."""
    if distances.shape.rank is None:
        # Keras' reduction cannot run on a loss of unknown rank (a tf.function
        # retraced with relaxed shapes); the op checks the shapes at run time.
        if weights.shape.rank == 0:
            return weights
        return squeeze_extra_unit_axis(weights, tf.rank(distances))
    if weights.shape.rank == 0:
        # Keras squeezes [1] losses against a scalar weight and returns that
        # scalar unreduced (w * loss, no divisor): its rule, not ours to change.
        return None if distances.shape.as_list() == [1] else weights
    if weights.shape.rank == distances.shape.rank + 1 and weights.shape[-1] == 1:
        weights = tf.squeeze(weights, -1)
    if weights.shape.is_fully_defined() and weights.shape == distances.shape:
        return weights
    return None


class _FusedReduction:
    """What a fused-reduction op takes for a Keras reduction: the op's mode,
    the sample weights (a scalar or the per-sample losses' shape) and Keras'
    loss scale for tf.distribute."""

    def __init__(self, mode, weights, loss_scale):
        self.mode, self.weights, self.loss_scale = mode, weights, loss_scale


def _fused_reduction_possible(loss, y_pred):
    """Whether a Keras loss object's reduction has a fused op: not "none" or
    None, not under the pure-TF fallback, and no Keras mask on y_pred."""
    return (
        _FUSED_REDUCTIONS.get(loss.reduction) is not None
        and not using_reference()
        and keras_mask(y_pred) is None
    )


def _fused_reduction_inputs(loss, losses, sample_weight):
    """The _FusedReduction of `loss` (a Keras loss object) for per-sample losses
    of the shape of `losses`, or None where Keras' own reduction must run:
    scalar or statically empty losses (which Keras returns unreduced), weights
    that need broadcasting, and [1] losses with a scalar weight (likewise)."""
    mode = _FUSED_REDUCTIONS[loss.reduction]
    rank = losses.shape.rank
    if rank == 0 or (rank == 1 and losses.shape[0] == 0):
        return None
    if sample_weight is None:
        weights = scalar(1.0, losses.dtype)
        if mode == "weighted_mean":  # Keras divides by the count then
            mode = "mean"
    else:
        weights = _align_weights(keras.ops.convert_to_tensor(sample_weight, loss.dtype), losses)
        if weights is None:
            return None
    loss_scale = 1.0
    if mode != "sum":  # Keras' scale_loss_for_distribution
        loss_scale /= tf.distribute.get_strategy().num_replicas_in_sync
    return _FusedReduction(mode, weights, loss_scale)


class ContrastiveLossMixin:
    """What both ContrastiveLoss classes (Keras 3 here, tf_keras in keras2.py)
    share: their options, checked and saved in the config, and the per-sample
    loss. It comes before the Keras base class, whose methods it extends."""

    def _set_options(self, margin, similar_label, distance):
        self.margin = number_margin(margin, type(self).__name__)
        self.similar_label = validate_similar_label(similar_label)
        self.distance = None if distance is None else validate_distance(distance)

    def call(self, y_true, y_pred):
        """The per-sample loss: y_pred are distances (distance None) or stacked
        pair embeddings [..., 2, D]."""
        if self.distance is None:
            return contrastive_loss(y_true, y_pred, self.margin, self.similar_label)
        y_pred = tf.convert_to_tensor(y_pred)
        return contrastive_loss_from_embeddings(
            y_true, *split_pairs(y_pred), self.margin, self.distance, self.similar_label
        )

    def get_config(self):
        return {
            **super().get_config(),
            "margin": self.margin,
            "similar_label": self.similar_label,
            "distance": self.distance,
        }


@keras.saving.register_keras_serializable(package="fused_contrastive")
class ContrastiveLoss(ContrastiveLossMixin, keras.losses.Loss):
    """Contrastive loss (Hadsell, Chopra & LeCun 2006) as a Keras 3 loss.

    A drop-in for `tfa.losses.ContrastiveLoss`: `y_true` are pair labels (1 =
    similar), `y_pred` the distances between the pair's embeddings, or, with
    `distance`, the two embeddings themselves. Importing
    `fused_contrastive` also lets Keras load models saved with TF Addons' loss
    (`"Addons>ContrastiveLoss"`) as this class.

    Args:
      margin: non-negative, finite number; dissimilar pairs closer than it are
        penalised.
      reduction: any Keras 3 reduction: "sum_over_batch_size" (default), "sum",
        "mean", "mean_with_sample_weight", "none" or None. Keras 2's "auto" (what
        TF Addons code may pass) means "sum_over_batch_size".
      name: name of the loss.
      dtype: dtype the loss computes in; defaults to `keras.backend.floatx()`.
      similar_label: the label of a similar pair, 1 (TF Addons) or 0 (the
        Hadsell paper, keras.io's Siamese example).
      distance: None (the default): `y_pred` are distances `[...]`. "euclidean",
        "cosine" or "manhattan": `y_pred` are the two embeddings of each pair
        stacked on axis -2, `[..., 2, D]` (e.g. `keras.ops.stack([a, b], axis=1)`),
        and the distance, loss and gradients come from one fused kernel (see
        `contrastive_loss_from_embeddings`).

    TF Addons' `test_sum_reduction` numbers:

    >>> loss = ContrastiveLoss(reduction="sum")
    >>> round(float(loss([0, 0, 1, 1, 0, 1], [0.1, 0.3, 1.3, 0.7, 1.1, 0.5])), 4)
    3.73
    """

    def __init__(
        self,
        margin=1.0,
        reduction="sum_over_batch_size",
        name="contrastive_loss",
        dtype=None,
        similar_label=1,
        distance=None,
    ):
        if reduction == "auto":
            reduction = "sum_over_batch_size"
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self._set_options(margin, similar_label, distance)

    def __call__(self, y_true, y_pred, sample_weight=None):
        reject_ragged(y_true, y_pred)
        reduced = None if on_jax() else self._fused_reduction(y_true, y_pred, sample_weight)
        if reduced is None:
            return super().__call__(y_true, y_pred, sample_weight)
        return reduced

    def call(self, y_true, y_pred):
        if not on_jax():
            return super().call(y_true, y_pred)
        fcj = jax_functions()
        if self.distance is None:
            return fcj.contrastive_loss(y_true, y_pred, self.margin, self.similar_label)
        return fcj.contrastive_loss_from_pairs(
            y_true, y_pred, self.margin, self.distance, self.similar_label
        )

    def _fused_reduction(self, y_true, y_pred, sample_weight):
        """The reduced loss from the fused-reduction op, or None where Keras' own
        reduction must run (see _fused_reduction_inputs)."""
        # The pair op writes the pair's gradient as it reduces, for nothing in
        # evaluate; but it reads the pair in place, where the per-pair path
        # must first unstack it, which costs more than the whole loss. Where
        # the graph shows the pair's halves (stacked_operands), evaluate takes
        # the per-pair path on them: no unstack, and no gradient written.
        if not _fused_reduction_possible(self, y_pred) or (
            self.distance is not None
            and not could_possibly_record()
            and stacked_operands(y_pred) is not None
        ):
            return None
        with tf.name_scope(self.name):
            # Converted as Keras' own __call__ converts them.
            y_true = keras.ops.convert_to_tensor(y_true, self.dtype)
            y_pred = keras.ops.convert_to_tensor(y_pred, self.dtype)
            if self.distance is None:
                labels, distances = prepare_inputs(y_true, y_pred)
            else:
                labels, pairs = prepare_pair_inputs(y_true, y_pred)
                distances = labels  # only their shape matters below
            reduction = _fused_reduction_inputs(self, distances, sample_weight)
            if reduction is None:
                return None
            if self.distance is None:
                return _distances_ops.reduced_loss(
                    labels,
                    distances,
                    reduction.weights,
                    self.margin,
                    reduction.mode,
                    reduction.loss_scale,
                    self.similar_label,
                )
            return _pairs_ops.reduced_pair_loss(
                labels,
                pairs,
                reduction.weights,
                self.margin,
                reduction.mode,
                reduction.loss_scale,
                self.distance,
                self.similar_label,
            )

    def get_config(self):
        # Keras' Loss config has no dtype; the policy's name restores mixed ones too.
        return {**super().get_config(), "dtype": dtype_policy(self).name}


@keras.saving.register_keras_serializable(package="fused_contrastive")
class InBatchContrastiveLoss(InBatchLossMixin, keras.losses.Loss):
    """The in-batch all-pairs contrastive loss as a Keras 3 loss.

    `y_true` are class labels `[B]` (integers, or floats as Keras passes them),
    `y_pred` the embeddings `[B, D]`; every pair of the batch is used (see
    `in_batch_contrastive_loss`). `sample_weight` weighs anchors. While
    training, the loss and its gradient come from one fused sweep over the
    pairs, with the reduction fused in; memory stays linear in B. Under
    `tf.distribute` each replica's loss covers the pairs of its own batch,
    unless `gather_across_replicas=True`.

    Args:
      margin, positive_margin, distance, pair_weighting, max_block_rows, miner,
        miner_epsilon: as in `in_batch_contrastive_loss`.
      gather_across_replicas: as in `in_batch_contrastive_loss`: each replica's
        anchors pair with the global batch, and the reduction divides by the
        global batch's count (or weight total), so that with Keras' scaling
        the replicas' losses and gradients add up to the single-device ones of
        the global batch, unequal replica batches included.
      memory_size: 0 (none) or the rows of a cross-batch memory
        (`fused_contrastive.memory.CrossBatchMemory`, `loss.memory`): while
        training, the anchors also pair with the last `memory_size` embeddings
        of earlier training steps (held without gradient; every replica's
        batch), as references (see `in_batch_contrastive_loss`).
      memory_warmup_steps: training steps during which the memory is filled
        but not used (XBM starts it after 1,000).
      reduction: any Keras 3 reduction ("sum_over_batch_size", the default, is
        the mean over anchors).
      name: name of the loss.
      dtype: dtype the loss computes in; defaults to `keras.backend.floatx()`.

    >>> loss = InBatchContrastiveLoss(reduction="sum")
    >>> round(float(loss([0, 0, 1], [[0.0, 0.0], [0.0, 0.5], [0.0, 2.0]])), 4)
    0.25
    """

    def __init__(
        self,
        margin=1.0,
        positive_margin=0.0,
        distance="euclidean",
        pair_weighting="uniform",
        reduction="sum_over_batch_size",
        name="in_batch_contrastive_loss",
        dtype=None,
        max_block_rows=None,
        gather_across_replicas=False,
        memory_size=0,
        memory_warmup_steps=0,
        miner=None,
        miner_epsilon=0.1,
    ):
        if reduction == "auto":
            reduction = "sum_over_batch_size"
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self._set_options(
            margin,
            positive_margin,
            distance,
            pair_weighting,
            max_block_rows,
            gather_across_replicas,
            memory_size,
            memory_warmup_steps,
            miner,
            miner_epsilon,
        )

    def __call__(self, y_true, y_pred, sample_weight=None):
        if on_jax():
            labels = _jax_class_labels(y_true, self.dtype)
            return _WithLabels(self, labels)(labels, y_pred, sample_weight)
        reject_ragged(y_true, y_pred)
        labels = class_labels(y_true, self.dtype)
        # Keras 3 scales means by 1/replicas inside Loss.__call__, which this
        # replaces: the global reduction needs none.
        reduced = self._global_reduction(
            labels, y_pred, sample_weight, _FUSED_REDUCTIONS.get(self.reduction), dtype=self.dtype
        )
        # The fused reduction writes the gradient as it reduces: worth it only
        # when a tape will use it (training), not in evaluate.
        if reduced is None and could_possibly_record() and _fused_reduction_possible(self, y_pred):
            reduced = self._fused_reduction(labels, y_pred, sample_weight)
        if reduced is None:
            # Keras' Loss.__call__ converts y_true to the loss dtype, which
            # would merge integer ids >= 2**24 in float32: its reduction runs on
            # a loss that takes the ids from here instead.
            reduced = _WithLabels(self, labels)(labels, y_pred, sample_weight)
        self._remember(labels, y_pred)
        return reduced

    def call(self, y_true, y_pred):
        if not on_jax():
            return super().call(y_true, y_pred)
        options = self._in_batch_options
        if options.gather_across_replicas or options.memory_size:
            raise NotImplementedError(
                f"{type(self).__name__}: gather_across_replicas and memory_size need Keras' "
                "TensorFlow backend so far; on JAX, pass neither (under "
                "keras.distribution.DataParallel each anchor already pairs with the whole "
                "global batch; in a jax.shard_map, "
                "fused_contrastive.jax.in_batch_contrastive_loss gathers along a mapped axis: "
                "gather_across_replicas='<axis name>')"
            )
        return jax_functions().in_batch_contrastive_loss(
            y_true,
            y_pred,
            margin=options.margin,
            positive_margin=options.positive_margin,
            distance=options.distance,
            pair_weighting=options.pair_weighting,
            miner=options.miner,
            miner_epsilon=options.miner_epsilon,
            max_block_rows=options.max_block_rows,
        )

    def _fused_reduction(self, labels, y_pred, sample_weight):
        with tf.name_scope(self.name):
            y_pred = keras.ops.convert_to_tensor(y_pred, self.dtype)
            labels, embeddings = prepare_in_batch_inputs(labels, y_pred)
            per_anchor = tf.TensorSpec(labels.shape, self.dtype)  # only these matter
            reduction = _fused_reduction_inputs(self, per_anchor, sample_weight)
            if reduction is None:
                return None
            ids, rows, anchors = partner_rows(
                labels, embeddings, self._references(labels, embeddings)
            )
            return _in_batch_ops.reduced_in_batch_loss(
                ids,
                rows,
                reduction.weights,
                self._in_batch_options,
                reduction.mode,
                reduction.loss_scale,
                anchors,
            )

    def get_config(self):
        return {**super().get_config(), "dtype": dtype_policy(self).name}


def class_labels(y_true, dtype):
    """y_true of a Keras InBatchContrastiveLoss as the class labels it uses:
    integer ids exactly (int32 and int64 as they are, other integer types as
    int64), anything else converted to `dtype` as Keras converts y_true (float
    labels are then compared by value)."""
    if not tf.is_tensor(y_true):
        y_true = tf.convert_to_tensor(y_true)
    if not y_true.dtype.is_integer:
        return keras.ops.convert_to_tensor(y_true, dtype)
    if y_true.dtype == tf.uint64:  # equal exactly where the ids are equal
        return tf.bitcast(y_true, tf.int64)
    return y_true if y_true.dtype in (tf.int32, tf.int64) else tf.cast(y_true, tf.int64)


def _jax_class_labels(y_true, dtype):
    """class_labels on Keras' JAX backend: integer ids exactly (unsigned ones
    as the signed ids of their bits), floats converted to `dtype`."""
    y_true = keras.ops.convert_to_tensor(y_true)
    kind = keras.backend.standardize_dtype(y_true.dtype)
    if kind in ("int32", "int64"):
        return y_true
    if kind in ("uint32", "uint64"):
        return keras.ops.view(y_true, kind[1:])
    if "int" in kind:
        return keras.ops.cast(y_true, "int32")
    return keras.ops.cast(y_true, dtype)


class _WithLabels(keras.losses.Loss):
    """Keras' Loss.__call__ (masks, weights, reduction) of an
    InBatchContrastiveLoss's per-anchor loss on the class labels given here,
    not on the y_true that __call__ converts to the loss dtype."""

    def __init__(self, loss, labels):
        super().__init__(name=loss.name, reduction=loss.reduction, dtype=dtype_policy(loss))
        self._loss, self._labels = loss, labels

    def call(self, y_true, y_pred):
        return self._loss.call(self._labels, y_pred)


# Models compiled with tfa.losses.ContrastiveLoss name it "Addons>ContrastiveLoss"
# in their files; its config (margin, reduction, name) is this class's. An
# alias in the custom objects, not a second registration, so that this class
# still saves under its own name.
keras.saving.get_custom_objects()["Addons>ContrastiveLoss"] = ContrastiveLoss
