"""Fused contrastive loss: a compiled TensorFlow op (loss and gradient in one
pass over the inputs) with a Keras 3 `ContrastiveLoss` on top.

Importing the package loads the op library, registers the op's gradient and
registers `ContrastiveLoss` with Keras serialization. `ContrastiveLoss` is the
Keras 3 class (`fused_contrastive.losses`), or the Keras 2 one
(`fused_contrastive.keras2`, needs tf_keras) when TF_USE_LEGACY_KERAS is set,
following what `tf.keras` means in the same process.
"""

__version__ = "0.1.0"

import os
import sys

from fused_contrastive._ops import USE_REFERENCE_ENV, build_info, using_reference
from fused_contrastive.losses import contrastive_loss
from fused_contrastive.reference import contrastive_loss_reference

# The test TensorFlow itself applies to decide what tf.keras is.
if os.environ.get("TF_USE_LEGACY_KERAS", None) in ("true", "True", "1"):
    try:
        from fused_contrastive.keras2 import ContrastiveLoss
    except ModuleNotFoundError as error:
        if error.name != "tf_keras":
            raise
        raise ImportError(
            "TF_USE_LEGACY_KERAS is set, so fused_contrastive.ContrastiveLoss is the Keras 2 "
            "class, which needs tf_keras: pip install \"fused-contrastive[keras2]\" (or unset "
            "TF_USE_LEGACY_KERAS to use Keras 3)") from error
else:
    from fused_contrastive.losses import ContrastiveLoss

    # A process that already uses tf_keras gets the Keras 2 class registered
    # too (TF Addons' saved models load through it); importing tf_keras only
    # for that would cost every user half a second.
    if "tf_keras" in sys.modules:
        import fused_contrastive.keras2  # noqa: F401

__all__ = [
    "ContrastiveLoss",
    "USE_REFERENCE_ENV",
    "build_info",
    "contrastive_loss",
    "contrastive_loss_reference",
    "using_reference",
]
