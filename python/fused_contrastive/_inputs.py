"""Input checks and shape alignment shared by the fused op and the reference."""

import dataclasses
import typing

import numpy as np

import tensorflow as tf

from fused_contrastive import _options
from fused_contrastive._options import (  # noqa: F401 (the TF front end's names too)
    DISTANCES,
    IN_BATCH_DISTANCES,
    MINERS,
    PAIR_WEIGHTINGS,
    _check_max_block_rows,
    _check_miner,
    _count,
    real_margin,
    renamed_errors,
    validate_choice,
    validate_similar_label,
)

LABEL_DTYPES = tuple(map(tf.as_dtype, _options.LABEL_DTYPES))
DISTANCE_DTYPES = tuple(map(tf.as_dtype, _options.DISTANCE_DTYPES))
CLASS_LABEL_DTYPES = tuple(map(tf.as_dtype, _options.CLASS_LABEL_DTYPES))


def dtype_names(dtypes):
    return ", ".join(d.name for d in dtypes)


def validate_margin(margin):
    """Returns margin as a Python float, or a float64 tensor for tensor margins.

    Number margins are checked here, at construction time; tensor margins (a
    variable driving a margin schedule, say) are checked by the op when it runs.
    """
    if isinstance(margin, (tf.Tensor, tf.Variable)):
        if margin.shape.rank not in (None, 0):
            raise ValueError(f"margin must be a scalar, got shape {margin.shape}")
        return tf.cast(margin, tf.float64)
    return real_margin(margin)


def validate_distance(distance):
    """A distance name of DISTANCES."""
    return validate_choice(distance, DISTANCES, "distance")


def reject_ragged(*values):
    """Ragged inputs have no per-sample alignment the op could check cheaply."""
    if any(isinstance(v, tf.RaggedTensor) for v in values):
        raise TypeError(
            "contrastive loss: ragged y_true/y_pred are not supported. Flatten both first, "
            "e.g. contrastive_loss(y_true.flat_values, y_pred.flat_values) and "
            "y_pred.with_flat_values(...) to restore the rows, or use .to_tensor()"
        )


def number_margin(margin, owner, what="margin"):
    """validate_margin for a margin that must be a number (it is saved in a config)."""
    margin = named_margin(margin, what)
    if tf.is_tensor(margin):
        raise TypeError(
            f"{owner} needs a number {what} (it is saved in its config); pass "
            "tensor margins to the loss functions (fused_contrastive."
            "contrastive_loss, in_batch_contrastive_loss)"
        )
    return margin


def _squeeze_last(x):
    return tf.squeeze(x, axis=-1)


def _last_of(shape):
    return tf.concat([[0], shape], 0)[-1]  # 0 for a scalar's shape


def _last_extent(x):
    return _last_of(tf.shape(x))


def _unit_axis_changed(x, drop, add):
    """x without its last axis where `drop`, with a unit axis appended where
    `add` (booleans known at run time). A reshape to a shape computed from
    shapes, which XLA evaluates at compile time; not tf.cond around tf.squeeze,
    whose untaken branch XLA compiles too and fails to when the axis is not 1."""
    kept = tf.rank(x) - tf.cast(drop, tf.int32)
    unit = tf.constant([1])[: tf.cast(add, tf.int32)]
    return tf.reshape(x, tf.concat([tf.shape(x)[:kept], unit], 0))


def squeeze_extra_unit_axis(x, other_rank):
    """x without its last axis when x has one more axis than other_rank (a
    tensor) and that axis is 1, decided at run time (ranks unknown when traced)."""
    if x.shape.rank is not None and (x.shape.rank == 0 or x.shape[-1] not in (1, None)):
        return x  # it has no unit axis to lose
    extra = tf.logical_and(tf.equal(tf.rank(x), other_rank + 1), tf.equal(_last_extent(x), 1))
    return _unit_axis_changed(x, extra, False)


def _converted(x, dtypes, what):
    """x as a tensor, whose dtype must be one of `dtypes`."""
    x = tf.convert_to_tensor(x)
    problem = _options.dtype_problem(what, x.dtype.name, [d.name for d in dtypes])
    if problem:
        raise TypeError(problem)
    return x


def _shape_error(message):
    return tf.errors.InvalidArgumentError(None, None, "contrastive loss: " + message)


