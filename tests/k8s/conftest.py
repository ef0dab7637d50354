"""Fixtures for this tier: the session cluster, a fresh namespace per test, an S3 server."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cluster"))

from cluster_fixtures import cluster, k8s_client, namespace  # noqa: F401
from s3 import s3_server  # noqa: F401
