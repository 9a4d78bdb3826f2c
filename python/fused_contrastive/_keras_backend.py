"""Which Keras 3 backend runs the package's Keras 3 classes."""

import keras


def on_jax():
    """Whether Keras 3 runs on JAX (KERAS_BACKEND=jax): the classes then
    compute with fused_contrastive.jax (the losses by the same kernels), and
    Keras' own Loss.__call__ masks, weighs and reduces the per-sample losses
    (the fused reductions are TensorFlow ops)."""
    return keras.backend.backend() == "jax"


def jax_functions():
    # Imported on first use: it registers the kernels' handlers with JAX.
    from fused_contrastive import jax as fcj

    return fcj
