"""Sampling pipelines of the three cascades, and their editing applications.

    pipe = pipelines.load(config, workdir)     # config: configs/<family>.py:stage=cascade,...
    images_NHW3 = pipe.generate(prompts, jax.random.PRNGKey(0))   # uint8

Every stage is found by name under `workdir` (ROOT/<stage>/checkpoints), restored with its
EMA parameters by default, and sampled with its cascade-config settings; see
`pipelines.common` for what is shared and `imagen`, `glide`, `unclip` for each family.
"""
from __future__ import annotations

# Light on purpose: configs import `pipelines.cascade_config`, which runs this file first.
from diffusion_jax.pipelines.cascade_config import MissingCheckpointError, UnknownStageError


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


def __getattr__(name):
  if name in ('slerp', 'to_uint8'):
    from diffusion_jax.pipelines import common
    return getattr(common, name)
  raise AttributeError(name)


__all__ = ['load', 'MissingCheckpointError', 'UnknownStageError', 'slerp', 'to_uint8']
