"""The private TensorFlow and Keras APIs the package relies on, in one place: a
release that moves one breaks this module only."""

from tensorflow.python.eager import record


def could_possibly_record():
    """Whether a gradient tape may be recording. TensorFlow has no public way to
    ask; the fused backward passes use it to switch to the reference when a tape
    records them (second order), and the Keras classes to skip writing a
    gradient nobody will read (evaluate)."""
    return record.could_possibly_record()


def keras_mask(tensor):
    """The mask Keras 3 attached to a tensor, else None: Keras keeps it in an
    attribute, with no public accessor."""
    return getattr(tensor, "_keras_mask", None)


def dtype_policy(loss):
    """A Keras 3 Loss's dtype policy: its public `dtype` is the compute dtype
    only, while configs save, and `_WithLabels` copies, the policy itself."""
    return loss._dtype_policy


def set_metric_direction(metric, direction):
    """Marks a Keras 3 metric as better when "up" or "down", as Keras' own
    metrics do (callbacks in mode "auto" read it); there is no public setter."""
    metric._direction = direction
