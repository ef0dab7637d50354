"""Image build cost: reproducible assembly vs a plain `docker build` + `docker push`.

On a copy of examples/digits, locked once first (so the base image is local and
the wheels are cached — "warm"), measures ``--repeat`` times, alternating:

* plain: the same staged context and rendered Dockerfile, ``docker build
  --no-cache`` (network off) then ``docker push`` of the tag — what evalrun did
  before it assembled images itself;
* reproducible: ``build_image(nocache=True)`` without the rootfs measurement —
  the same ``docker build --no-cache``, then ``docker save``, layer
  normalization, config/manifest assembly and the HTTP push;
* noop_lock: ``evalrun lock`` when nothing changed (the image is reused).

Each round first changes one file in the build context (as an edit would), so
both sides build and push a new application layer; the reproducible side's other
build layers come out byte-identical and are not uploaded again (that dedup is
part of what is measured), while ``docker build --no-cache`` makes every layer
new for the plain side.

Both build sides skip the rootfs measurement (both paths run the same one).
Prints one JSON line with medians in seconds and ``ratio`` = reproducible / plain.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runner.build.context import build_inputs_for, stage_context  # noqa: E402
from runner.build.image import _docker_build, build_image  # noqa: E402
from runner.build.lock import lock_spec  # noqa: E402
from runner.adapters.docker_engine import connect  # noqa: E402
from runner._internal.settings import Settings  # noqa: E402
from runner.model.spec import load_spec  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _plain(client: Any, inputs: Any, settings: Settings, tag: str) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-plain-") as tmp:
        stage_context(inputs, Path(tmp), settings)
        _docker_build(client, Path(tmp), tag, True, lambda _: None)
    repo, _, name = tag.rpartition(":")
    for chunk in client.api.push(repo, tag=name, stream=True, decode=True):
        if "error" in chunk:
            raise RuntimeError(chunk["error"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    settings = Settings()
    client = connect()
    with tempfile.TemporaryDirectory(prefix="bench-build-") as tmp:
        dest = Path(tmp) / "digits"
        shutil.copytree(
            ROOT / "examples" / "digits",
            dest,
            ignore=shutil.ignore_patterns("eval.lock.json", "__pycache__"),
        )
        text = (dest / "eval.yaml").read_text()
        template = ROOT / "images" / "python-eval.Dockerfile.j2"
        (dest / "eval.yaml").write_text(
            text.replace("../../images/python-eval.Dockerfile.j2", str(template))
        )
        spec_path = dest / "eval.yaml"
        spec = load_spec(spec_path)
        lock, _ = lock_spec(spec, spec_path, settings)  # warm: base local, wheels cached
        assert lock.base is not None
        inputs = build_inputs_for(spec, dest, lock.base, list(lock.wheels))
        repo = f"{spec.image.repository}/{spec.metadata.name}"

        plain: list[float] = []
        repro: list[float] = []
        digests: set[str] = set()
        for i in range(args.repeat):
            (dest / "app" / "bench-round.txt").write_text(f"round {i} {time.time_ns()}\n")
            inputs = build_inputs_for(spec, dest, lock.base, list(lock.wheels))
            t0 = time.perf_counter()
            _plain(client, inputs, settings, f"{repo}:bench-plain")
            plain.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            built = build_image(
                inputs, settings, client=client, nocache=True, tag_suffix="-bench", measure=False
            )
            repro.append(time.perf_counter() - t0)
            digests.add(built.ref)
            print(
                f"round {i + 1}: plain {plain[-1]:.2f} s, reproducible {repro[-1]:.2f} s",
                file=sys.stderr,
            )
        (dest / "app" / "bench-round.txt").unlink()

        lock, _ = lock_spec(spec, spec_path, settings)  # back to the committed context
        noop: list[float] = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            _, again = lock_spec(spec, spec_path, settings)
            noop.append(time.perf_counter() - t0)
            assert again is not None and again.skipped

    result = {
        "bench": "build",
        "plain_build_push_s": round(statistics.median(plain), 3),
        "reproducible_build_s": round(statistics.median(repro), 3),
        "ratio": round(statistics.median(repro) / statistics.median(plain), 3),
        "reproducible_digests_distinct": len(digests),  # one per round: the context changed
        "noop_lock_s": round(statistics.median(noop), 3),
        "repeat": args.repeat,
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
