"""What ``evalrun compare`` can hold equal and group by: names only, so the CLI's parser
can offer them as choices without importing the comparison engine (a slow import)."""

from __future__ import annotations

COMPARABILITY_FIELDS = ("datasets", "preprocessing", "primary_metrics", "seeds")
GROUP_BY = ("model",)
