"""Sampling pipelines of the three cascades, and their editing applications.

    pipe = pipelines.load(config, workdir)     # config: configs/<family>.py:stage=cascade,...
    images_NHW3 = pipe.generate(prompts, jax.random.PRNGKey(0))   # uint8

Every stage is found by name under `workdir` (ROOT/<stage>/checkpoints), restored with its
EMA parameters by default, and sampled with its cascade-config settings; see
`pipelines.common` for what is shared and `imagen`, `glide`, `unclip` for each family.
"""
from __future__ import annotations

from diffusion_jax.pipelines.common import (MissingCheckpointError, UnknownStageError, slerp,
                                            to_uint8)


def load(config, workdir: str):
  """The pipeline of a `stage=cascade` config rooted at `workdir`."""
  if config.get('stage') != 'cascade':
    raise ValueError(f'pipelines.load needs a stage=cascade config, got stage='
                     f'{config.get("stage")!r} (e.g. configs/imagen.py:stage=cascade,size=tiny)')
  family = config.family
  if family == 'imagen':
    from diffusion_jax.pipelines.imagen import ImagenPipeline as cls
  elif family == 'glide':
    from diffusion_jax.pipelines.glide import GlidePipeline as cls
  elif family == 'unclip':
    from diffusion_jax.pipelines.unclip import UnCLIPPipeline as cls
  else:
    raise ValueError(f'unknown family {family!r}; choose imagen, glide or unclip')
  return cls(config, workdir)


__all__ = ['load', 'MissingCheckpointError', 'UnknownStageError', 'slerp', 'to_uint8']
