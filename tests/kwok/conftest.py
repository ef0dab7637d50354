"""Fixtures for this tier: the session cluster and a fresh namespace per test."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cluster"))

from cluster_fixtures import cluster, k8s_client, namespace  # noqa: F401
