"""Write the sharded example's inputs from examples/digits (run on the host; stdlib only).

The model becomes a directory the way large checkpoints are shipped: an index
(``model.safetensors.index.json``, as Hugging Face writes it) and three
``safetensors`` shards holding the same float64 weights as ``digits/model/weights.json``.
The test split becomes a dataset directory of three JSON-lines parts. The output is a
pure function of the digits example, so re-running this reproduces the committed
files byte for byte (and so their digests in eval.yaml):

    python examples/sharded/make_inputs.py
    evalrun digest examples/sharded/model examples/sharded/data
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

HERE = Path(__file__).resolve().parent
DIGITS = HERE.parent / "digits"
SHARDS = 3
PARTS = 3


def safetensors(tensors: dict[str, list[list[float]]]) -> bytes:
    """A safetensors file of float64 matrices (header: 8-byte length + JSON, then data)."""
    header: dict[str, object] = {"__metadata__": {"format": "evalrun-example"}}
    body = b""
    for name, rows in tensors.items():
        flat = [v for row in rows for v in row]
        data = struct.pack(f"<{len(flat)}d", *flat)
        header[name] = {
            "dtype": "F64",
            "shape": [len(rows), len(rows[0])],
            "data_offsets": [len(body), len(body) + len(data)],
        }
        body += data
    encoded = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
    return struct.pack("<Q", len(encoded)) + encoded + body


def main() -> None:
    weights = json.loads((DIGITS / "model" / "weights.json").read_text())
    coef, intercept = weights["coef"], weights["intercept"]
    per = -(-len(coef) // (SHARDS - 1))
    model = HERE / "model"
    model.mkdir(exist_ok=True)
    weight_map = {}
    tensors: list[dict[str, list[list[float]]]] = [
        {f"coef.{i}": [coef[i]] for i in range(s * per, min(len(coef), (s + 1) * per))}
        for s in range(SHARDS - 1)
    ]
    tensors.append({"intercept": [intercept]})
    for s, shard in enumerate(tensors):
        name = f"model-{s + 1:05d}-of-{SHARDS:05d}.safetensors"
        (model / name).write_bytes(safetensors(shard))
        weight_map.update({key: name for key in shard})
    index = {
        "metadata": {
            "classes": weights["classes"],
            "input_scale": weights["input_scale"],
            "rows": len(coef),
        },
        "weight_map": dict(sorted(weight_map.items())),
    }
    (model / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")
    lines = (DIGITS / "data" / "digits_test.jsonl").read_text().splitlines(keepends=True)
    data = HERE / "data"
    data.mkdir(exist_ok=True)
    size = -(-len(lines) // PARTS)
    for p in range(PARTS):
        part = "".join(lines[p * size : (p + 1) * size])
        (data / f"part-{p:05d}.jsonl").write_text(part, newline="\n")


if __name__ == "__main__":
    main()
