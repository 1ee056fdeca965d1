"""Reading optional config fields uniformly from ConfigDicts, dicts or None."""
from __future__ import annotations

from typing import Any


def get(cfg, key: str, default: Any = None) -> Any:
  """cfg[key], or `default` when the field is absent or None."""
  try:
    value = cfg[key]
  except (KeyError, AttributeError, TypeError):
    return default
  return default if value is None else value
