"""Regenerate the TensorFlow Addons reference fixture for ContrastiveLoss.

Writes, next to this script:
  tfa_contrastive_model.h5    a tiny tf.keras model compiled with
                              tfa.losses.ContrastiveLoss(margin=0.75) and saved
                              by TFA itself (legacy h5 format).
  tfa_contrastive_model.json  evaluation inputs/labels and TFA's own numbers
                              (evaluate loss, per-sample losses, predictions),
                              so the tests can compare against real TFA output
                              without TFA installed.

This script is NOT part of the package and is not run by the test suite. It
only runs in an isolated TF 2.15 + TFA 0.23 environment (TFA is end-of-life
and does not support newer TensorFlow / Keras 3). From the repository root:

    python3 -m venv /tmp/tfa-venv && \
    /tmp/tfa-venv/bin/pip install "tensorflow-cpu==2.15.1" \
        "tensorflow-addons==0.23.0" "numpy<2" && \
    /tmp/tfa-venv/bin/python tests/data/make_tfa_model.py

(Use "tensorflow==2.15.1" if tensorflow-cpu 2.15.1 is not available.)
"""

import json
from pathlib import Path

import h5py  # a TensorFlow dependency; used to read back what TFA serialized
import keras
import numpy as np
import tensorflow as tf
import tensorflow_addons as tfa

HERE = Path(__file__).resolve().parent
H5_PATH = HERE / "tfa_contrastive_model.h5"
JSON_PATH = HERE / "tfa_contrastive_model.json"

# Non-default, so a test can tell the margin was read from the file rather
# than falling back to the default of 1.0.
MARGIN = 0.75
BATCH = 16


def main():
    tf.keras.utils.set_random_seed(0)

    model = tf.keras.Sequential(
        [
            tf.keras.Input(shape=(4,)),
            tf.keras.layers.Dense(3, activation="relu", name="hidden"),
            # softplus keeps the output a non-negative "distance", which is
            # what contrastive loss expects as y_pred.
            tf.keras.layers.Dense(1, activation="softplus", name="distance"),
        ],
        name="tfa_contrastive_fixture",
    )
    model.compile(optimizer="sgd", loss=tfa.losses.ContrastiveLoss(margin=MARGIN))

    # One epoch of training so the saved weights (and SGD state) differ from
    # the initializer output; a loader that silently re-initializes would fail.
    train_rng = np.random.default_rng(0)
    x_train = train_rng.normal(size=(32, 4)).astype(np.float32)
    y_train = train_rng.integers(0, 2, size=(32, 1)).astype(np.float32)
    model.fit(x_train, y_train, batch_size=8, epochs=1, shuffle=False, verbose=0)

    # The .h5 suffix selects the legacy HDF5 format, which is the format
    # TFA-era users have on disk.
    model.save(str(H5_PATH))

    # Rounded to 3 decimals so the JSON text is short and the float32 values
    # the tests parse are exactly the ones TFA saw below.
    eval_rng = np.random.default_rng(7)
    x_list = np.round(eval_rng.normal(size=(BATCH, 4)), 3).tolist()
    y_list = [float(v) for v in eval_rng.integers(0, 2, size=BATCH)]
    x = np.asarray(x_list, dtype=np.float32)
    y = np.asarray(y_list, dtype=np.float32)

    # TFA's contrastive_loss does no rank matching, so [B] labels against
    # [B, 1] predictions can broadcast to [B, B] (TFA issue 1757). Passing
    # [B, 1] labels guarantees evaluate averages exactly B per-sample losses.
    eval_labels = y[:, None]
    tfa_evaluate_loss = model.evaluate(x, eval_labels, batch_size=BATCH, verbose=0)

    predictions = model(x, training=False)
    per_sample = tfa.losses.contrastive_loss(y, tf.squeeze(predictions, -1), margin=MARGIN)

    with h5py.File(H5_PATH, "r") as f:
        training_config = f.attrs["training_config"]
    if isinstance(training_config, bytes):
        training_config = training_config.decode("utf-8")
    saved_loss_config = json.loads(training_config)["loss"]

    # repr of a Python float round-trips exactly, so the float32 results are
    # recorded without loss.
    record = {
        "x": x_list,
        "y": y_list,
        "margin": MARGIN,
        "tfa_evaluate_loss": float(tfa_evaluate_loss),
        "evaluate_label_shape": list(eval_labels.shape),
        "tfa_per_sample_loss": [float(v) for v in per_sample.numpy()],
        "predictions": [[float(v) for v in row] for row in predictions.numpy()],
        "saved_loss_config": saved_loss_config,
        "versions": {
            "tensorflow": tf.__version__,
            "tensorflow_addons": tfa.__version__,
            "keras": keras.__version__,
        },
    }
    JSON_PATH.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {H5_PATH} ({H5_PATH.stat().st_size} bytes)")
    print(f"wrote {JSON_PATH} ({JSON_PATH.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
