"""Sampling pipelines of the three cascades, and their editing applications.

    pipe = pipelines.load(config, workdir)     # config: configs/<family>.py:stage=cascade,...
    images_NHW3 = pipe.generate(prompts, jax.random.PRNGKey(0))   # uint8

Every stage is found by name under `workdir` (ROOT/<stage>/checkpoints), restored with its
EMA parameters by default, and sampled with its cascade-config settings; see
`pipelines.common` for what is shared and `imagen`, `glide`, `unclip` for each family.
"""
from __future__ import annotations

import os

from diffusion_jax import errors, validation
from diffusion_jax.pipelines import glide, imagen, unclip
from diffusion_jax.pipelines.common import MissingCheckpointError, UnknownStageError


PIPELINES = {'imagen': imagen.ImagenPipeline, 'glide': glide.GlidePipeline,
             'unclip': unclip.UnCLIPPipeline}


def load(config, workdir: str):
  """The pipeline of a `stage=cascade` config rooted at `workdir`; errors.InputError for a
  config out of range (`validation.check_cascade_config`) or a stage without a checkpoint."""
  validation.check_cascade_config(config)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise errors.InputError(f'--workdir={workdir}: is a file; name the cascade root, the '
                            'directory with one directory per stage')
  family = config.family
  if family not in PIPELINES:
    raise errors.InputError(f'unknown family {family!r}; choose {", ".join(PIPELINES)}')
  return PIPELINES[family](config, workdir)


__all__ = ['load', 'MissingCheckpointError', 'UnknownStageError']
