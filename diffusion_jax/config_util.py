"""Reading configs: optional fields, flattened views, and a config file loaded by path."""
from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Any

from diffusion_jax import errors


def get(cfg, key: str, default: Any = None) -> Any:
  """cfg[key], or `default` when the field is absent or None."""
  try:
    value = cfg[key]
  except (KeyError, AttributeError, TypeError):
    return default
  return default if value is None else value


def flatten(cfg, prefix: str = '') -> dict[str, Any]:
  """{'a.b.c': leaf} of a ConfigDict or nested dict."""
  out = {}
  for k, v in (cfg.items() if hasattr(cfg, 'items') else ()):
    if hasattr(v, 'items'):
      out.update(flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def load_config(config_file: str, arg: str | None = None):
  """`get_config(arg)` of a config file, as `--config=FILE:ARG` reads it ('configs/imagen.py'
  with arg 'stage=base64,size=tiny', or the spec 'configs/imagen.py:stage=base64,size=tiny'
  alone): the file itself when it exists, else the module of that dotted name (installed);
  errors.InputError when there is neither."""
  if arg is None and ':' in config_file:
    config_file, arg = config_file.split(':', 1)
  if os.path.isfile(config_file):
    name = os.path.splitext(os.path.normpath(config_file))[0].replace(os.sep, '.').lstrip('.')
    spec = importlib.util.spec_from_file_location(name, config_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  else:
    dotted = os.path.splitext(config_file)[0].replace('/', '.')
    try:
      module = importlib.import_module(dotted)
    except ModuleNotFoundError as e:  # the config itself missing, not a module it imports
      if e.name is None or not (dotted + '.').startswith(e.name + '.'):
        raise
      raise errors.InputError(f'config {config_file!r}: no such file or module (e.g. '
                              'configs/imagen.py, configs/glide.py, configs/unclip.py)') from None
  return module.get_config(arg) if arg is not None else module.get_config()
