"""Sampling pipelines of the three cascades, and their editing applications.

    pipe = pipelines.load(config, workdir)     # config: configs/<family>.py:stage=cascade,...
    images_NHW3 = pipe.generate(prompts, jax.random.PRNGKey(0))   # uint8

Every stage is found by name under `workdir` (ROOT/<stage>/checkpoints), restored with its
EMA parameters by default, and sampled with its cascade-config settings; see
`pipelines.common` for what is shared and `imagen`, `glide`, `unclip` for each family.
"""
from __future__ import annotations

from diffusion_jax.pipelines import glide, imagen, unclip
from diffusion_jax.pipelines.common import MissingCheckpointError, UnknownStageError


PIPELINES = {'imagen': imagen.ImagenPipeline, 'glide': glide.GlidePipeline,
             'unclip': unclip.UnCLIPPipeline}


def load(config, workdir: str):
  """The pipeline of a `stage=cascade` config rooted at `workdir`."""
  if config.get('stage') != 'cascade':
    raise ValueError(f'pipelines.load needs a stage=cascade config, got stage='
                     f'{config.get("stage")!r} (e.g. configs/imagen.py:stage=cascade,size=tiny)')
  family = config.family
  if family not in PIPELINES:
    raise ValueError(f'unknown family {family!r}; choose {", ".join(PIPELINES)}')
  return PIPELINES[family](config, workdir)


__all__ = ['load', 'MissingCheckpointError', 'UnknownStageError']
