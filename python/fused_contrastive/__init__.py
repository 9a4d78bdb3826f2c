"""Fused contrastive losses: compiled TensorFlow ops (loss and gradient in one
pass over the inputs) with Keras 3 `ContrastiveLoss` and `InBatchContrastiveLoss`
on top.

Importing the package loads the op library, registers the op's gradient and
registers `ContrastiveLoss` with Keras serialization. `ContrastiveLoss` is the
Keras 3 class (`fused_contrastive.losses`), or the Keras 2 one
(`fused_contrastive.keras2`, needs tf_keras) when TF_USE_LEGACY_KERAS is set,
following what `tf.keras` means in the same process.
"""

__version__ = "0.1.0"

__all__ = [
    "ContrastiveLoss",
    "InBatchContrastiveLoss",
    "PairAccuracy",
    "PairDistance",
    "RetrievalMetrics",
    "USE_REFERENCE_ENV",
    "build_info",
    "contrastive_loss",
    "contrastive_loss_from_embeddings",
    "contrastive_loss_from_embeddings_reference",
    "contrastive_loss_reference",
    "in_batch_contrastive_loss",
    "in_batch_contrastive_loss_reference",
    "retrieval_metrics",
    "using_reference",
]

# TensorFlow's absence leaves what needs none: fused_contrastive.jax. A
# TensorFlow that is installed but fails to import raises as ever.
try:
    import tensorflow
except ModuleNotFoundError as error:
    if error.name != "tensorflow":
        raise
    tensorflow = None

if tensorflow is None:

    def __getattr__(name):
        if name in __all__:
            raise ImportError(
                f"fused_contrastive.{name} needs TensorFlow, which is not installed "
                "(pip install tensorflow); fused_contrastive.jax works without it"
            )
        raise AttributeError(f"module 'fused_contrastive' has no attribute {name!r}")

else:
    from fused_contrastive import _tf_api

    globals().update({name: getattr(_tf_api, name) for name in __all__})

del tensorflow
