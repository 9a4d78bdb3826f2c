"""The public losses: the functions, the Keras 3 Loss classes, and the mixins
that the tf_keras classes (keras2.py) share with them."""

import dataclasses

import keras
import tensorflow as tf

from fused_contrastive import _distances_ops, _in_batch_ops, _pairs_ops
from fused_contrastive._inputs import (
    InBatchOptions,
    against_partners,
    gatherable_labels,
    gathered,
    number_margin,
    prepare_embedding_inputs,
    prepare_in_batch_inputs,
    partner_rows,
    prepare_references,
    prepare_inputs,
    replica_context,
    prepare_pair_inputs,
    reject_ragged,
    split_pairs,
    squeeze_extra_unit_axis,
    stacked_operands,
    validate_distance,
    validate_margin,
    validate_similar_label,
)
from fused_contrastive._library import scalar, using_reference
from fused_contrastive._private_api import could_possibly_record, dtype_policy, keras_mask
from fused_contrastive.memory import CrossBatchMemory
from fused_contrastive.reference import (
    reference_embedding_loss,
    reference_in_batch_loss,
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
):
    """Per-anchor contrastive loss over every pair of a batch, from class labels.

    Every ordered pair (i, j), j != i, of the batch is used: equal class labels
    make a positive pair, with term `max(d - positive_margin, 0)^2`, different
    ones a negative pair, with term `max(margin - d, 0)^2` (with
    `positive_margin = 0`, TF Addons' formula on every pair). The B x B
    distance matrix is never stored: one fused sweep over blocks of rows
    computes distances, terms and per-anchor sums, and, while a gradient tape
    watches the embeddings, the gradient of their sum, which backprop scales
    when the upstream gradient is the same for every anchor (`reduce_mean` or
    `reduce_sum` of the losses); another upstream (sample weights) takes a
    second sweep. Memory stays linear in B.

    Args:
      labels: class ids `[B]` or `[B, 1]`: int32, int64, or floats (what Keras
        passes as `y_true`), compared by value as `tf.equal` compares them.
      embeddings: `[B, D]` (float16, bfloat16, float32 or float64; 16-bit ones
        are computed in float32).
      margin: non-negative, finite number (or scalar tensor) that negative
        pairs should exceed.
      positive_margin: non-negative, finite number (or scalar tensor) below
        which positive pairs cost nothing.
      distance: "euclidean" (`‖e_i − e_j‖₂`) or "cosine" (`1 − cos(e_i, e_j)`,
        0 similarity for a zero vector).
      pair_weighting: "uniform": `l_i = Σ_j term_ij / (B − 1)`; "balanced": the
        mean of anchor i's positive terms plus the mean of its negative terms;
        "active": the mean of anchor i's nonzero positive terms plus the mean
        of its nonzero negative terms, so that pairs already past their margin
        do not dilute the mean (the counts carry no gradient; it costs one more
        forward sweep). A mean over no pairs is 0.
      max_block_rows: None (the op chooses) or a cap on the rows per block,
        which bounds the op's scratch memory (on GPU and under XLA it is about
        block · (B + R) values).
      reference_labels, reference_embeddings: optional references `[R]` and
        `[R, D]` (labels as `labels`; embeddings cast to the embeddings'
        dtype), given together: each anchor also pairs with every reference,
        with the same terms. `"uniform"` then divides by `B − 1 + R`, and
        `"balanced"` and `"active"` count positives and negatives over the
        batch and the references. Pairs of two references are never formed. `R = 0` is the
        loss without references.
      gather_across_replicas: inside a `tf.distribute` replica context with
        more than one replica, pair each local anchor with every other row of
        the global batch (every replica's labels and embeddings, gathered in
        replica order; unequal batch sizes work) instead of its own replica's
        batch. Summed over the replicas (`tf.nn.compute_average_loss` with the
        global batch size, or Keras' scaling), loss and gradients are then the
        single-device ones of the global batch. Outside a replica context or
        with one replica it changes nothing.

    Returns:
      `[B]` per-anchor losses in the embeddings' dtype (`B = 1` gives `[0]`).
      Gradients flow to the embeddings and the reference embeddings (wrap
      those in `tf.stop_gradient` for none); equal embeddings (distance 0)
      get the subgradient 0 of the norm there, never NaN.

    >>> print(in_batch_contrastive_loss(
    ...     [0, 0, 1], [[0.0, 0.0], [0.0, 0.5], [0.0, 2.0]], margin=1.0).numpy())
    [0.125 0.125 0.   ]
    """
    options = InBatchOptions.checked(
        margin, positive_margin, distance, pair_weighting, max_block_rows, gather_across_replicas
    )
    labels, embeddings = prepare_in_batch_inputs(labels, embeddings)
    references = prepare_references(reference_labels, reference_embeddings, embeddings)
    return _per_anchor_loss(labels, embeddings, options, references)