def prepare_inputs(y_true, y_pred):
    """Converts and checks labels and distances; aligns a trailing unit axis.

    A model's [B, 1] output against [B] labels (or the reverse) gives B
    per-sample losses, as Keras' own losses do. TF Addons broadcast that pair to
    [B, B] (its issue 1757); every other shape mismatch is an error, never a
    broadcast.
    """
    reject_ragged(y_true, y_pred)
    y_pred = _converted(y_pred, DISTANCE_DTYPES, "y_pred (distances)")
    y_true = _converted(y_true, LABEL_DTYPES, "y_true (labels)")
    if y_true.shape.rank is not None and y_pred.shape.rank is not None:
        change = _options.unit_axis_change(y_true.shape, y_pred.shape)
        if change > 0:
            y_pred = _squeeze_last(y_pred)
        elif change < 0:
            y_true = _squeeze_last(y_true)
    else:
        y_pred, y_true = (
            squeeze_extra_unit_axis(y_pred, tf.rank(y_true)),
            squeeze_extra_unit_axis(y_true, tf.rank(y_pred)),
        )
    if not y_true.shape.is_compatible_with(y_pred.shape):
        raise _shape_error(
            "labels and distances must have the same shape, got labels "
            f"{y_true.shape} and distances {y_pred.shape}"
        )
    return y_true, y_pred


def prepare_embedding_inputs(y_true, embeddings_a, embeddings_b):
    """Converts and checks labels [...] and embeddings [..., D].

    Labels get the trailing-unit-axis rule of prepare_inputs against the
    embeddings' rows: [B, 1] labels pair with [B, D] embeddings, [B] labels
    with [B, 1, D] ones. Other mismatches raise; nothing is broadcast.
    """
    reject_ragged(y_true, embeddings_a, embeddings_b)
    a = _converted(embeddings_a, DISTANCE_DTYPES, "embeddings_a")
    b = _converted(embeddings_b, DISTANCE_DTYPES, "embeddings_b")
    if a.dtype != b.dtype:
        raise TypeError(
            "contrastive loss: embeddings_a and embeddings_b must have the same dtype; "
            f"got {a.dtype.name} and {b.dtype.name}"
        )
    y_true = _converted(y_true, LABEL_DTYPES, "y_true (labels)")
    if (
        a.shape.rank == 0
        or b.shape.rank == 0
        or not a.shape.is_compatible_with(b.shape)
        or 0 in (a.shape[-1:] + b.shape[-1:] if a.shape.rank and b.shape.rank else ())
    ):
        raise _shape_error(
            "embeddings_a and embeddings_b must have the same shape [..., D] "
            f"with D >= 1; got {a.shape} and {b.shape}"
        )
    rows = a.shape.merge_with(b.shape)[:-1] if a.shape.rank is not None else tf.TensorShape(None)
    return _align_row_labels(y_true, rows, lambda: tf.shape(a)[:-1]), a, b


def _align_row_labels(y_true, rows, rows_shape):
    """Labels aligned with the embeddings' rows (static shape `rows`;
    `rows_shape()` gives their shape as a tensor when a rank is unknown), as
    prepare_embedding_inputs describes."""
    if y_true.shape.rank is not None and rows.rank is not None:
        change = _options.unit_axis_change(y_true.shape, rows)
        if change < 0:
            y_true = _squeeze_last(y_true)
        elif change > 0:
            y_true = tf.expand_dims(y_true, -1)
    else:
        rows_shape = rows_shape()
        rows_rank, labels_rank = tf.size(rows_shape), tf.rank(y_true)
        drop = tf.logical_and(
            tf.equal(labels_rank, rows_rank + 1), tf.equal(_last_extent(y_true), 1)
        )
        add = tf.logical_and(
            tf.equal(rows_rank, labels_rank + 1), tf.equal(_last_of(rows_shape), 1)
        )
        y_true = _unit_axis_changed(y_true, drop, add)
    if not y_true.shape.is_compatible_with(rows):
        raise _shape_error(
            "labels must have the shape of the embeddings without their last "
            f"axis, {rows}; got {y_true.shape}"
        )
    return y_true


def _check_pairs_shape(y_pred):
    problem = y_pred.shape.rank is not None and _options.stacked_pairs_problem(y_pred.shape)
    if problem:
        raise tf.errors.InvalidArgumentError(None, None, problem)


