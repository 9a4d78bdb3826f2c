"""The pair distance and pair accuracy, written once over an array namespace
`xp` so that TensorFlow (reference.py's TF_OPS: the test oracle, the
PairDistance layer and PairAccuracy metric on TensorFlow) and JAX (jax.py's
JAX_OPS: the same classes on Keras 3 on JAX) compute them alike. No TensorFlow
here: fused_contrastive.jax imports it. `xp` has where, ones_like,
zeros_like, sum, max, abs, sign, sqrt, isfinite, stop_gradient, cast, equal and
logical_not, with NumPy's keyword names (axis, keepdims)."""

# Σx² outside [low, high] over- or underflows (CosineScaling in cc/core/pairs/math.h).
_COSINE_RANGE = {"float32": (2.0**-60, 2.0**100), "float64": (2.0**-900, 2.0**900)}


def safe(xp, x, ok):
    """x where ok, else 1: the branch autodiff takes through where's unused
    side must stay finite (0 * inf is NaN)."""
    return xp.where(ok, x, xp.ones_like(x))


def cosine_scaled(xp, x):
    """x, with rows whose Σx² leaves _COSINE_RANGE divided by their largest
    |element| (cosine is scale-invariant): no NaN from Σx² = inf, no zero
    vector from squares that underflow. Other rows are unchanged."""
    low, high = _COSINE_RANGE[x.dtype.name]
    squares = xp.sum(x * x, axis=-1, keepdims=True)
    largest = xp.max(xp.abs(x), axis=-1, keepdims=True)
    rescale = ((squares < low) | (squares > high)) & (largest > 0) & xp.isfinite(largest)
    return x * xp.stop_gradient(xp.where(rescale, 1.0 / safe(xp, largest, rescale), 1.0))


def distance(xp, a, b, kind):
    """Distance between the rows of a and b (a compute dtype: float32 or
    float64), with the kernels' conventions at zero: d = 0 and a zero gradient
    at a == b (euclidean), similarity 0 for a zero vector (cosine),
    sign(0) = 0 (manhattan)."""
    if kind == "euclidean":
        diff = a - b
        squared = xp.sum(diff * diff, axis=-1)
        nonzero = squared > 0
        return xp.where(nonzero, xp.sqrt(safe(xp, squared, nonzero)), xp.zeros_like(squared))
    if kind == "cosine":
        a, b = cosine_scaled(xp, a), cosine_scaled(xp, b)
        aa, bb = xp.sum(a * a, axis=-1), xp.sum(b * b, axis=-1)
        ok = xp.stop_gradient(xp.sqrt(aa) * xp.sqrt(bb)) > 0
        norms = xp.sqrt(safe(xp, aa, ok)) * xp.sqrt(safe(xp, bb, ok))
        similarity = xp.where(ok, xp.sum(a * b, axis=-1) / norms, xp.zeros_like(aa))
        return 1.0 - similarity
    # |x| as x * sign(x): its gradient is sign(x), 0 at x = 0 in both
    # namespaces (JAX's abs has gradient 1 there).
    diff = a - b
    return xp.sum(diff * xp.sign(diff), axis=-1)


def pair_accuracy(xp, labels, d, threshold, similar_label):
    """1.0 where the pair's distance d (below threshold: similar) says what
    its label says (similar_label marks a similar pair; a soft label counts as
    the nearer of 0 and 1), else 0.0; float32."""
    label_is_one = xp.cast(labels, "float32") > 0.5
    similar = label_is_one if similar_label == 1 else xp.logical_not(label_is_one)
    return xp.cast(xp.equal(d < threshold, similar), "float32")
