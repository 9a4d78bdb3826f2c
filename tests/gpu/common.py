"""What the parts of the GPU check (check_gpu.py) share: the dtypes, margins and
tolerances, the inputs of each family, the devices the kernels run on (CudaDevice,
or CpuStandIn for --self-test) and the comparison helpers. No TensorFlow: the
GPU machines this check borrows have none.
"""

import math
import statistics
import time

import ml_dtypes
import numpy as np

LABEL_DTYPES = ["bool", "int32", "int64", "float16", "bfloat16", "float32", "float64"]
DISTANCE_DTYPES = ["float16", "bfloat16", "float32", "float64"]
MARGIN = 0.75
DISTANCE_KINDS = ["euclidean", "cosine", "manhattan"]
REDUCTIONS = ["sum", "mean", "weighted_mean"]
# The GPU sums a row in another order than the CPU (each fixed), so results
# differ by rounding: allowed EMBEDDING_ULPS ulps of the compute type times
# the largest magnitude in the array before cancellation (rounding_scales),
# plus one ulp of the stored dtype, subnormals included, for 16-bit outputs
# rounded on either side of a boundary.
EMBEDDING_ULPS = 16
# Outputs stored in their compute type, so the differences that remain are
# those of the sums: the worst of them is worth reporting.
UNROUNDED = ("float32", "float64")
# The fused-reduction kernels' loss, relative: their blocks are summed in
# another order on each side.
REDUCED_TOLERANCE = {"float16": 2e-3, "bfloat16": 2e-2, "float32": 2e-6, "float64": 1e-12}
# The in-batch kernels: margins that put many pairs of rows of norm about 1
# in their hinges, and the allowed |GPU - CPU| as a fraction of the largest
# magnitude of the output. Both sides get the distances from their own GEMMs
# (cuBLAS or the tiled kernel, Eigen's blocks) and sum each anchor's pairs in
# their own order; the gradient e_i·q_i - Σ M_ij·e_j also cancels by about
# sqrt(B). Rounding, measured in ulps of the compute type, stays well inside.
IN_BATCH_MARGIN = 1.5
IN_BATCH_POSITIVE_MARGIN = 0.25
IN_BATCH_LOSS_SCALE = 0.5
IN_BATCH_TOLERANCE = {"float32": 1e-4, "float64": 1e-10}


def numpy_dtype(name):
    return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)


def host_inputs(rng, n, label_dtype, distance_dtype):
    if label_dtype == "bool":  # any byte: every nonzero one must read as true
        labels = rng.integers(0, 256, size=n, dtype=np.uint8).view(np.bool_)
    elif label_dtype in ("int32", "int64"):
        labels = rng.integers(0, 2, size=n).astype(label_dtype)
    else:  # soft labels
        labels = rng.random(n, dtype=np.float32).astype(numpy_dtype(label_dtype))
    distances = (2 * MARGIN * rng.random(n, dtype=np.float32)).astype(numpy_dtype(distance_dtype))
    return labels, distances


def host_embeddings(rng, shape, label_dtype, dtype, distance):
    """Labels [...] and embeddings a, b [..., D] whose distances spread over
    their range: many dissimilar pairs are in the hinge. With more than two
    rows, the first has a == b (distance 0), the second a zero a (no cosine
    similarity); fewer would leave no row to set the scale of their rounding."""
    rows, dim = int(np.prod(shape[:-1])), shape[-1]
    labels = host_inputs(rng, rows, label_dtype, "float32")[0].reshape(shape[:-1])
    a = rng.standard_normal((rows, dim))
    if distance == "cosine":  # b's cosine with a spread over [-1, 1]
        along = rng.uniform(-1, 1, (rows, 1))
        b = along * a + np.sqrt(1 - along**2) * rng.standard_normal(a.shape)
    else:  # rows scaled so that distances spread over about [0, 2 * MARGIN]
        b = rng.standard_normal(a.shape)
        mean = np.sqrt(2 * dim) if distance == "euclidean" else dim * 2 / np.sqrt(np.pi)
        factor = rng.uniform(0, 2 * MARGIN, (rows, 1)) / mean
        a, b = a * factor, b * factor
    if rows > 2:
        b[0] = a[0]
        a[1] = 0
    cast = lambda x: x.reshape(shape).astype(numpy_dtype(dtype))  # noqa: E731
    return labels, cast(a), cast(b)


