"""The `stage=cascade` config of a family: which stage configs make the cascade, where each
stage's checkpoints live under ROOT, and how each stage samples.

    c.family, c.size, c.stage = 'cascade'
    c.order             the text-to-image chain, e.g. ('base64', 'sr256')
    c.stages.<name>     config_file ('configs/imagen.py'), config_arg ('stage=base64,size=tiny'),
                        dir (ROOT/<dir>), use_ema, and the sampler settings: sampler, num_steps,
                        eta, guidance_scale, threshold, percentile, aug_level, blur_sigma,
                        best_of, contrast_scale (the weight of the prompt pairs a caller
                        passes to a text-reading first stage: `generate(contrasts=)`),
                        text_encoder_path (a pretrained frozen encoder directory, or None)
    c.extra             stages loaded on demand (GLIDE inpainting, the noised CLIP)

A stage's sampler settings start from its own config's `sampler` section; override them on
the command line (`--config.stages.base64.num_steps=32`).
"""
from __future__ import annotations

import ml_collections

class MissingCheckpointError(FileNotFoundError):
  """A stage of the cascade has no checkpoint under ROOT."""


class UnknownStageError(ValueError):
  """A stage name that the cascade config does not define."""


SETTINGS = ('sampler', 'num_steps', 'eta', 'guidance_scale', 'threshold', 'percentile',
            'aug_level', 'blur_sigma', 'best_of', 'contrast_scale')


def stage_entry(family: str, stage: str, size: str, stage_config) -> ml_collections.ConfigDict:
  s = stage_config.sampler
  e = ml_collections.ConfigDict()
  e.config_file = f'configs/{family}.py'
  e.config_arg = f'stage={stage},size={size}'
  e.dir = stage
  e.use_ema = True
  e.sampler = s.name
  e.num_steps = int(s.num_steps)
  e.eta = float(s.get('eta', 0.0))
  e.guidance_scale = float(s.get('guidance_scale', 1.0))
  e.threshold = s.get('threshold', 'none') or 'none'
  e.percentile = float(s.get('percentile', 99.5))
  e.aug_level = float(s.get('aug_level', 0.0))
  e.blur_sigma = float(s.get('blur_sigma', 0.0))
  e.best_of = int(s.get('best_of', 1))
  e.contrast_scale = float(s.get('contrast_scale', 0.0))
  # A stage trained with --config.text_encoder.path=DIR samples with the same encoder.
  te = stage_config.get('text_encoder')
  e.text_encoder_path = te.get('path') if te is not None else None
  return e


def make(family: str, size: str, get_config, order, extra=(), *, seed: int = 0):
  """A cascade config from the family's `get_config` and the stage names."""
  c = ml_collections.ConfigDict()
  c.family = family
  c.stage = 'cascade'
  c.size = size
  c.seed = seed
  c.order = tuple(order)
  c.extra = tuple(extra)
  c.stages = ml_collections.ConfigDict()
  for name in tuple(order) + tuple(extra):
    c.stages[name] = stage_entry(family, name, size, get_config(f'stage={name},size={size}'))
  return c
