"""End-to-end demo: train a small Siamese network with
`ContrastiveLoss(distance="euclidean")` on synthetic data (the loss computes the
distance from the pair's embeddings itself: no distance layer), then time the
fused loss from embeddings against the same loss in plain TensorFlow ops.

Run with `python -m fused_contrastive.demo [--epochs N] [--seed S]`.
"""

import argparse
import statistics
import time

import keras
import numpy as np
import tensorflow as tf

from fused_contrastive import ContrastiveLoss, contrastive_loss_from_embeddings

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

    return (sample(first).astype("float32"), sample(second).astype("float32"),
            similar.astype("float32"))


def make_embedding():
    return keras.Sequential([
        keras.Input((INPUT_DIM,)),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(16),
    ], name="embedding")


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
        print(f"epoch {epoch + 1}/{self.epochs}: train loss {logs['loss']:.4f}, "
              f"val loss {logs['val_loss']:.4f}")


def train(epochs, seed):
    rng = np.random.default_rng(seed)
    # The 1/sqrt(dim) scale keeps distances between points of the order of the
    # margin; clusters as wide as their spread overlap a little.
    scale = 1.0 / np.sqrt(INPUT_DIM)
    centers = scale * rng.standard_normal((NUM_CLASSES, INPUT_DIM))
    x1, x2, y = make_pairs(rng, TRAIN_PAIRS, centers, scale)
    v1, v2, vy = make_pairs(rng, VAL_PAIRS, centers, scale)

    model = make_siamese(make_embedding())
    model.compile(optimizer="adam", loss=ContrastiveLoss(margin=MARGIN, distance="euclidean"),
                  jit_compile=False)
    model.fit([x1, x2], y, validation_data=([v1, v2], vy), epochs=epochs,
              batch_size=BATCH_SIZE, verbose=0, callbacks=[EpochLine(epochs)])

    pairs = model.predict([v1, v2], batch_size=1024, verbose=0)
    distances = np.linalg.norm(pairs[:, 0] - pairs[:, 1], axis=-1)
    accuracy = np.mean((distances < MARGIN / 2) == (vy == 1))
    print(f"validation pair accuracy (distance < {MARGIN / 2:g} => similar): {accuracy:.1%}")


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
    a, b = (tf.constant(rng.standard_normal((BENCH_PAIRS, BENCH_DIM)) / np.sqrt(BENCH_DIM),
                        tf.float32) for _ in range(2))
    steps = {"fused": make_loss_step(contrastive_loss_from_embeddings),
             "plain TF": make_loss_step(composite_loss)}
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
    print(f"step time: fused {fused:.2f} ms, plain TF {ref:.2f} ms -> {verdict} (loss from "
          f"embeddings, fwd+bwd, B={BENCH_PAIRS}, D={BENCH_DIM}, median of {BENCH_REPEATS})")


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m fused_contrastive.demo",
        description="Train a Siamese network with ContrastiveLoss(distance='euclidean') on "
                    "synthetic pairs, then time the fused loss from embeddings against plain "
                    "TensorFlow ops.")
    parser.add_argument("--epochs", type=int, default=5, help="training epochs (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed for data and weights")
    args = parser.parse_args(argv)

    keras.utils.set_random_seed(args.seed)
    train(args.epochs, args.seed)
    benchmark(args.seed)


if __name__ == "__main__":
    main()
