"""Run by tests/jax/test_keras_on_jax.py under one Keras backend
(KERAS_BACKEND): trains small models with the package's Keras 3 losses from
fixed weights, calls the losses with every reduction and sample weights, runs PairAccuracy
in training and a PairDistance layer at inference,
saves each trained model to DIR/<backend>-<kind>.keras and evaluates the
other backend's saved models where they exist. Prints one JSON line."""

import json
import sys

import numpy as np

import keras
import fused_contrastive as fc

KINDS = {
    "distances": lambda: fc.ContrastiveLoss(margin=1.5),
    "pairs": lambda: fc.ContrastiveLoss(distance="cosine", reduction="sum", margin=0.7),
    "in_batch": lambda: fc.InBatchContrastiveLoss(
        miner="batch_hard", reduction="mean_with_sample_weight", pair_weighting="balanced"
    ),
}
REDUCTIONS = ["sum", "sum_over_batch_size", "mean", "mean_with_sample_weight", "none", None]


def model(kind):
    inputs = keras.Input((2, 8) if kind == "pairs" else (8,))
    if kind == "distances":
        layer = keras.layers.Dense(1, activation="softplus")
    else:
        layer = keras.layers.Dense(4)
    built = keras.Model(inputs, layer(inputs))
    rng = np.random.default_rng(0)
    built.set_weights(
        [0.3 * rng.normal(size=w.shape).astype("float32") for w in built.get_weights()]
    )
    return built


def data(kind):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 2, 8) if kind == "pairs" else (64, 8)).astype("float32")
    y = rng.integers(0, 5 if kind == "in_batch" else 2, 64)
    return x, y, rng.random(64).astype("float32")


def pair_distances(trained, x, directory, backend, other, out):
    """The trained pair model's outputs through a PairDistance layer: its
    predictions, saved, and those of the other backend's saved model."""
    inference = keras.Model(trained.input, fc.PairDistance("cosine")(trained.output))
    out["pair_distance"] = as_list(inference.predict(x, verbose=0))
    inference.save(f"{directory}/{backend}-pair-distance.keras")
    try:
        loaded = keras.saving.load_model(f"{directory}/{other}-pair-distance.keras")
    except (FileNotFoundError, ValueError):
        return
    out["loaded_pair_distance"] = as_list(loaded.predict(x, verbose=0))


def as_list(value):
    return np.asarray(value, np.float64).reshape(-1).tolist()


def main(directory):
    backend = keras.backend.backend()
    other = "jax" if backend == "tensorflow" else "tensorflow"
    out = {"backend": backend, "history": {}, "reduced": {}, "loaded": {}}
    for kind, loss in KINDS.items():
        x, y, w = data(kind)
        trained = model(kind)
        metrics = [fc.PairAccuracy(threshold=0.6, distance="cosine")] if kind == "pairs" else []
        trained.compile(optimizer=keras.optimizers.SGD(0.05), loss=loss(), metrics=metrics)
        history = trained.fit(x, y, sample_weight=w, epochs=3, batch_size=16, shuffle=False)
        out["history"][kind] = history.history["loss"]
        if kind == "pairs":
            out["pair_accuracy"] = history.history["pair_accuracy"]
            pair_distances(trained, x, directory, backend, other, out)
        trained.save(f"{directory}/{backend}-{kind}.keras")
        out[f"evaluate-{kind}"] = trained.evaluate(x, y, sample_weight=w, verbose=0)
        try:
            loaded = keras.saving.load_model(f"{directory}/{other}-{kind}.keras")
        except (FileNotFoundError, ValueError):
            pass
        else:
            out["loaded"][kind] = [
                loaded.loss.get_config(),
                loaded.evaluate(x, y, sample_weight=w, verbose=0),
            ]
        y_pred = model(kind)(x)
        for reduction in REDUCTIONS:
            for weights in (None, w, w[:, None], 2.0):
                name = f"{kind}-{reduction}-{None if weights is None else np.shape(weights)}"
                value = type(loss())(**{**loss().get_config(), "reduction": reduction})(
                    y, y_pred, sample_weight=weights
                )
                out["reduced"][name] = as_list(value)
    # Integer ids stay exact: 2**24 and 2**24 + 1 are two classes, not one
    # (float32 cannot tell them apart).
    ids = np.array([2**24, 2**24 + 1, 2**24 + 1, 7])
    e = np.array([[0.0, 0.0], [0.0, 0.5], [0.0, 0.6], [3.0, 3.0]], "float32")
    out["large_ids"] = as_list(fc.InBatchContrastiveLoss(reduction="none")(ids, e))
    try:
        fc.InBatchContrastiveLoss(gather_across_replicas=True)(ids, e)
        out["gather"] = "no error"
    except NotImplementedError as error:
        out["gather"] = str(error)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
