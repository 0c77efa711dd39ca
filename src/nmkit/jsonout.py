"""JSON that is always valid: NaN and +-Infinity (which ``json.dumps`` writes as bare, invalid tokens)
become ``null``. Every JSON file and ``--json`` output of nmkit goes through :func:`dumps`."""

from __future__ import annotations

import json
import math


def finite_or_none(obj):
    """``obj`` with every non-finite float replaced by None (dicts, lists and tuples walked)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def dumps(obj, **kwargs) -> str:
    """``json.dumps`` with non-finite numbers as null (standard JSON, readable by any parser)."""
    return json.dumps(finite_or_none(obj), allow_nan=False, **kwargs)
