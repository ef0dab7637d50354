"""Environment and policy errors (exit 4) that do not come from an SDK."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from runner.errors.root import EnvironmentMismatch, Problem


class UnmetDemand(Protocol):
    """What :class:`NamespacePolicyUnmet` needs of one finding (see backends.namespace_policy)."""

    @property
    def demand(self) -> str: ...

    @property
    def observed(self) -> str: ...

    @property
    def required(self) -> str: ...

    def as_json(self) -> Mapping[str, object]: ...


class NamespacePolicyUnmet(EnvironmentMismatch):
    """The target namespace does not enforce what the spec's sandbox policy demands (exit 4).

    Lists each demand not met with what was found and what is required.
    """

    kind = "namespace_policy_unmet"
    listing_key = "unmet"
    stated_fields = frozenset({"namespace"})

    def __init__(
        self, namespace: str, unmet: Sequence[UnmetDemand], *, hint: str | None = None
    ) -> None:
        names = ", ".join(f.demand for f in unmet)
        super().__init__(
            f"namespace {namespace!r} does not enforce what the sandbox policy demands: {names}",
            namespace=namespace,
            hint=hint,
        )
        self.listing = tuple(
            Problem(f"{f.demand}: found {f.observed}; required {f.required}", dict(f.as_json()))
            for f in unmet
        )