def prepare_pair_inputs(y_true, pairs):
    """Converts and checks labels [...] and a Keras y_pred of stacked pairs
    [..., 2, D], aligning the labels as prepare_embedding_inputs does with the
    rows [...]. The pairs stay stacked: the pair op reads them in place."""
    reject_ragged(y_true, pairs)
    pairs = _converted(pairs, DISTANCE_DTYPES, "y_pred (stacked embeddings)")
    _check_pairs_shape(pairs)
    y_true = _converted(y_true, LABEL_DTYPES, "y_true (labels)")
    rows = pairs.shape[:-2] if pairs.shape.rank is not None else tf.TensorShape(None)
    return _align_row_labels(y_true, rows, lambda: tf.shape(pairs)[:-2]), pairs


def split_pairs(y_pred):
    """The two embeddings of each pair of a Keras y_pred [..., 2, D]."""
    _check_pairs_shape(y_pred)
    operands = stacked_operands(y_pred)
    if operands is not None:
        return operands
    if y_pred.shape.rank is not None:
        # Unpack's gradient is one Pack of both gradients; two slices' would be
        # two zero-filled [..., 2, D] tensors and their sum.
        return tuple(tf.unstack(y_pred, axis=-2))
    return y_pred[..., 0, :], y_pred[..., 1, :]


def _producer(tensor):
    """The op computing a graph tensor, seen through Identity ops; None for an
    eager tensor."""
    try:
        op = tensor.op
    except AttributeError:  # eager tensors have no op
        return None
    while op.type == "Identity":
        op = op.inputs[0].op
    return op


def stacked_operands(pairs):
    """(a, b) where the graph being built makes `pairs` [..., 2, D] from two
    tensors [..., D]: stacked on axis -2 (`tf.stack`, `keras.ops.stack`), or
    concatenated on the last axis and reshaped to [..., 2, D] (Keras'
    `Concatenate` then `Reshape`); None otherwise (eager tensors, other
    producers).

    Reading a and b themselves leaves the stack to the graph's other consumers
    (Grappler prunes it when there are none) and keeps its gradient, which
    copies the pair's gradient once more, out of the backward pass.
    """
    op = _producer(pairs)
    rank = pairs.shape.rank
    if op is None or rank is None or rank < 2:
        return None
    if op.type == "Pack" and len(op.inputs) == 2:
        axis = op.get_attr("axis")
        return tuple(op.inputs) if axis in (rank - 2, -2) else None
    if op.type != "Reshape":
        return None
    concat = _producer(op.inputs[0])
    if concat is None or concat.type != "ConcatV2" or len(concat.inputs) != 3:
        return None
    a, b, axis = concat.inputs
    axis = tf.get_static_value(axis)
    depth = pairs.shape[-1]
    if (
        axis not in (rank - 2, -1)
        or a.shape.rank != rank - 1
        or depth is None
        or a.shape[-1] != depth
        or b.shape[-1] != depth
    ):
        return None
    # The reshape may regroup the rows ([4, 3, 2·D] to [3, 4, 2, D]). It keeps
    # them where the row axes agree but for one, whose sizes then agree too
    # (the row counts are equal): [B, 2·D] to [B', 2, D] has B' = B.
    rows, pair_rows = a.shape[:-1].as_list(), pairs.shape[:-2].as_list()
    differing = [i for i, (n, m) in enumerate(zip(rows, pair_rows)) if n is None or n != m]
    return (a, b) if len(differing) <= 1 else None


def named_margin(value, what):
    """validate_margin, its errors naming the argument `what`."""
    return renamed_errors(validate_margin, value, what)


