"""Fused contrastive loss: a compiled TensorFlow op (loss and gradient in one
pass over the inputs) with a Keras 3 `ContrastiveLoss` on top.

Importing the package loads the op library, registers the op's gradient and
registers `ContrastiveLoss` with Keras serialization.
"""

__version__ = "0.1.0"

from fused_contrastive._ops import USE_REFERENCE_ENV, build_info, using_reference
from fused_contrastive.losses import ContrastiveLoss, contrastive_loss
from fused_contrastive.reference import contrastive_loss_reference

__all__ = [
    "ContrastiveLoss",
    "USE_REFERENCE_ENV",
    "build_info",
    "contrastive_loss",
    "contrastive_loss_reference",
    "using_reference",
]
