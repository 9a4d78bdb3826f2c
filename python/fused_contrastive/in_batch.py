"""The in-batch loss family's public function and what both Keras versions of
`InBatchContrastiveLoss` (losses.py, keras2.py) share: their options and
per-anchor loss (InBatchLossMixin)."""

import dataclasses

import tensorflow as tf

from fused_contrastive import _in_batch_ops
from fused_contrastive._inputs import (
    InBatchOptions,
    against_partners,
    gatherable_labels,
    gathered,
    partner_rows,
    prepare_in_batch_inputs,
    prepare_references,
    replica_context,
)
from fused_contrastive._library import using_reference
from fused_contrastive._private_api import could_possibly_record, keras_mask
from fused_contrastive.memory import CrossBatchMemory
from fused_contrastive.reference import reference_in_batch_loss


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
        forward sweep). A mean over no pairs is 0. With a miner, the means run
        over the kept pairs ("uniform": their mean).
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
      miner: which of each anchor's pairs count, chosen by a statistics sweep
        before the loss (no gradient flows through the choice). None: all;
        "batch_hard": the hardest positive (largest d) and the hardest negative
        (smallest d), ties to the lowest row; "multi_similarity" (Wang et al.
        2019, in distance form): the positives with `d > (hardest negative d)
        − miner_epsilon` and the negatives with `d < (hardest positive d) +
        miner_epsilon`. A NaN distance counts as the hardest, so a NaN row
        keeps the loss NaN.
      miner_epsilon: multi_similarity's epsilon, finite and >= 0 (used in
        float32, the precision of the ops' attr).

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
        margin,
        positive_margin,
        distance,
        pair_weighting,
        max_block_rows,
        gather_across_replicas,
        miner=miner,
        miner_epsilon=miner_epsilon,
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
    miner = _in_batch_option("miner")
    miner_epsilon = _in_batch_option("miner_epsilon")

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
        miner=None,
        miner_epsilon=0.1,
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
            miner=miner,
            miner_epsilon=miner_epsilon,
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