@dataclasses.dataclass(frozen=True)
class InBatchOptions:
    """The options of the in-batch loss, as the public functions and the Keras
    classes hand them to the ops and the reference. `checked` builds them from
    what a caller passed; the gradients rebuild them from an op's inputs and
    attrs, which the op has accepted."""

    margin: object  # a float, or a float64 scalar tensor (the functions take tensors)
    positive_margin: object
    distance: str
    pair_weighting: str
    max_block_rows: object = None  # None or a positive int, as given (configs save it)
    # The loss, not the ops: whether the anchors pair with every replica's
    # batch, and the Keras classes' cross-batch memory (rows; 0: none).
    gather_across_replicas: bool = False
    memory_size: int = 0
    memory_warmup_steps: int = 0
    # Which pairs count (None: all), and multi_similarity's epsilon.
    miner: object = None
    miner_epsilon: float = 0.1

    @classmethod
    def checked(
        cls,
        margin,
        positive_margin,
        distance,
        pair_weighting,
        max_block_rows=None,
        gather_across_replicas=False,
        memory_size=0,
        memory_warmup_steps=0,
        owner=None,
        miner=None,
        miner_epsilon=0.1,
    ):
        """The options, checked. owner: the name of the Keras class whose config
        saves them, which takes number margins only; None for the functions."""
        if owner is not None:
            margin = number_margin(margin, owner)
            positive_margin = number_margin(positive_margin, owner, "positive_margin")
        if not isinstance(gather_across_replicas, bool):
            raise TypeError(
                f"gather_across_replicas must be True or False, got {gather_across_replicas!r}"
            )
        return cls(
            validate_margin(margin),
            named_margin(positive_margin, "positive_margin"),
            validate_choice(distance, IN_BATCH_DISTANCES, "distance"),
            validate_choice(pair_weighting, PAIR_WEIGHTINGS, "pair_weighting"),
            _check_max_block_rows(max_block_rows),
            gather_across_replicas,
            _count(memory_size, "memory_size"),
            _count(memory_warmup_steps, "memory_warmup_steps"),
            *_check_miner(miner, miner_epsilon),
        )

    @property
    def op_miner(self):
        """miner as the ops' attr takes it."""
        return "none" if self.miner is None else self.miner

    @property
    def op_miner_epsilon(self):
        """miner_epsilon as every path uses it: the ops' float attr holds it in
        float32, and the reference rounds it alike."""
        return float(np.float32(self.miner_epsilon))

    @property
    def op_max_block_rows(self):
        """max_block_rows as the ops' attr takes it: 0 lets the op choose."""
        return 0 if self.max_block_rows is None else int(self.max_block_rows)


def prepare_in_batch_inputs(labels, embeddings, prefix="", what="in-batch contrastive loss", n="B"):
    """Class labels [n] (or [n, 1], squeezed) and embeddings [n, D], checked.
    prefix: what the arguments' names start with in the messages
    ("reference_" for the references); what: the caller, as the messages
    name it; n: the row count's name there."""
    reject_ragged(labels, embeddings)
    embeddings = tf.convert_to_tensor(embeddings)
    if embeddings.dtype not in DISTANCE_DTYPES:
        raise TypeError(
            f"{what}: {prefix}embeddings must be "
            f"{dtype_names(DISTANCE_DTYPES)}; got {embeddings.dtype.name}"
        )
    if embeddings.shape.rank != 2:
        raise ValueError(
            f"{what}: {prefix}embeddings must have rank 2, [{n}, D]; got shape {embeddings.shape}"
        )
    labels = tf.convert_to_tensor(labels)
    if labels.dtype not in CLASS_LABEL_DTYPES:
        raise TypeError(
            f"{what}: {prefix}labels must be class ids ({dtype_names(CLASS_LABEL_DTYPES)}); got "
            f"{labels.dtype.name}"
        )
    if labels.shape.rank == 2 and labels.shape[-1] == 1:
        labels = tf.squeeze(labels, -1)
    if labels.shape.rank != 1 or not labels.shape.is_compatible_with(embeddings.shape[:1]):
        raise ValueError(
            f"{what}: {prefix}labels must have shape [{n}] or [{n}, 1] for "
            f"{prefix}embeddings [{n}, D] = {embeddings.shape}; got {labels.shape}"
        )
    return labels, embeddings


def prepare_references(reference_labels, reference_embeddings, embeddings):
    """The references (labels [R], embeddings [R, D] in the embeddings'
    dtype), checked against the batch's embeddings [B, D]; None when neither
    is given."""
    if reference_labels is None and reference_embeddings is None:
        return None
    if reference_labels is None or reference_embeddings is None:
        raise ValueError(
            "in-batch contrastive loss: reference_labels and reference_embeddings must be "
            "given together"
        )
    labels, e = prepare_in_batch_inputs(reference_labels, reference_embeddings, "reference_")
    if not e.shape[1:].is_compatible_with(embeddings.shape[1:]):
        raise ValueError(
            "in-batch contrastive loss: reference_embeddings [R, D] must have the embeddings' D; "
            f"got {e.shape} for embeddings {embeddings.shape}"
        )
    return labels, tf.cast(e, embeddings.dtype)


