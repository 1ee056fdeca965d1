"""Tiny trained cascades for the pipeline and sample-CLI tests.

Each stage is trained for one step by the real trainer into ROOT/<stage>; a root is built
once per test session (the function is cached), shared by every test module that asks and
removed at exit.
"""
from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile

from configs import glide, imagen, unclip

FAMILIES = {'imagen': imagen, 'glide': glide, 'unclip': unclip}


def tiny_stage_config(family: str, stage: str):
  cfg = FAMILIES[family].get_config(f'stage={stage},size=tiny')
  cfg.total_steps = 1
  cfg.ckpt_steps = 1
  cfg.log_steps = 1
  cfg.input.batch_size = 8
  cfg.optimizer.warmup_steps = 0
  # A plain EMA keeps these one-step stages at (almost) their initialisation, whose zero-init
  # output layers make DDIM inversion and guidance behave in closed form.
  cfg.optimizer.ema_warmup = False
  return cfg


@functools.lru_cache(maxsize=None)
def trained_root(family: str, stages: tuple[str, ...]) -> str:
  from diffusion_jax.train import loop
  root = tempfile.mkdtemp(prefix=f'pipeline_{family}_')
  atexit.register(shutil.rmtree, root, True)
  for stage in stages:
    loop.train(tiny_stage_config(family, stage), os.path.join(root, stage))
  return root


def cascade_config(family: str, num_steps: int = 4, **entries):
  """The tiny cascade config with few sampling steps (fewer steps, same programs)."""
  cfg = FAMILIES[family].get_config('stage=cascade,size=tiny')
  for name in cfg.stages.keys():
    cfg.stages[name].num_steps = num_steps
  for key, value in entries.items():
    cfg[key] = value
  return cfg
