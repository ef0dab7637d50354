"""Digits evaluation: runs inside the sandbox, no network.

Contract with the evalrun agent (see docs/agent.md): inputs arrive as paths in
EVALRUN_MODEL and EVALRUN_DATA_<NAME>; per-sample outputs go to EVALRUN_OUTPUT
as JSON lines with ``id``, ``label`` and ``prediction``. Metrics are computed by
evalrun from that file, never here.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np


def main() -> int:
    params = json.loads(os.environ.get("EVALRUN_PARAMS", "{}"))
    if params.get("crash"):
        print("evaluate.py: crash requested by params.crash", file=sys.stderr)
        return 17
    if params.get("sleep_s"):
        time.sleep(float(params["sleep_s"]))
    if params.get("hog_mib"):  # fault tests: touch this much memory, 1 MiB at a time
        hog = [b"\x01" * (1 << 20) for _ in range(int(params["hog_mib"]))]
        print(f"evaluate.py: holding {len(hog)} MiB", file=sys.stderr)
    with open(os.environ["EVALRUN_MODEL"], encoding="utf-8") as fh:
        model = json.load(fh)
    coef = np.asarray(model["coef"], dtype=np.float64)
    intercept = np.asarray(model["intercept"], dtype=np.float64)
    classes = model["classes"]

    ids, labels, pixels = [], [], []
    with open(os.environ["EVALRUN_DATA_DIGITS_TEST"], encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            ids.append(row["id"])
            labels.append(row["label"])
            pixels.append(row["pixels"])
    x = np.asarray(pixels, dtype=np.float64) / float(model["input_scale"])
    perturbation = json.loads(os.environ.get("EVALRUN_PERTURBATION", "null"))
    if perturbation and perturbation["kind"] == "noise":
        noise_rng = np.random.default_rng(int(perturbation["seed"]))
        x = np.clip(x + noise_rng.normal(0.0, float(perturbation["std"]), x.shape), 0.0, 1.0)
    elif perturbation and perturbation["kind"] == "drop_feature":
        # Features are named pixel_0 … pixel_63; a dropped pixel reads as blank.
        x[:, int(str(perturbation["feature"]).removeprefix("pixel_"))] = 0.0
    elif perturbation:
        print(f"evaluate.py: unsupported perturbation {perturbation['kind']}", file=sys.stderr)
        return 2
    dropout = float(params.get("pixel_dropout", 0.0))
    if dropout:
        # Seeded input perturbation: different seeds give different (reproducible) scores.
        rng = np.random.default_rng(int(os.environ.get("EVALRUN_SEED", "0")))
        x = x * (rng.random(x.shape) >= dropout)
    scores = x @ coef.T + intercept
    predicted = scores.argmax(axis=1)

    with open(os.environ["EVALRUN_OUTPUT"], "w", encoding="utf-8") as out:
        for sample_id, label, pred, row in zip(ids, labels, predicted, scores, strict=True):
            record = {
                "id": sample_id,
                "label": int(label),
                "prediction": int(classes[int(pred)]),
                "score": round(float(row.max()), 6),
            }
            out.write(json.dumps(record, separators=(",", ":")) + "\n")
    print(f"evaluate.py: scored {len(ids)} samples", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
