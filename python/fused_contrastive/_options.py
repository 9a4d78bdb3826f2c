"""The options' names and checks that need no TensorFlow: the TF front end
(_inputs.py) and the JAX one (jax.py) share them."""

import math
import numbers

# The embedding ops' `distance` attr values (tests check them against the op
# definitions of cc/core/pairs/math.h).
DISTANCES = ("euclidean", "cosine", "manhattan")
# The in-batch ops' `distance` and `pair_weighting` attr values (cc/core/in_batch/math.h).
IN_BATCH_DISTANCES = ("euclidean", "cosine")
PAIR_WEIGHTINGS = ("uniform", "balanced", "active")
# The in-batch ops' `miner` attr values but "none" (Python's None).
MINERS = ("batch_hard", "multi_similarity")
# The dtypes the kernels take, by name: labels of pairs (soft labels are
# floats), and distances or embeddings.
LABEL_DTYPES = ("bool", "int32", "int64", "float16", "bfloat16", "float32", "float64")
DISTANCE_DTYPES = ("float16", "bfloat16", "float32", "float64")
# Class ids: integers, or floats compared by value (Keras passes y_true as floats).
CLASS_LABEL_DTYPES = tuple(name for name in LABEL_DTYPES if name != "bool")


def dtype_problem(what, dtype, dtypes):
    """The message for an input `what` of dtype `dtype` (a name) outside the
    names `dtypes`; None when it is one of them."""
    if dtype in dtypes:
        return None
    return f"contrastive loss: {what} must have dtype {', '.join(dtypes)}; got {dtype}"


def stacked_pairs_problem(shape):
    """The message for a y_pred of a known rank that is not the two
    embeddings of each pair stacked on axis -2, [..., 2, D] with D >= 1;
    None when it is."""
    dims = tuple(shape)
    if len(dims) >= 2 and dims[-2] == 2 and dims[-1] != 0:
        return None
    return (
        "contrastive loss: with a distance, y_pred holds the two embeddings of each pair "
        "stacked on axis -2, shape [..., 2, D] (e.g. keras.ops.stack([a, b], "
        f"axis=1)); got {shape}"
    )


def unit_axis_change(labels_shape, rows_shape):
    """How labels of a known shape align with the rows they label (a known
    shape too): -1 drops the labels' last axis, of size 1, +1 gives them one
    (a model's [B, 1] output against [B] labels, or the reverse, as Keras'
    own losses take them), 0 keeps them. Other mismatches are errors, never
    broadcasts."""
    labels_shape, rows_shape = tuple(labels_shape), tuple(rows_shape)
    if len(labels_shape) == len(rows_shape) + 1 and labels_shape[-1] == 1:
        return -1
    if len(rows_shape) == len(labels_shape) + 1 and rows_shape[-1] == 1:
        return 1
    return 0


def real_margin(margin):
    """A number margin as a float: finite and non-negative."""
    if isinstance(margin, bool) or not isinstance(margin, numbers.Real):
        raise TypeError(f"margin must be a real number, got {margin!r} ({type(margin).__name__})")
    margin = float(margin)
    if not math.isfinite(margin) or margin < 0:
        raise ValueError(f"margin must be finite and non-negative, got {margin}")
    return margin


def validate_threshold(threshold):
    """A distance threshold: a finite, non-negative number (saved in configs)."""
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(
            f"threshold must be a number, got {threshold!r} ({type(threshold).__name__})"
        )
    if not 0.0 <= float(threshold) < float("inf"):
        raise ValueError(f"threshold must be finite and non-negative, got {threshold}")
    return float(threshold)


def renamed_errors(check, margin, what):
    """check(margin), its errors naming the argument `what` instead of margin."""
    try:
        return check(margin)
    except (TypeError, ValueError) as error:
        raise type(error)(str(error).replace("margin", what, 1)) from None


def validate_similar_label(similar_label):
    """The label value that marks a similar pair: 1 (TF Addons) or 0 (the Hadsell
    paper, keras.io's Siamese example)."""
    if isinstance(similar_label, bool) or not isinstance(similar_label, numbers.Integral):
        raise TypeError(
            f"similar_label must be 0 or 1, got {similar_label!r} ({type(similar_label).__name__})"
        )
    if similar_label not in (0, 1):
        raise ValueError(f"similar_label must be 0 or 1, got {similar_label}")
    return int(similar_label)


def validate_choice(value, choices, what):
    """value, one of the strings `choices`, or a ValueError listing them."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{what} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def _check_max_block_rows(max_block_rows):
    """The cap on the rows per block of the in-batch sweep, as given: None (the
    op's choice) or a positive int."""
    if max_block_rows is None:
        return None
    if isinstance(max_block_rows, bool) or not isinstance(max_block_rows, numbers.Integral):
        raise TypeError(f"max_block_rows must be None or a positive int, got {max_block_rows!r}")
    if not 0 < max_block_rows < 2**31:
        raise ValueError(f"max_block_rows must be None or a positive int, got {max_block_rows}")
    return max_block_rows


def _check_miner(miner, epsilon):
    """miner: None or one of MINERS; epsilon: a finite number >= 0."""
    if miner is not None and (not isinstance(miner, str) or miner not in MINERS):
        raise ValueError(
            f"miner must be one of None, {', '.join(map(repr, MINERS))}; got {miner!r}"
        )
    if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real):
        raise TypeError(f"miner_epsilon must be a number, got {epsilon!r}")
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"miner_epsilon must be finite and >= 0, got {epsilon}")
    return miner, float(epsilon)


def _count(value, what):
    """A non-negative int option."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be a non-negative int, got {value!r}")
    if value < 0:
        raise ValueError(f"{what} must be a non-negative int, got {value}")
    return int(value)
