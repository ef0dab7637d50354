"""Sharded digits evaluation: the model is a directory of safetensors shards, the test
split a directory of JSON-lines parts. Runs inside the sandbox, no network.

EVALRUN_MODEL is the model directory and EVALRUN_DATA_DIGITS_TEST the dataset
directory (or a single JSON-lines file); evalrun has checked every file of both
against the lock before this starts. Per-sample outputs go to EVALRUN_OUTPUT. Same weights and samples as the
digits example, so the metrics are the same.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import numpy as np


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The float64 tensors of one shard."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    body = memoryview(raw)[8 + length :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] != "F64":
            raise ValueError(f"{path.name}: {name} is {info['dtype']}, expected F64")
        start, end = info["data_offsets"]
        out[name] = np.frombuffer(body[start:end], dtype="<f8").reshape(info["shape"])
    return out


def main() -> int:
    model_dir = Path(os.environ["EVALRUN_MODEL"])
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    tensors: dict[str, np.ndarray] = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors |= read_safetensors(model_dir / shard)
    meta = index["metadata"]
    coef = np.vstack([tensors[f"coef.{i}"] for i in range(int(meta["rows"]))])
    intercept = tensors["intercept"][0]

    ids, labels, pixels = [], [], []
    data = Path(os.environ["EVALRUN_DATA_DIGITS_TEST"])  # a directory of parts, or one file
    for part in sorted(data.glob("*.jsonl")) if data.is_dir() else [data]:
        with part.open(encoding="utf-8") as fh:
            for line in fh:
                row = json.loads(line)
                ids.append(row["id"])
                labels.append(row["label"])
                pixels.append(row["pixels"])
    x = np.asarray(pixels, dtype=np.float64) / float(meta["input_scale"])
    scores = x @ coef.T + intercept
    predicted = scores.argmax(axis=1)
    with open(os.environ["EVALRUN_OUTPUT"], "w", encoding="utf-8") as out:
        for sample_id, label, pred, row in zip(ids, labels, predicted, scores, strict=True):
            record = {
                "id": sample_id,
                "label": int(label),
                "prediction": int(meta["classes"][int(pred)]),
                "score": round(float(row.max()), 6),
            }
            out.write(json.dumps(record, separators=(",", ":")) + "\n")
    shards = len(set(index["weight_map"].values()))
    print(f"evaluate.py: {shards} shards, scored {len(ids)} samples", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