def _per_anchor_loss(labels, embeddings, options, partners=None):
    """in_batch_contrastive_loss with checked InBatchOptions on prepared
    inputs: the batch's anchors against the batch (every replica's, when the
    options gather them) and `partners` (labels, embeddings) when given."""

    def per_row_loss(labels, rows, anchors):
        if using_reference():
            return reference_in_batch_loss(labels, rows, options, anchors)
        return _in_batch_ops.in_batch_loss(labels, rows, options, anchors)

    context = replica_context(options.gather_across_replicas)
    return against_partners(labels, embeddings, partners, per_row_loss, context)


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
        reduced = self._fused_reduction(y_true, y_pred, sample_weight)
        if reduced is None:
            return super().__call__(y_true, y_pred, sample_weight)
        return reduced

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


def _in_batch_option(name):
    """An attribute of the loss that reads its InBatchOptions; setting it
    checks and replaces them (they are frozen)."""

    def set_option(self, value):
        self._set_options(**{**dataclasses.asdict(self._in_batch_options), name: value})

    return property(lambda self: getattr(self._in_batch_options, name), set_option)


class InBatchLossMixin:
    """What both InBatchContrastiveLoss classes (Keras 3 here, tf_keras in
    keras2.py) share: their options, one InBatchOptions, checked once and saved
    in the config, and the per-anchor loss. It comes before the Keras base
    class, whose methods it extends."""

    margin = _in_batch_option("margin")
    positive_margin = _in_batch_option("positive_margin")
    distance = _in_batch_option("distance")
    pair_weighting = _in_batch_option("pair_weighting")
    max_block_rows = _in_batch_option("max_block_rows")
    gather_across_replicas = _in_batch_option("gather_across_replicas")
    memory_size = _in_batch_option("memory_size")
    memory_warmup_steps = _in_batch_option("memory_warmup_steps")

    def _set_options(
        self,
        margin,
        positive_margin,
        distance,
        pair_weighting,
        max_block_rows,
        gather_across_replicas,
        memory_size=0,
        memory_warmup_steps=0,
    ):
        self._in_batch_options = options = InBatchOptions.checked(
            margin,
            positive_margin,
            distance,
            pair_weighting,
            max_block_rows,
            gather_across_replicas,
            memory_size,
            memory_warmup_steps,
            owner=type(self).__name__,
        )
        # A memory keeps its rows while other options change.
        memory = getattr(self, "memory", None)
        if not options.memory_size:
            self.memory = None
        elif memory is None or (memory.size, memory.warmup_steps) != (
            options.memory_size,
            options.memory_warmup_steps,
        ):
            self.memory = CrossBatchMemory(options.memory_size, options.memory_warmup_steps)

    def _references(self, labels, embeddings):
        """The memory's rows as the partners of partner_rows, or None."""
        return None if self.memory is None else self.memory.references(labels, embeddings)

    def _remember(self, labels, y_pred):
        """After a training call: the batch (every replica's) into the memory."""
        if self.memory is None or not could_possibly_record():
            return
        labels, embeddings = prepare_in_batch_inputs(labels, y_pred)
        labels = gatherable_labels(labels, None)
        embeddings = tf.stop_gradient(embeddings)
        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            labels, embeddings = gathered(context, labels, embeddings)
        self.memory.enqueue(labels, embeddings)

    def call(self, y_true, y_pred):
        labels, embeddings = prepare_in_batch_inputs(y_true, y_pred)
        return _per_anchor_loss(
            labels, embeddings, self._in_batch_options, self._references(labels, embeddings)
        )

    def _global_reduction(self, labels, y_pred, sample_weight, mode, loss_scale=1.0, dtype=None):
        """The loss of this replica's anchors, paired with every replica's
        batch, reduced so that the sum over replicas is the single-device loss
        of the global batch; None when the anchors do not gather (then the
        Keras reduction applies). mode: "sum", "mean" (over anchors) or
        "weighted_mean" (Keras' rules: a scalar weight divides by itself), with
        the global batch's divisor and no 1/replicas scaling; loss_scale
        multiplies the result (tf_keras scales by 1/replicas after the loss).
        Training runs the one-sweep reduced op; otherwise the per-anchor loss is
        reduced here. dtype: what y_pred is converted to (None: its own)."""
        context = replica_context(self.gather_across_replicas)
        if context is None or mode is None:
            return None
        if keras_mask(y_pred) is not None:
            raise ValueError(
                f"{type(self).__name__}: gather_across_replicas does not take a Keras mask on the "
                "embeddings; pass sample_weight instead"
            )
        options = self._in_batch_options
        with tf.name_scope(self.name):
            y_pred = tf.convert_to_tensor(y_pred) if dtype is None else tf.cast(y_pred, dtype)
            labels, embeddings = prepare_in_batch_inputs(labels, y_pred)
            count = tf.shape(embeddings)[:1]
            if sample_weight is None:
                weights = tf.ones([], y_pred.dtype)
            else:
                weights = tf.cast(sample_weight, y_pred.dtype)
                if weights.shape.rank == 2:  # [B, 1], as Keras may pass them
                    weights = tf.squeeze(weights, -1)
                if weights.shape.rank not in (0, 1):
                    raise ValueError(
                        f"{type(self).__name__}: with gather_across_replicas, sample_weight must "
                        f"be a scalar or one weight per anchor, [B] or [B, 1]; got {weights.shape}"
                    )
            if mode == "sum":
                divisor = tf.constant(1.0, tf.float64)
            elif mode == "weighted_mean" and sample_weight is not None and weights.shape.rank == 0:
                divisor = tf.cast(weights, tf.float64)
            else:
                local = tf.cast(count[0], tf.float64)
                if mode == "weighted_mean" and sample_weight is not None:
                    local = tf.reduce_sum(tf.cast(weights, tf.float64))
                divisor = context.all_reduce(tf.distribute.ReduceOp.SUM, local)
            scale = tf.math.divide_no_nan(tf.constant(loss_scale, tf.float64), divisor)
            references = self._references(labels, embeddings)
            if could_possibly_record() and not using_reference():
                ids, rows, anchors = partner_rows(labels, embeddings, references, context)
                return _in_batch_ops.reduced_in_batch_loss(
                    ids, rows, weights, options, "sum", scale, anchors
                )
            per_anchor = _per_anchor_loss(labels, embeddings, options, references)
            total = tf.reduce_sum(per_anchor * tf.broadcast_to(weights, count))
            return total * tf.cast(scale, total.dtype)

    def get_config(self):
        return {**super().get_config(), **dataclasses.asdict(self._in_batch_options)}


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
      margin, positive_margin, distance, pair_weighting, max_block_rows: as in
        `in_batch_contrastive_loss`.
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
        )

    def __call__(self, y_true, y_pred, sample_weight=None):
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