def all_anchors(embeddings):
    """The in-batch ops' anchors input, [begin, end, grad, used] (rows from
    grad on get no gradient, rows from used on take no part), when every row
    is an anchor: [0, B, B, B]."""
    rows = tf.shape(embeddings, out_type=tf.int64)[0]
    return tf.stack([tf.constant(0, tf.int64), rows, rows, rows])


class Partners(typing.NamedTuple):
    """Rows the anchors pair with besides the batch: labels [R], embeddings
    [R, D], of which only the first `used` (None: all) take part, and whether
    they need their gradient (references do; a memory's rows do not)."""

    labels: object
    embeddings: object
    used: object = None
    gradient: bool = True


def gatherable_labels(labels, other):
    """labels in the dtype they meet `other` labels in (None: only their own
    replicas' or a memory's): int64 when both are integers, else float64, so
    that equal values stay equal and every replica gathers the same dtype."""
    integer = labels.dtype.is_integer and (other is None or other.dtype.is_integer)
    return tf.cast(labels, tf.int64 if integer else tf.float64)


def replica_context(gather_across_replicas):
    """The replica context whose replicas' batches the anchors pair with, or
    None: without gather_across_replicas, outside a replica context (a
    strategy's scope or none) and with one replica in sync."""
    if not gather_across_replicas:
        return None
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None
    return context


def gathered(context, *tensors):
    """Every replica's rows of each tensor, in replica order (all_gather on
    axis 0). all_gather sends each tensor from its .device, which a step's
    inputs lack under MultiWorkerMirroredStrategy ("destinations can not be
    empty"): identities made here, in the replica's device scope, have it."""
    return [context.all_gather(tf.identity(t), 0) for t in tensors]


def partner_rows(labels, embeddings, partners=None, context=None):
    """The rows the batch's anchors pair with, and which of them are the
    anchors: (labels, rows, anchors int64 [begin, end, grad, used]; see
    all_anchors), or the batch as
    it is and anchors None when there is nothing to add. `partners`: (labels,
    embeddings) or Partners after the batch, or None. With a replica `context`
    (replica_context), the batch is every replica's, gathered in replica order,
    and this replica's rows are the anchors: the gathered rows' gradient
    (all_gather's: the sum over replicas, then this replica's rows) is then
    the global batch's."""
    if partners is None and context is None:
        return labels, embeddings, None
    other_labels = None if partners is None else partners[0]
    rows = tf.shape(embeddings, out_type=tf.int64)[:1]
    labels = gatherable_labels(labels, other_labels)
    if context is None:
        begin = tf.constant(0, tf.int64)
    else:
        sizes = context.all_gather(rows, 0)
        begin = tf.reduce_sum(sizes[: context.replica_id_in_sync_group])
        labels, embeddings = gathered(context, labels, embeddings)
    used = grad = tf.shape(embeddings, out_type=tf.int64)[0]
    if partners is not None:
        partners = Partners(*partners)
        labels = tf.concat([labels, gatherable_labels(other_labels, labels)], 0)
        embeddings = tf.concat([embeddings, partners.embeddings], 0)
        used = tf.shape(embeddings, out_type=tf.int64)[0]
        if partners.used is not None:
            used = grad + partners.used
        if partners.gradient:
            grad = used
    anchors = tf.stack([begin, begin + rows[0], grad, used])
    return labels, embeddings, anchors


def anchor_rows(per_row, anchors, embeddings):
    """The anchors' values of per-row values (partner_rows' anchors; None:
    all), as many as the batch `embeddings` has rows (a size XLA knows)."""
    if anchors is None:
        return per_row
    return tf.slice(per_row, anchors[:1], tf.shape(embeddings, out_type=tf.int64)[:1])


def against_partners(labels, embeddings, partners, per_row_loss, context=None):
    """The batch's per-anchor loss [B] from per_row_loss(labels, rows, anchors),
    the loss of each of partner_rows' rows with only its anchors (None: all
    rows) anchoring pairs."""
    labels, rows, anchors = partner_rows(labels, embeddings, partners, context)
    return anchor_rows(per_row_loss(labels, rows, anchors), anchors, embeddings)
