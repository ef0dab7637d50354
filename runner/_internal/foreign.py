"""Names for other systems' objects as their clients take and return them.

Each is one alias for one kind, on purpose not narrowed: the shapes are another project's
API (open-ended, versioned by them, full of fields evalrun never reads), and they pass
between evalrun and that client unchanged. Where evalrun reads specific fields of one
again and again, it parses them into a type of its own first (a Kueue Workload:
:class:`runner.adapters.kueue.Workload`; a Job's or a pod's status is read from the
client's typed objects). Kept below every layer that touches them, so the pure builders
(``runner.backends.manifests``, ``docker_policy``), which may not import the clients or
the adapters, can name them too.
"""

from __future__ import annotations

from typing import Any, TypeAlias

# A Kubernetes object, patch or list as JSON (a manifest evalrun builds for the API, a
# custom object the CustomObjectsApi returns, an object a watch keeps): the Kubernetes API
# schema of its kind, which is not ours to restate.
KubeObject: TypeAlias = dict[str, Any]

# A Docker Engine API object as docker-py returns it (``container.attrs``: the engine's
# ContainerInspect JSON) or a Docker CLI file (``~/.docker/config.json``): the engine's and
# the CLI's schema.
DockerObject: TypeAlias = dict[str, Any]

# An object of the kubernetes client's generated models (V1Job, V1Pod, V1Node, ...), as
# its API calls and watches return them. mypy reads the client as untyped (pyproject:
# ``follow_imports = "skip"``, its generated annotations are partial), so this is Any; the
# name says which values are such objects.
KubeModel: TypeAlias = Any
