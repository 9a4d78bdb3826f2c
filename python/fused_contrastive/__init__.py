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

import importlib.abc
import importlib.util
import os
import sys

from fused_contrastive._library import USE_REFERENCE_ENV, build_info, using_reference
from fused_contrastive.in_batch import in_batch_contrastive_loss
from fused_contrastive.losses import contrastive_loss, contrastive_loss_from_embeddings
from fused_contrastive.retrieval import retrieval_metrics
from fused_contrastive.reference import (
    contrastive_loss_from_embeddings_reference,
    contrastive_loss_reference,
    in_batch_contrastive_loss_reference,
)

# The test TensorFlow itself applies to decide what tf.keras is.
if os.environ.get("TF_USE_LEGACY_KERAS", None) in ("true", "True", "1"):
    try:
        from fused_contrastive.keras2 import (
            ContrastiveLoss,
            InBatchContrastiveLoss,
            PairAccuracy,
            PairDistance,
            RetrievalMetrics,
        )
    except ModuleNotFoundError as error:
        if error.name != "tf_keras":
            raise
        raise ImportError(
            "TF_USE_LEGACY_KERAS is set, so fused_contrastive.ContrastiveLoss is the Keras 2 "
            "class, which needs tf_keras: pip install tf-keras (the package's [keras2] extra, "
            'pip install "fused-contrastive[keras2]" where it comes from an index), or unset '
            "TF_USE_LEGACY_KERAS to use Keras 3"
        ) from error
else:
    from fused_contrastive.losses import ContrastiveLoss, InBatchContrastiveLoss
    from fused_contrastive.pairs import PairAccuracy, PairDistance
    from fused_contrastive.retrieval import RetrievalMetrics

    class _RegisterWithTfKeras(importlib.abc.MetaPathFinder):
        """Registers the Keras 2 class (and so TF Addons' saved-model alias)
        once tf_keras is imported, before or after this package: importing
        tf_keras only for that would cost every user half a second."""

        def find_spec(self, name, path=None, target=None):
            if name != "tf_keras":
                return None
            import importlib.util  # the module's own names are deleted below
            import sys

            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            if spec is not None and spec.loader is not None:
                exec_module = spec.loader.exec_module

                def exec_then_register(module):
                    exec_module(module)
                    import fused_contrastive.keras2  # noqa: F401

                spec.loader.exec_module = exec_then_register
            return spec

    if "tf_keras" in sys.modules:
        import fused_contrastive.keras2  # noqa: F401
    else:
        sys.meta_path.insert(0, _RegisterWithTfKeras())

# What the code above used is no part of the package's namespace.
del importlib, os, sys

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