def in_batch_inputs(rng, rows, dim, dtype):
    """Class labels [rows] (about four rows a class) and embeddings [rows, dim]
    of norm about 1. With enough rows: row 1 duplicates row 0 (same class,
    d = 0), row 3 is row 2 plus noise (another class: a near pair in the
    negative hinge, whose Gram distance cancels), row 5 is zero (no cosine
    similarity). The noise puts the near pair well inside the kernels'
    direct-distance range (gram_distance_cancels) in both dtypes: a pair
    just outside it has its distance from the Gram form, correct only to
    about 1e-4 (float32) or 4e-10 (float64) relative on either side, and
    would measure that, not the kernels."""
    labels = rng.integers(0, max(1, rows // 4), rows).astype(np.int64)
    e = rng.standard_normal((rows, dim)) / np.sqrt(dim)
    if rows >= 4:
        e[1], labels[1] = e[0], labels[0]
        noise = 1e-4 if dtype == "float32" else 1e-8
        e[3] = e[2] + noise * rng.standard_normal(dim) / np.sqrt(dim)
        labels[3] = labels[2] + 1
    if rows >= 6:
        e[5] = 0
    return labels, e.astype(dtype)


class CpuStandIn:
    """The CPU kernel in the GPU's place, so --self-test exercises every check."""

    name = "CPU kernel (self-test stand-in for the GPU)"

    def __init__(self, kernels):
        self.kernels = kernels

    def run(self, labels, distances, offsets=(0, 0, 0, 0), similar_label=1):
        labels = _offset_copy(np, labels, offsets[0])
        distances = _offset_copy(np, distances, offsets[1])
        return self.kernels.contrastive_loss_cpu(
            labels, distances, MARGIN, similar_label=similar_label
        )

    def run_reduced(self, labels, distances, weights, reduction):
        return self.kernels.contrastive_loss_reduced_cpu(
            labels, distances, weights, MARGIN, reduction
        )

    def scale(self, gradient, scale):
        return cpu_scale(gradient, scale)

    # The embedding axis reversed: the same distances summed in another order,
    # as the GPU's would be, so the self-test meets the rounding it tolerates.
    def run_embedding(self, labels, a, b, distance, similar_label, offsets=(0, 0, 0, 0)):
        labels, a, b = (_offset_copy(np, x, o) for x, o in zip((labels, a, b), offsets))
        return self.kernels.embedding_loss_cpu(
            labels, a[..., ::-1], b[..., ::-1], MARGIN, distance, similar_label
        )

    def run_embedding_grad(self, a, b, coefficients, upstream, distance, offsets=(0, 0, 0, 0)):
        a, b = _offset_copy(np, a, offsets[1]), _offset_copy(np, b, offsets[2])
        coefficients = _offset_copy(np, coefficients, offsets[0])
        upstream = _offset_copy(np, upstream, offsets[0])
        grad_a, grad_b = self.kernels.embedding_grad_cpu(
            a[..., ::-1], b[..., ::-1], coefficients, upstream, distance
        )
        return grad_a[..., ::-1], grad_b[..., ::-1]

    def run_embedding_reduced(self, labels, a, b, weights, distance, reduction):
        loss, grad_a, grad_b, scale = self.kernels.embedding_loss_reduced_cpu(
            labels, a[..., ::-1], b[..., ::-1], weights, MARGIN, distance, reduction
        )
        return loss, grad_a[..., ::-1], grad_b[..., ::-1], scale

    def embedding_bandwidth(self, rows, dim):
        labels, a, b = host_embeddings(
            np.random.default_rng(0), (rows, dim), "float32", "float32", "euclidean"
        )
        sync = lambda: None  # noqa: E731
        fused = median_seconds(
            lambda: self.kernels.embedding_loss_reduced_cpu(labels, a, b, None, MARGIN), sync, 5
        )
        return fused, _copy_seconds(np, rows * dim, sync, lambda t, s: np.copyto(t, s), 5)

    def bandwidth(self, n):
        labels, distances = host_inputs(np.random.default_rng(0), n, "float32", "float32")
        sync = lambda: None  # noqa: E731
        times = {
            "fused loss+grad": median_seconds(
                lambda: self.kernels.contrastive_loss_cpu(labels, distances, MARGIN), sync, 5
            ),
            "fused reduced": median_seconds(
                lambda: self.kernels.contrastive_loss_reduced_cpu(labels, distances, None, MARGIN),
                sync,
                5,
            ),
            "unfused loss+grad": median_seconds(
                lambda: _unfused_formula(np, labels, distances), sync, 5
            ),
            "unfused reduced": median_seconds(
                lambda: _unfused_reduced(np, labels, distances), sync, 5
            ),
        }
        return times, _copy_seconds(np, n, sync, lambda t, s: np.copyto(t, s), repeats=5)

    # As for the embeddings: the embedding axis reversed, so the Gram entries
    # are summed in another order, and a block size of its own.
    def run_in_batch(self, labels, e, upstream, options, with_loss=True):
        options = dict(options, max_block_rows=5)
        loss, grad = self.kernels.in_batch_loss_cpu(labels, e[:, ::-1], upstream, **options)
        return (loss if with_loss else None), (None if grad is None else grad[:, ::-1])

    def run_in_batch_reduced(self, labels, e, weights, reduction, options):
        loss, grad, scale = in_batch_reduced_reference(
            self.kernels,
            labels,
            e[:, ::-1],
            weights,
            reduction,
            options,
            weight_total=lambda w: np.sum(w[::-1]),
        )
        return loss, grad[:, ::-1], scale

    def in_batch_seconds(self, rows, dim):
        labels, e = in_batch_inputs(np.random.default_rng(0), rows, dim, "float32")
        upstream = np.ones(rows, np.float32)
        sync = lambda: None  # noqa: E731
        return {
            "loss": median_seconds(lambda: self.kernels.in_batch_loss_cpu(labels, e), sync, 3),
            "loss+grad": median_seconds(
                lambda: self.kernels.in_batch_loss_cpu(labels, e, upstream), sync, 3
            ),
        }


class CudaDevice:
    name = "CUDA kernel"

    def __init__(self, kernels):
        import cupy

        self.cp = cupy
        self.kernels = kernels
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        self.name = f"CUDA kernel on {props['name'].decode()}"

    def _device(self, host, offset):
        """A device copy of `host`, starting `offset` elements into its buffer."""
        raw = host.view(np.uint16) if host.dtype == ml_dtypes.bfloat16 else host
        return _offset_copy(self.cp, self.cp.asarray(raw), offset)

    def run(self, labels, distances, offsets=(0, 0, 0, 0), similar_label=1):
        cp = self.cp
        d_labels = self._device(labels, offsets[0])
        d_distances = self._device(distances, offsets[1])
        loss = _offset_copy(cp, cp.empty_like(d_distances), offsets[2])
        grad = _offset_copy(cp, cp.empty_like(d_distances), offsets[3])
        stream = cp.cuda.get_current_stream()
        self.kernels.contrastive_loss_cuda(
            d_labels,
            d_distances,
            loss,
            grad,
            MARGIN,
            stream=stream.ptr,
            labels_dtype="bfloat16" if labels.dtype == ml_dtypes.bfloat16 else None,
            distances_dtype="bfloat16" if distances.dtype == ml_dtypes.bfloat16 else None,
            similar_label=similar_label,
        )
        stream.synchronize()
        out_dtype = distances.dtype
        return loss.get().view(out_dtype), grad.get().view(out_dtype)

    def _bf16(self, array):
        return "bfloat16" if array.dtype == ml_dtypes.bfloat16 else None

    def run_reduced(self, labels, distances, weights, reduction):
        cp = self.cp
        d_labels = self._device(labels, 0)
        d_distances = self._device(distances, 0)
        host_weights = np.ones((), distances.dtype) if weights is None else np.asarray(weights)
        d_weights = self._device(host_weights, 0)
        loss = cp.empty((), d_distances.dtype)
        grad = cp.empty_like(d_distances)
        scale = cp.empty((), cp.float64)
        workspace = cp.empty(self.kernels.reduced_workspace_bytes(distances.size), cp.uint8)
        stream = cp.cuda.get_current_stream()
        self.kernels.contrastive_loss_reduced_cuda(
            d_labels,
            d_distances,
            d_weights,
            loss,
            grad,
            scale,
            workspace,
            MARGIN,
            reduction,
            stream=stream.ptr,
            labels_dtype=self._bf16(labels),
            distances_dtype=self._bf16(distances),
        )
        stream.synchronize()
        return (
            loss.get().view(distances.dtype),
            grad.get().view(distances.dtype),
            float(scale.get()),
        )

    def scale(self, gradient, scale):
        cp = self.cp
        raw = gradient.view(np.uint16) if gradient.dtype == ml_dtypes.bfloat16 else gradient
        d_gradient = cp.asarray(raw)
        d_scale = cp.asarray(np.asarray(scale, gradient.dtype).view(raw.dtype))
        out = cp.empty_like(d_gradient)
        stream = cp.cuda.get_current_stream()
        self.kernels.scale_cuda(
            d_gradient, d_scale, out, stream=stream.ptr, dtype=self._bf16(gradient)
        )
        stream.synchronize()
        return out.get().view(gradient.dtype)

    def bandwidth(self, n):
        cp = self.cp
        labels = (cp.random.random(n, dtype=cp.float32) < 0.5).astype(cp.float32)
        distances = 2 * MARGIN * cp.random.random(n, dtype=cp.float32)
        loss, grad = cp.empty_like(distances), cp.empty_like(distances)
        ones = cp.ones((), cp.float32)
        reduced, scale = cp.empty((), cp.float32), cp.empty((), cp.float64)
        workspace = cp.empty(self.kernels.reduced_workspace_bytes(n), cp.uint8)
        stream = cp.cuda.get_current_stream()
        sync = stream.synchronize
        times = {
            "fused loss+grad": median_seconds(
                lambda: self.kernels.contrastive_loss_cuda(
                    labels, distances, loss, grad, MARGIN, stream=stream.ptr
                ),
                sync,
            ),
            "fused reduced": median_seconds(
                lambda: self.kernels.contrastive_loss_reduced_cuda(
                    labels,
                    distances,
                    ones,
                    reduced,
                    grad,
                    scale,
                    workspace,
                    MARGIN,
                    "mean",
                    stream=stream.ptr,
                ),
                sync,
            ),
            "unfused loss+grad": median_seconds(
                lambda: _unfused_formula(cp, labels, distances), sync
            ),
            "unfused reduced": median_seconds(
                lambda: _unfused_reduced(cp, labels, distances), sync
            ),
        }
        return times, _copy_seconds(cp, n, sync, self._copy)

    def _copy(self, target, source):
        cp = self.cp
        cp.cuda.runtime.memcpyAsync(
            target.data.ptr,
            source.data.ptr,
            source.nbytes,
            cp.cuda.runtime.memcpyDeviceToDevice,
            cp.cuda.get_current_stream().ptr,
        )

    def _host(self, device, dtype):
        """A device array's values as a host array of `dtype` (bfloat16 travels as uint16)."""
        return device.get().view(dtype)

    def run_embedding(self, labels, a, b, distance, similar_label, offsets=(0, 0, 0, 0)):
        cp = self.cp
        d_labels, d_a, d_b = (self._device(x, o) for x, o in zip((labels, a, b), offsets))
        loss = _offset_copy(cp, cp.empty(labels.shape, d_a.dtype), offsets[3])
        per_row = self.kernels.row_coefficients[distance]
        coefficients = _offset_copy(cp, cp.empty(labels.shape + (per_row,), cp.float64), offsets[3])
        stream = cp.cuda.get_current_stream()
        self.kernels.embedding_loss_cuda(
            d_labels,
            d_a,
            d_b,
            loss,
            coefficients,
            MARGIN,
            distance,
            stream=stream.ptr,
            labels_dtype=self._bf16(labels),
            embeddings_dtype=self._bf16(a),
            similar_label=similar_label,
        )
        stream.synchronize()
        return self._host(loss, a.dtype), coefficients.get()

    def run_embedding_grad(self, a, b, coefficients, upstream, distance, offsets=(0, 0, 0, 0)):
        cp = self.cp
        d_a, d_b = self._device(a, offsets[1]), self._device(b, offsets[2])
        d_coefficients = self._device(coefficients, offsets[0])
        d_upstream = self._device(upstream, offsets[0])
        grad_a, grad_b = (_offset_copy(cp, cp.empty_like(d_a), offsets[3]) for _ in range(2))
        stream = cp.cuda.get_current_stream()
        self.kernels.embedding_grad_cuda(
            d_a,
            d_b,
            d_coefficients,
            d_upstream,
            grad_a,
            grad_b,
            distance,
            stream=stream.ptr,
            embeddings_dtype=self._bf16(a),
        )
        stream.synchronize()
        return self._host(grad_a, a.dtype), self._host(grad_b, a.dtype)

    def run_embedding_reduced(self, labels, a, b, weights, distance, reduction):
        cp = self.cp
        d_labels, d_a, d_b = (self._device(x, 0) for x in (labels, a, b))
        d_weights = self._device(np.ones((), a.dtype) if weights is None else weights, 0)
        loss = cp.empty((), d_a.dtype)
        grad_a, grad_b = cp.empty_like(d_a), cp.empty_like(d_b)
        scale = cp.empty((), cp.float64)
        workspace = cp.empty(self.kernels.embedding_reduced_workspace_bytes(labels.size), cp.uint8)
        stream = cp.cuda.get_current_stream()
        self.kernels.embedding_loss_reduced_cuda(
            d_labels,
            d_a,
            d_b,
            d_weights,
            loss,
            grad_a,
            grad_b,
            scale,
            workspace,
            MARGIN,
            distance,
            reduction,
            stream=stream.ptr,
            labels_dtype=self._bf16(labels),
            embeddings_dtype=self._bf16(a),
        )
        stream.synchronize()
        return (
            self._host(loss, a.dtype),
            self._host(grad_a, a.dtype),
            self._host(grad_b, a.dtype),
            float(scale.get()),
        )

    def embedding_bandwidth(self, rows, dim):
        cp = self.cp
        labels = (cp.random.random(rows, dtype=cp.float32) < 0.5).astype(cp.float32)
        a, b = (cp.random.standard_normal((rows, dim), dtype=cp.float32) for _ in range(2))
        ones, loss = cp.ones((), cp.float32), cp.empty((), cp.float32)
        grad_a, grad_b = cp.empty_like(a), cp.empty_like(b)
        scale = cp.empty((), cp.float64)
        workspace = cp.empty(self.kernels.embedding_reduced_workspace_bytes(rows), cp.uint8)
        stream = cp.cuda.get_current_stream()
        fused = median_seconds(
            lambda: self.kernels.embedding_loss_reduced_cuda(
                labels,
                a,
                b,
                ones,
                loss,
                grad_a,
                grad_b,
                scale,
                workspace,
                MARGIN,
                stream=stream.ptr,
            ),
            stream.synchronize,
        )
        return fused, _copy_seconds(cp, rows * dim, stream.synchronize, self._copy)

    def _in_batch_operands(self, labels, e):
        cp = self.cp
        return cp.asarray(labels.astype(np.int64)), cp.asarray(e)

    # Outputs start as NaN: an element the kernel never writes cannot pass.
    def run_in_batch(self, labels, e, upstream, options, with_loss=True):
        cp = self.cp
        d_labels, d_e = self._in_batch_operands(labels, e)
        d_upstream = None if upstream is None else cp.asarray(upstream)
        loss = cp.full(labels.shape, np.nan, e.dtype) if with_loss else None
        grad = None if upstream is None else cp.full(e.shape, np.nan, e.dtype)
        workspace = cp.empty(
            self.kernels.in_batch_workspace_bytes(
                len(labels),
                e.dtype.name,
                options["max_block_rows"],
                e.shape[1],
                options["distance"],
            ),
            cp.uint8,
        )
        stream = cp.cuda.get_current_stream()
        self.kernels.in_batch_loss_cuda(
            d_labels, d_e, d_upstream, loss, grad, workspace, stream=stream.ptr, **options
        )
        stream.synchronize()
        return (None if loss is None else loss.get()), (None if grad is None else grad.get())

    def run_in_batch_reduced(self, labels, e, weights, reduction, options):
        cp = self.cp
        d_labels, d_e = self._in_batch_operands(labels, e)
        d_weights = cp.asarray(np.ones((), e.dtype) if weights is None else weights)
        loss = cp.full((), np.nan, e.dtype)
        grad = cp.full(e.shape, np.nan, e.dtype)
        scale = cp.full((), np.nan, cp.float64)
        workspace = cp.empty(
            self.kernels.in_batch_reduced_workspace_bytes(
                len(labels),
                e.dtype.name,
                options["max_block_rows"],
                e.shape[1],
                options["distance"],
            ),
            cp.uint8,
        )
        stream = cp.cuda.get_current_stream()
        self.kernels.in_batch_loss_reduced_cuda(
            d_labels,
            d_e,
            d_weights,
            loss,
            grad,
            scale,
            workspace,
            reduction=reduction,
            loss_scale=IN_BATCH_LOSS_SCALE,
            stream=stream.ptr,
            **options,
        )
        stream.synchronize()
        return loss.get(), grad.get(), float(scale.get())

    def in_batch_seconds(self, rows, dim):
        cp = self.cp
        labels, e = in_batch_inputs(np.random.default_rng(0), rows, dim, "float32")
        d_labels, d_e = self._in_batch_operands(labels, e)
        upstream = cp.ones(rows, cp.float32)
        loss, grad = cp.empty(rows, cp.float32), cp.empty_like(d_e)
        workspace = cp.empty(self.kernels.in_batch_workspace_bytes(rows, "float32"), cp.uint8)
        stream = cp.cuda.get_current_stream()
        run = lambda u, g: self.kernels.in_batch_loss_cuda(  # noqa: E731
            d_labels, d_e, u, loss, g, workspace, IN_BATCH_MARGIN, stream=stream.ptr
        )
        return {
            "loss": median_seconds(lambda: run(None, None), stream.synchronize),
            "loss+grad": median_seconds(lambda: run(upstream, grad), stream.synchronize),
        }


def _offset_copy(xp, array, offset):
    """The same values in a buffer that starts `offset` elements past an allocation."""
    if offset == 0:
        return array
    padded = xp.empty(array.size + offset, array.dtype)
    padded[offset:] = array.reshape(-1)
    return padded[offset:].reshape(array.shape)


def _unfused_formula(xp, labels, distances):
    """The loss and its derivative as separate array operations (the baseline)."""
    hinge = xp.maximum(MARGIN - distances, 0)
    loss = labels * distances * distances + (1 - labels) * hinge * hinge
    grad = 2 * (labels * distances - (1 - labels) * hinge)
    return loss, grad


def _unfused_reduced(xp, labels, distances):
    """Mean loss and its gradient as separate array operations (the baseline)."""
    loss, grad = _unfused_formula(xp, labels, distances)
    return loss.mean(), grad / labels.size


def _copy_seconds(xp, n, sync, copy, repeats=20):
    """Time to copy 4N float32 elements: they move the 16N bytes the loss+grad
    kernel moves (read + write), so its times compare directly."""
    source = xp.ones(2 * n, xp.float32)
    target = xp.empty_like(source)
    return median_seconds(lambda: copy(target, source), sync, repeats)


def median_seconds(fn, sync, repeats=20):
    fn()
    sync()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_scale(gradient, factor):
    """What the kernels compute: the product in the compute type, rounded once."""
    compute = np.float64 if gradient.dtype == np.float64 else np.float32
    scale = compute(np.asarray(factor, gradient.dtype).astype(compute))
    return (gradient.astype(compute) * scale).astype(gradient.dtype)


def in_batch_reduced_reference(
    kernels, labels, e, weights, reduction, options, weight_total=math.fsum
):
    """InBatchLossReducedCpu from in_batch_loss_cpu: g_i = w_i·reduction_scale
    rounded to the embeddings' dtype is the upstream gradient of each anchor
    (options' anchors, (begin, end), or every row), 0 for the other rows, the
    loss is Σ g_i·l_i in float64. weight_total adds up per-anchor weights
    (float64)."""
    dtype = e.dtype
    begin, end = (options.get("anchors") or (0, len(labels)))[:2]
    w = np.ones((), dtype) if weights is None else np.asarray(weights)
    if reduction == "sum":
        divisor = 1.0
    elif reduction == "mean":
        divisor = float(end - begin)
    else:
        divisor = float(w) if w.ndim == 0 else float(weight_total(w.astype(np.float64)))
    scale = IN_BATCH_LOSS_SCALE / divisor if divisor != 0 else 0.0
    g = np.zeros(len(labels), dtype)
    g[begin:end] = (np.broadcast_to(w.astype(np.float64), (end - begin,)) * scale).astype(dtype)
    loss, grad = kernels.in_batch_loss_cpu(labels, e, g, **options)
    total = math.fsum(g.astype(np.float64) * loss.astype(np.float64))
    return np.asarray(total, dtype), grad, scale


def weight_form(weights):
    """How a failed reduced case was weighted: none, scalar or vector."""
    return "none" if weights is None else "scalar" if weights.ndim == 0 else "vector"


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def compute_dtype(dtype):
    return "float64" if dtype == "float64" else "float32"


def rounding_scales(labels, a, b, distance, similar_label):
    """What the rounding of each output scales with (float64, from the
    inputs): the magnitudes of the terms it is computed from, which cancel
    in soft labels' y*d - (1-y)*h, in the hinge h = margin - d and in the
    cosine gradient (exactly, where a == b). Returns the per-row loss's and
    the per-element scales of d(loss)/da and d(loss)/db (upstream 1)."""
    y = labels.astype(np.float64)
    y = np.abs(y if similar_label else 1 - y)
    a, b = a.astype(np.float64), b.astype(np.float64)
    inverse = lambda x: np.divide(1, x, out=np.zeros_like(x), where=x > 0)  # noqa: E731
    if distance == "cosine":
        aa, bb = (np.sum(x * x, -1, keepdims=True) for x in (a, b))
        norms = np.sqrt(aa * bb)
        d = np.full(y.shape, 2.0)  # 1 - s, s in [-1, 1]: rounded on that scale
        terms_a = np.abs(b) * inverse(norms) + np.abs(a) * inverse(aa)
        terms_b = np.abs(a) * inverse(norms) + np.abs(b) * inverse(bb)
    elif distance == "euclidean":
        d = np.sqrt(np.sum((a - b) ** 2, -1))
        terms_a = terms_b = np.abs(a - b) * inverse(d[..., None])
    else:
        d = np.sum(np.abs(a - b), -1)
        terms_a = terms_b = np.ones_like(a)
    loss = y * d * d + (1 - y) * (MARGIN + d) ** 2
    g = (2 * (y * d + (1 - y) * (MARGIN + d)))[..., None]
    return loss, g * terms_a, g * terms_b


def tolerance_used(got, want, compute, stored=None, scale=None):
    """The largest |got - want| as a fraction of what EMBEDDING_ULPS allows
    for magnitudes `scale` (default |want|); inf for another dtype, shape or
    NaN pattern."""
    if got.dtype != want.dtype or got.shape != want.shape:
        return np.inf
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if np.any(np.isnan(got) != np.isnan(want)):
        return np.inf
    stored = ml_dtypes.finfo(stored or compute)
    largest = np.max(np.abs(want) if scale is None else scale, initial=0)
    limit = (
        EMBEDDING_ULPS * ml_dtypes.finfo(compute).eps * largest
        + stored.eps * np.abs(want)
        + stored.smallest_subnormal
    )
    error = np.abs(np.where(np.isnan(want), 0, got - want))
    return float(
        np.max(
            np.divide(error, limit, out=np.where(error > 0, np.inf, 0.0), where=limit > 0),
            initial=0,
        )
    )


def relative_error(got, want, dtype, magnitude=None, tolerances=IN_BATCH_TOLERANCE):
    """max |got - want| as a fraction of tolerances[dtype] times the largest
    |want| (or `magnitude`); inf for another dtype, shape or NaN pattern, or
    any difference where everything is 0."""
    if got is None or got.dtype != want.dtype or got.shape != want.shape:
        return np.inf
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if np.any(np.isnan(got) != np.isnan(want)):
        return np.inf
    largest = np.max(np.abs(want), initial=0) if magnitude is None else magnitude
    error = np.max(np.abs(np.where(np.isnan(want), 0, got - want)), initial=0)
    limit = tolerances[dtype] * largest
    return float(error / limit) if limit > 0 else (np.inf if error > 0 else 0.0)
