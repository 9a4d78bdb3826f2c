"""End-to-end demo: train a small Siamese network with
`ContrastiveLoss(distance="euclidean")` on synthetic data (the loss computes the
distance from the pair's embeddings itself: no distance layer), train the same
embedding network on class labels with `InBatchContrastiveLoss` (every pair of
each batch, XLA-compiled), then time the fused losses against the same losses in
plain TensorFlow ops.

Run with `python -m fused_contrastive.demo [--epochs N] [--seed S]`.
"""

import argparse
import statistics
import time

import keras
import numpy as np
import tensorflow as tf

from fused_contrastive import (
    ContrastiveLoss,
    InBatchContrastiveLoss,
    contrastive_loss_from_embeddings,
)
from fused_contrastive.reference import in_batch_contrastive_loss_reference

MARGIN = 1.0
NUM_CLASSES = 10
INPUT_DIM = 32
TRAIN_PAIRS = 4000
VAL_PAIRS = 1000
BATCH_SIZE = 64
BENCH_PAIRS = 65536
BENCH_DIM = 128
BENCH_WARMUP = 3
BENCH_REPEATS = 20
IN_BATCH_POINTS = 8000
IN_BATCH_SIZE = 512
IN_BATCH_BENCH_SIZE = 4096
IN_BATCH_BENCH_REPEATS = 5


def make_pairs(rng, num_pairs, centers, noise):
    """Pairs of points from Gaussian clusters (std `noise`) around `centers`;
    label 1 (similar) when both come from the same cluster, about half the pairs."""
    num_classes = len(centers)
    first = rng.integers(num_classes, size=num_pairs)
    similar = rng.random(num_pairs) < 0.5
    # A nonzero offset modulo num_classes always lands on another class.
    offset = rng.integers(1, num_classes, size=num_pairs)
    second = np.where(similar, first, (first + offset) % num_classes)

    def sample(classes):
        return centers[classes] + noise * rng.standard_normal((num_pairs, centers.shape[1]))

    return (
        sample(first).astype("float32"),
        sample(second).astype("float32"),
        similar.astype("float32"),
    )


