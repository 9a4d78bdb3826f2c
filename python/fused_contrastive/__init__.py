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

from fused_contrastive._ops import USE_REFERENCE_ENV, build_info, using_reference
from fused_contrastive.losses import contrastive_loss
from fused_contrastive.reference import contrastive_loss_reference

# The test TensorFlow itself applies to decide what tf.keras is.
if os.environ.get("TF_USE_LEGACY_KERAS", None) in ("true", "True", "1"):
    from fused_contrastive.keras2 import ContrastiveLoss
else:
    from fused_contrastive.losses import ContrastiveLoss

__all__ = [
    "ContrastiveLoss",
    "USE_REFERENCE_ENV",
    "build_info",
    "contrastive_loss",
    "contrastive_loss_reference",
    "using_reference",
]
