"""A small seeded Keras model for the keras family's tests, saved as a `.keras` file and
exported as a SavedModel, and input rows for it.

Two named inputs of two types (`features`: 16 floats, `category`: an int64 id into a
10-row embedding) and two named outputs (`score`, `vector`): the job must match columns to
inputs by name and write every output. A category id of 10 or more makes the embedding's
gather raise, in the forward pass: a bad row for the quarantine test."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CATEGORIES = 10


def build(folder: Path) -> tuple[Path, Path]:
    """The model saved as `folder/model.keras` and exported to `folder/saved_model/`."""
    import keras

    keras.utils.set_random_seed(0)
    features = keras.Input((16,), name="features")
    category = keras.Input((), dtype="int64", name="category")
    embedded = keras.layers.Embedding(CATEGORIES, 4)(category)
    hidden = keras.layers.Dense(32, activation="relu")(keras.layers.Concatenate()([features, embedded]))
    outputs = {"score": keras.layers.Dense(1, activation="sigmoid")(hidden), "vector": keras.layers.Dense(8)(hidden)}
    model = keras.Model({"features": features, "category": category}, outputs)
    model.save(folder / "model.keras")
    model.export(str(folder / "saved_model"), verbose=False)
    return folder / "model.keras", folder / "saved_model"


def rows(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"features": rng.standard_normal((n, 16)).astype(np.float32),
            "category": rng.integers(0, CATEGORIES, n).astype(np.int64)}


def write_parquet(path: Path, data: dict[str, np.ndarray]) -> Path:
    """The rows as Parquet, with an extra text column that no input takes."""
    n = len(data["category"])
    pq.write_table(pa.table({"id": [f"row-{i}" for i in range(n)], "features": list(data["features"]),
                             "category": data["category"]}), path)
    return path


def predict(model_file: Path, data: dict[str, np.ndarray]) -> dict[str, Any]:
    """`model.predict()` in this process: the reference."""
    import keras

    model = keras.saving.load_model(model_file, compile=False)
    return model.predict(data, batch_size=32, verbose=0)  # type: ignore[no-any-return]