def make_embedding():
    return keras.Sequential(
        [
            keras.Input((INPUT_DIM,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(16),
        ],
        name="embedding",
    )


def make_siamese(embedding):
    """Both inputs through one embedding network; the output stacks the pair's
    embeddings, [B, 2, 16], as ContrastiveLoss(distance=...) takes them."""
    left = keras.Input((INPUT_DIM,), name="left")
    right = keras.Input((INPUT_DIM,), name="right")
    pair = keras.layers.Concatenate()([embedding(left), embedding(right)])
    return keras.Model([left, right], keras.layers.Reshape((2, -1))(pair), name="siamese")


class EpochLine(keras.callbacks.Callback):
    """Prints one line per epoch: train and validation loss."""

    def __init__(self, epochs):
        super().__init__()
        self.epochs = epochs

    def on_epoch_end(self, epoch, logs=None):
        print(
            f"epoch {epoch + 1}/{self.epochs}: train loss {logs['loss']:.4f}, "
            f"val loss {logs['val_loss']:.4f}"
        )


def train(epochs, seed):
    rng = np.random.default_rng(seed)
    # The 1/sqrt(dim) scale keeps distances between points of the order of the
    # margin; clusters as wide as their spread overlap a little.
    scale = 1.0 / np.sqrt(INPUT_DIM)
    centers = scale * rng.standard_normal((NUM_CLASSES, INPUT_DIM))
    x1, x2, y = make_pairs(rng, TRAIN_PAIRS, centers, scale)
    v1, v2, vy = make_pairs(rng, VAL_PAIRS, centers, scale)

    model = make_siamese(make_embedding())
    model.compile(
        optimizer="adam",
        loss=ContrastiveLoss(margin=MARGIN, distance="euclidean"),
        jit_compile=False,
    )
    model.fit(
        [x1, x2],
        y,
        validation_data=([v1, v2], vy),
        epochs=epochs,
        batch_size=BATCH_SIZE,
        verbose=0,
        callbacks=[EpochLine(epochs)],
    )

    pairs = model.predict([v1, v2], batch_size=1024, verbose=0)
    distances = np.linalg.norm(pairs[:, 0] - pairs[:, 1], axis=-1)
    accuracy = np.mean((distances < MARGIN / 2) == (vy == 1))
    print(f"validation pair accuracy (distance < {MARGIN / 2:g} => similar): {accuracy:.1%}")


def train_in_batch(epochs, seed):
    """The embedding network on points with class labels: every pair of each
    batch of 512 is a positive (same cluster) or negative pair."""
    rng = np.random.default_rng(seed + 1)
    scale = 1.0 / np.sqrt(INPUT_DIM)
    centers = scale * rng.standard_normal((NUM_CLASSES, INPUT_DIM))

    def points(n):
        classes = rng.integers(NUM_CLASSES, size=n)
        x = centers[classes] + scale * rng.standard_normal((n, INPUT_DIM))
        return x.astype("float32"), classes

    x, classes = points(IN_BATCH_POINTS)
    vx, vclasses = points(1000)
    embedding = make_embedding()
    embedding.compile(
        optimizer="adam", loss=InBatchContrastiveLoss(margin=MARGIN), jit_compile=True
    )
    history = embedding.fit(x, classes, epochs=epochs, batch_size=IN_BATCH_SIZE, verbose=0)
    e = embedding.predict(vx, batch_size=1024, verbose=0)
    d = np.linalg.norm(e[:, None] - e[None, :], axis=-1)
    np.fill_diagonal(d, np.inf)
    nearest = vclasses[np.argmin(d, axis=1)]
    print(
        f"in-batch training ({epochs} epochs, batch {IN_BATCH_SIZE}, XLA): loss "
        f"{history.history['loss'][0]:.4f} -> {history.history['loss'][-1]:.4f}; validation "
        f"nearest-neighbour class accuracy {np.mean(nearest == vclasses):.1%}"
    )


def composite_loss(labels, a, b, margin):
    """The plain-TF pattern the fused loss replaces: distance ops, then the loss."""
    d = tf.sqrt(tf.maximum(tf.reduce_sum(tf.square(a - b), axis=1), 1e-12))
    return labels * tf.square(d) + (1.0 - labels) * tf.square(tf.maximum(margin - d, 0.0))


def make_loss_step(loss_fn):
    """Loss forward and backward (gradients w.r.t. both embeddings) as one graph."""

    @tf.function(jit_compile=False)
    def step(labels, a, b):
        with tf.GradientTape() as tape:
            tape.watch([a, b])
            loss = tf.reduce_mean(loss_fn(labels, a, b, MARGIN))
        return loss, tape.gradient(loss, [a, b])

    return step


def benchmark(seed):
    rng = np.random.default_rng(seed)
    labels = tf.constant(rng.random(BENCH_PAIRS) < 0.5, tf.float32)
    # Scaled so that distances fall on both sides of the margin.
    a, b = (
        tf.constant(rng.standard_normal((BENCH_PAIRS, BENCH_DIM)) / np.sqrt(BENCH_DIM), tf.float32)
        for _ in range(2)
    )
    steps = {
        "fused": make_loss_step(contrastive_loss_from_embeddings),
        "plain TF": make_loss_step(composite_loss),
    }
    times = {name: [] for name in steps}
    for repeat in range(BENCH_WARMUP + BENCH_REPEATS):
        for name, step in steps.items():  # interleaved so drift hits both alike
            start = time.perf_counter()
            step(labels, a, b)
            elapsed = time.perf_counter() - start
            if repeat >= BENCH_WARMUP:
                times[name].append(elapsed)
    fused, ref = (1e3 * statistics.median(times[name]) for name in steps)
    verdict = f"{ref / fused:.1f}x faster" if fused <= ref else f"{fused / ref:.1f}x slower"
    print(
        f"step time: fused {fused:.2f} ms, plain TF {ref:.2f} ms -> {verdict} (loss from "
        f"embeddings, fwd+bwd, B={BENCH_PAIRS}, D={BENCH_DIM}, median of {BENCH_REPEATS})"
    )


def in_batch_benchmark(seed):
    """The Keras loss class against Keras reducing the plain-TF all-pairs
    formula: forward and backward, tf.function."""
    rng = np.random.default_rng(seed)
    e = tf.constant(
        rng.standard_normal((IN_BATCH_BENCH_SIZE, BENCH_DIM)) / np.sqrt(BENCH_DIM), tf.float32
    )
    labels = tf.constant(rng.integers(0, 64, size=IN_BATCH_BENCH_SIZE))

    class PlainInBatch(keras.losses.Loss):
        def call(self, y_true, y_pred):
            return in_batch_contrastive_loss_reference(y_true, y_pred, MARGIN)

    def make_step(loss_object):
        @tf.function(jit_compile=False)
        def step(labels, e):
            with tf.GradientTape() as tape:
                tape.watch(e)
                loss = loss_object(labels, e)
            return loss, tape.gradient(loss, e)

        return step

    steps = {
        "fused": make_step(InBatchContrastiveLoss(margin=MARGIN)),
        "plain TF": make_step(PlainInBatch()),
    }
    times = {name: [] for name in steps}
    for repeat in range(1 + IN_BATCH_BENCH_REPEATS):
        for name, step in steps.items():
            start = time.perf_counter()
            step(labels, e)[1].numpy()
            if repeat:
                times[name].append(time.perf_counter() - start)
    fused, ref = (1e3 * statistics.median(times[name]) for name in steps)
    print(
        f"step time: fused {fused:.1f} ms, plain TF {ref:.1f} ms -> {ref / fused:.1f}x "
        f"(in-batch all pairs, fwd+bwd, B={IN_BATCH_BENCH_SIZE}, D={BENCH_DIM}, median of "
        f"{IN_BATCH_BENCH_REPEATS})"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m fused_contrastive.demo",
        description="Train a Siamese network with ContrastiveLoss(distance='euclidean') on "
        "synthetic pairs and an embedding network with InBatchContrastiveLoss on "
        "class labels, then time the fused losses against plain TensorFlow ops.",
    )
    parser.add_argument("--epochs", type=int, default=5, help="training epochs (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed for data and weights")
    args = parser.parse_args(argv)

    keras.utils.set_random_seed(args.seed)
    train(args.epochs, args.seed)
    train_in_batch(args.epochs, args.seed)
    benchmark(args.seed)
    in_batch_benchmark(args.seed)


if __name__ == "__main__":
    main()
