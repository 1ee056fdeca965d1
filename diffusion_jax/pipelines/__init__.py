"""Sampling pipelines of the three cascades, and their editing applications.

    pipe = pipelines.load(config, workdir)     # config: configs/<family>.py:stage=cascade,...
    pipe = pipelines.from_pretrained(path)     # converted or exported stages, no training state
    images_NHW3 = pipe.generate(prompts, jax.random.PRNGKey(0))   # uint8

Every stage is found by name under `workdir` (ROOT/<stage>/checkpoints), restored with its
EMA parameters by default, and sampled with its cascade-config settings; see
`pipelines.common` for what is shared and `imagen`, `glide`, `unclip` for each family.
"""
from __future__ import annotations

import os

import ml_collections

from diffusion_jax import config_util, errors, pretrained, validation
from diffusion_jax.pipelines import glide, imagen, latent, unclip
from diffusion_jax.pipelines.common import SETTINGS, MissingCheckpointError, UnknownStageError


PIPELINES = {'imagen': imagen.ImagenPipeline, 'glide': glide.GlidePipeline,
             'unclip': unclip.UnCLIPPipeline, 'latent': latent.LatentCascade}


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


def from_pretrained(path: str):
  """The pipeline of a directory of pretrained stages (`diffusion_jax.pretrained`), e.g. the
  output of `python -m diffusion_jax.tools.convert_glide`: built from the saved configs alone,
  never downloading. The text-to-image chain is the stages without an inpainting input,
  lowest resolution first; inpainting stages serve `inpaint`, a noised CLIP CLIP guidance.

  A diffusers unCLIP directory (Karlo: model_index.json's `_class_name` UnCLIPPipeline or
  UnCLIPImageVariationPipeline) is a whole cascade: its stages come from
  `diffusers_io.karlo`. A diffusers Stable Diffusion (text-to-image, img2img or inpainting),
  DiT or PixArt-alpha directory is a `latent.LatentPipeline` (`diffusers_io.latent_pipeline`)."""
  from diffusion_jax.diffusers_io import karlo, latent_pipeline  # noqa: PLC0415
  if latent_pipeline.is_latent_dir(path):
    return latent.from_directory(path)
  if karlo.is_karlo_dir(path):
    configs = karlo.stage_configs(path)
    cascade = pretrained_cascade_config('unclip', configs)
    cascade.order = tuple(configs)  # prior, decoder, super_res: the pipeline's own order
    validation.check_cascade_config(cascade)
    return unclip.KarloPipeline(cascade, path, configs)
  dirs = pretrained.stage_dirs(path)
  if not dirs:
    raise errors.InputError(f'{path}: holds no pretrained stage (a subdirectory with '
                            f'{pretrained.CONFIG_FILE} and {pretrained.WEIGHTS_FILE}); convert '
                            'released weights with python -m diffusion_jax.tools.convert_glide')
  configs = {name: pretrained.read_config(d) for name, d in dirs.items()}
  families = sorted({str(c.get('family')) for c in configs.values()})
  if len(families) != 1 or families[0] not in PIPELINES:
    raise errors.InputError(f'{path}: its stages are of families {families}; one directory '
                            f'holds the stages of one of {", ".join(PIPELINES)}')
  cascade = pretrained_cascade_config(families[0], configs)
  validation.check_cascade_config(cascade)
  return PIPELINES[families[0]](cascade, pretrained.stages_root(path), pretrained=True)


def pretrained_cascade_config(family: str, configs) -> ml_collections.ConfigDict:
  """The cascade config of pretrained stages (name -> saved stage config): order, extra
  stages and each stage's sampler settings from its config's `sampler` section."""
  def model(name):
    return configs[name].get('model') or {}

  def by_resolution(names):
    return sorted(names, key=lambda n: (bool(model(n).get('low_res_size')),
                                        int(model(n).get('image_size') or 0), n))

  diffusion = [n for n, c in configs.items() if c.get('objective', 'diffusion') == 'diffusion']
  chain = by_resolution(n for n in diffusion if not model(n).get('inpaint'))
  inpaint = by_resolution(n for n in diffusion if model(n).get('inpaint'))
  clip = sorted(n for n, c in configs.items() if c.get('objective') == 'noised_clip')
  if not chain:
    raise errors.InputError(f'no text-to-image stage among {sorted(configs)}; the chain needs '
                            'a base stage')
  c = ml_collections.ConfigDict()
  c.family = family
  c.stage = 'cascade'
  c.size = 'pretrained'
  c.seed = 0
  c.order = tuple(chain)
  c.extra = tuple(inpaint + clip)
  c.inpaint_stages = tuple(inpaint)
  c.clip_stage = clip[0] if clip else ''
  c.stages = ml_collections.ConfigDict()
  for name, config in configs.items():
    sampler = dict(config.get('sampler') or {})
    entry = ml_collections.ConfigDict()
    entry.dir = name
    entry.use_ema = False
    entry.config_file = ''
    entry.config_arg = ''
    entry.sampler = str(sampler.pop('name', 'ddim'))
    for key in SETTINGS:
      if key != 'sampler' and config_util.get(sampler, key) is not None:
        entry[key] = sampler[key]
    c.stages[name] = entry
  return c


__all__ = ['load', 'from_pretrained', 'MissingCheckpointError', 'UnknownStageError']
