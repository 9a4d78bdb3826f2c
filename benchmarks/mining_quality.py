"""Retrieval quality after training with each pair weighting and miner
(issue 21): the same small model trained with InBatchContrastiveLoss under
"uniform", "active", miner="batch_hard" and miner="multi_similarity", then
Recall@1 and MAP@R (fused_contrastive.retrieval_metrics) of a held-out split
against itself.

The data are synthetic clusters that raw inputs retrieve poorly: CLASSES
class means in SIGNAL dimensions (normal, times MEAN_SCALE), samples at unit
noise around them, plus NOISE dimensions of pure noise at NOISE_SCALE. The
model ends in a unit normalisation, so that margin 1 suits the distances from
the start. Deterministic (seeded): each configuration trains from the same
initial weights, for each seed.

    python benchmarks/mining_quality.py [--epochs 20] [--seeds 3]

prints a markdown table (mean and spread over the seeds) and the raw inputs'
metrics.
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import fused_contrastive as fc  # noqa: E402

CLASSES, SIGNAL, NOISE, NOISE_SCALE, MEAN_SCALE = 48, 12, 52, 2.0, 2.5
TRAIN_PER_CLASS, TEST_PER_CLASS = 48, 24
CONFIGS = {
    "uniform": {},
    "active": dict(pair_weighting="active"),
    "batch_hard": dict(miner="batch_hard"),
    "multi_similarity": dict(miner="multi_similarity", miner_epsilon=0.1),
}


def data(seed):
    """(train x, train labels, test x, test labels): held-out samples of the
    same classes."""
    rng = np.random.default_rng(seed)
    means = MEAN_SCALE * rng.normal(size=(CLASSES, SIGNAL))

    def split(per_class):
        labels = np.repeat(np.arange(CLASSES), per_class)
        signal = means[labels] + rng.normal(size=(len(labels), SIGNAL))
        noise = NOISE_SCALE * rng.normal(size=(len(labels), NOISE))
        return np.concatenate([signal, noise], 1).astype("float32"), labels

    return (*split(TRAIN_PER_CLASS), *split(TEST_PER_CLASS))


def train(config, x, labels, seed, epochs):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((x.shape[1],)),
            keras.layers.Dense(128, "relu"),
            keras.layers.Dense(32),
            keras.layers.UnitNormalization(),
        ]
    )
    model.compile(keras.optimizers.Adam(1e-3), fc.InBatchContrastiveLoss(margin=1.0, **config))
    model.fit(x, labels, batch_size=256, epochs=epochs, shuffle=True, verbose=0)
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    results = {name: [] for name in CONFIGS}
    raw = []
    for seed in range(args.seeds):
        x, labels, x_test, labels_test = data(seed)
        raw.append(fc.retrieval_metrics(x_test, labels_test, k=(1,)))
        for name, config in CONFIGS.items():
            model = train(config, x, labels, seed, args.epochs)
            embeddings = model.predict(x_test, verbose=0)
            results[name].append(fc.retrieval_metrics(embeddings, labels_test, k=(1,)))
    print(
        f"{CLASSES} classes, {TRAIN_PER_CLASS}/{TEST_PER_CLASS} train/test samples per class, "
        f"{SIGNAL} signal + {NOISE} noise dimensions; Dense 128 relu -> 32 -> unit norm, "
        f"Adam 1e-3, batch 256, {args.epochs} epochs, {args.seeds} seeds "
        "(mean ± standard deviation)\n"
    )
    print("| training | Recall@1 | MAP@R |")
    print("|---|---|---|")
    for name, metrics in [("raw inputs (no training)", raw), *results.items()]:
        cells = []
        for key in ("recall@1", "map@r"):
            values = np.array([float(m[key]) for m in metrics])
            cells.append(f"{values.mean():.3f} ± {values.std():.3f}")
        print(f"| {name} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
