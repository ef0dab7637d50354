"""What may differ between runs that ``evalrun compare`` ranks together (only if allowed)."""

from __future__ import annotations

# The fields a comparison may be told to accept a difference in (``compare --allow``).
COMPARABILITY_FIELDS = ("datasets", "preprocessing", "primary_metrics", "seeds")
# What ``compare --group-by`` can group the entries by.
GROUP_BY = ("model",)
