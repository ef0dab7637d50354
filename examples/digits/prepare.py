"""Export the digits test split and train the example model (run on the host, once).

The data come from scikit-learn's bundled copy of the UCI ML hand-written digits
data set (BSD-3-Clause via scikit-learn; original: UCI, CC BY 4.0). Everything is
seeded, so re-running this script reproduces the committed files byte for byte.

    python examples/digits/prepare.py
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

SEED = 20240101
HERE = Path(__file__).resolve().parent


def _write_jsonl(path: Path, features: np.ndarray, labels: np.ndarray, offset: int) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for i, (x, y) in enumerate(zip(features, labels, strict=True)):
            row = {"id": f"digit-{offset + i:04d}", "pixels": [int(v) for v in x], "label": int(y)}
            fh.write(json.dumps(row, separators=(",", ":")) + "\n")


def main() -> None:
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=0.25, random_state=SEED, stratify=digits.target
    )
    model = LogisticRegression(max_iter=200, C=0.05, random_state=SEED)
    model.fit(x_train / 16.0, y_train)
    weights = {
        "kind": "multinomial-logistic-regression",
        "input_scale": 16.0,
        "classes": [int(c) for c in model.classes_],
        # Rounded so the file is stable across BLAS builds.
        "coef": [[round(float(v), 8) for v in row] for row in model.coef_],
        "intercept": [round(float(v), 8) for v in model.intercept_],
        "trained_with": {"seed": SEED, "n_train": len(y_train), "C": 0.05},
    }
    (HERE / "model").mkdir(exist_ok=True)
    (HERE / "data").mkdir(exist_ok=True)
    (HERE / "model" / "weights.json").write_text(json.dumps(weights, indent=1) + "\n")
    _write_jsonl(HERE / "data" / "digits_test.jsonl", x_test, y_test, 0)
    for rel in ("model/weights.json", "data/digits_test.jsonl"):
        print(rel, hashlib.sha256((HERE / rel).read_bytes()).hexdigest())


if __name__ == "__main__":
    main()
