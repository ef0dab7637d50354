"""The one name for JSON whose shape is, by nature, not ours to fix.

Standard library only (the agent imports it inside the image).
"""

from __future__ import annotations

from typing import Any, TypeAlias

# A JSON object whose keys and values are open-ended: a spec's ``params`` (the user's
# own settings for the evaluation, passed through untouched to ``EVALRUN_PARAMS``), a
# per-sample row the evaluation wrote, the JSON Schema pydantic generates, a signed
# predicate kept as the signed JSON. Nothing reads fixed fields of these beyond what is
# checked where it is read, so no TypedDict could say more than "some JSON object";
# ``Any`` (not ``object``) because the values come straight from ``json`` / YAML and are
# passed on, not narrowed, by the code that holds them.
JSONObject: TypeAlias = dict[str, Any]
