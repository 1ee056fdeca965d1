"""Input data: sources (datasets.py), the grain pipeline (pipeline.py), datasets and caption
rewrites by name (registry.py); here, the input config's fields and their one reader.

`INPUT_DEFAULTS` are the defaults of every optional field of a stage config's `input`
section (the stage configs list them all, `configs.common.finalize`); `batch_size` and
`image_size` have none. A project's datasets read their own extra fields with `field`.
"""
from __future__ import annotations

from typing import Any, Mapping

from diffusion_jax import io_util

INPUT_DEFAULTS = {
    'dataset': None,                # a registered dataset (data.registry)
    'modules': (),                  # modules imported first: they register datasets, rewrites
    'data_dir': None,               # TFDS data dir (None: $TFDS_DATA_DIR)
    'split': 'train',
    'folder_name': 'default',       # the prepared folder (tools/prepare_folder --name)
    'low_res_size': None,           # an SR stage's input side (None: no low_res)
    'low_res_degradation': 'none',  # 'none' | 'blur' (unCLIP 64->256) | 'bsr' (256->1024)
    'text_max_len': 64,
    'shuffle': True,
    'num_epochs': None,             # None: repeat forever
    'random_crop': False,
    'train_crop_size': None,        # SR stages: train on crops of this side
    'caption_choice': 'random',     # 'random' | 'first'
    'caption_rewrite': None,        # a registered rewrite, in training and sampling alike
    'max_image_pixels': io_util.MAX_IMAGE_PIXELS,  # larger images: skipped, counted, unread
    'text_cache': '',               # a tools/cache_text directory: cached encoder outputs
    'num_threads': 4,
    'prefetch_buffer_size': 256,
}
_REQUIRED = object()


def field(input_cfg, name: str, default: Any = _REQUIRED) -> Any:
  """`input_cfg.<name>` (a ConfigDict, a dict or any object with the attribute), where it is
  absent or None `default`, else `INPUT_DEFAULTS[name]`; a KeyError when there is none."""
  if isinstance(input_cfg, Mapping):
    value = input_cfg.get(name)
  else:
    value = getattr(input_cfg, name, None)
  if value is not None:
    return value
  if default is not _REQUIRED:
    return default
  if name in INPUT_DEFAULTS:
    return INPUT_DEFAULTS[name]
  raise KeyError(f'input config has no field {name!r} (and it has no default)')
