"""The package's TensorFlow API, which fused_contrastive/__init__.py
re-exports where TensorFlow is installed (fused_contrastive.jax needs none).
Importing it loads the op library, registers the ops' gradients and the Keras
classes with Keras serialization."""

# The imports are the API: __init__.py re-exports the names its __all__ lists.
# ruff: noqa: F401

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
