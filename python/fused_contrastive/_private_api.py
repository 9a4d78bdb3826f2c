"""The private TensorFlow and Keras APIs the package relies on, in one place: a
release that moves one breaks this module only."""

from tensorflow.python.eager import record


def could_possibly_record():
    """Whether a gradient tape may be recording: TensorFlow has no public way to ask."""
    return record.could_possibly_record()


def should_record(tensors):
    """Whether a recording gradient tape watches any of `tensors` (graph or eager):
    TensorFlow has no public way to ask."""
    return record.should_record_backprop(tensors)


def keras_mask(tensor):
    """The mask Keras 3 attached to a tensor, else None: there is no public accessor."""
    return getattr(tensor, "_keras_mask", None)


def dtype_policy(loss):
    """A Keras 3 Loss's dtype policy: its public `dtype` is only the compute dtype."""
    return loss._dtype_policy


def set_metric_direction(metric, direction):
    """Marks a Keras 3 metric better "up" or "down" (for callbacks): there is no public setter."""
    metric._direction = direction
