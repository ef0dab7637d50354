"""Cross-check what the agent saw (NVML) against what the node claims (its labels).

On Kubernetes a GPU node advertises ``nvidia.com/gpu.product`` and driver labels
(GPU feature discovery). If the container saw a different GPU or driver than the
node it was scheduled on claims, one of them is lying or stale: the run is not
trusted (environment mismatch), and the bundle says which label disagreed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

PRODUCT_LABEL = "nvidia.com/gpu.product"
DRIVER_MAJOR_LABEL = "nvidia.com/cuda.driver.major"
DRIVER_MINOR_LABEL = "nvidia.com/cuda.driver.minor"
GPU_COUNT_LABEL = "nvidia.com/gpu.count"


def _label_form(name: str) -> str:
    """GPU feature discovery's label form of an NVML name: spaces → dashes."""
    return re.sub(r"\s+", "-", name.strip())


def crosscheck_node_labels(labels: Mapping[str, str], gpu: Mapping[str, Any]) -> list[str]:
    """Disagreements between node labels and the in-container GPU capture (empty: none).

    Labels that are absent are not checked; a node that claims a GPU the container
    cannot see is a disagreement.
    """
    claims = {k: v for k, v in labels.items() if k.startswith("nvidia.com/")}
    if not claims:
        return []
    if not gpu.get("visible"):
        if PRODUCT_LABEL in claims:
            return [
                f"node label {PRODUCT_LABEL}={claims[PRODUCT_LABEL]} but the container "
                f"sees no GPU ({gpu.get('reason')})"
            ]
        return []
    problems: list[str] = []
    names = [str(g.get("name")) for g in gpu.get("gpus") or [] if isinstance(g, Mapping)]
    if PRODUCT_LABEL in claims:
        want = claims[PRODUCT_LABEL]
        wrong = [n for n in names if _label_form(n) != want]
        if wrong:
            problems.append(f"node label {PRODUCT_LABEL}={want}, container sees {wrong}")
    driver = str(gpu.get("driver_version") or "")
    parts = driver.split(".")
    if DRIVER_MAJOR_LABEL in claims and parts[0] != claims[DRIVER_MAJOR_LABEL]:
        problems.append(
            f"node label {DRIVER_MAJOR_LABEL}={claims[DRIVER_MAJOR_LABEL]}, container sees "
            f"driver {driver}"
        )
    if DRIVER_MINOR_LABEL in claims and (len(parts) < 2 or parts[1] != claims[DRIVER_MINOR_LABEL]):
        problems.append(
            f"node label {DRIVER_MINOR_LABEL}={claims[DRIVER_MINOR_LABEL]}, container sees "
            f"driver {driver}"
        )
    return problems
