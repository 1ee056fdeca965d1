"""Periodic sample grids during training: EMA parameters, fixed captions, fixed seed.

A stage is sampled on its own, with its own sampler settings (`config.sampler`): captions
(and, for super-resolution stages, the low-resolution inputs) come from a fixed batch of the
stage's data, so the grids of successive steps are comparable. Stages whose target is not an
image (the unCLIP prior, the noised CLIP) have no grid.
"""
from __future__ import annotations

import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from diffusion_jax import conditioning, config_util, io_util, parallel
from diffusion_jax.data import pipeline as data_pipeline
from diffusion_jax.diffusion import guidance, samplers, schedules


class SampleGrid:
  """Samples a stage with its EMA parameters on a fixed batch; call with (step, state)."""

  def __init__(self, trainer, num_images: int = 8, seed: int = 0):
    config = trainer.config
    self.trainer = trainer
    self.enabled = (config_util.get(config, 'target', 'image') == 'image' and
                    config_util.get(config, 'objective', 'diffusion') == 'diffusion')
    if not self.enabled:
      return
    # Conditioning exactly as in training, without dropout; the noise augmentation of SR
    # inputs uses the sampler's fixed level instead of a random one.
    det = config.copy_and_resolve_references()
    det.diffusion.cond_drop_text = 0.0
    det.diffusion.cond_drop_image = 0.0
    det.diffusion.noise_aug = False
    self.conditioner = conditioning.Conditioner(det, trainer.encoder, trainer.codec)
    input_cfg = config.input.copy_and_resolve_references()
    shards = parallel._mesh_axes_size(trainer.mesh, parallel.BATCH_AXES)
    input_cfg.batch_size = -(-num_images // shards) * shards
    data = data_pipeline.make_train_iterator(input_cfg, tokenizer=trainer.tokenizer,
                                             seed=int(config.seed) + 1,
                                             text_cache=getattr(trainer, 'text_cache', None))
    self.batch = next(data)
    self.captions = list(data.last_captions)
    data.close() if hasattr(data, 'close') else None
    self.seed = seed
    self._fn = jax.jit(self._sample)

  def _sample(self, ema_params, batch, frozen, key):
    config, model = self.trainer.config, self.trainer.model
    sampler_cfg, diffusion_cfg = config.sampler, config.diffusion
    schedule = schedules.from_config(diffusion_cfg)
    k_cond, k_aug, k_x, k_run = jax.random.split(key, 4)
    x0, cond = self.conditioner(batch, frozen, k_cond)
    if 'low_res' in cond:  # the sampler's fixed blur and augmentation level, as the pipelines
      cond.update(self.conditioner.low_res_cond(
          batch['low_res'], k_aug, float(config_util.get(sampler_cfg, 'aug_level', 0.0)),
          float(config_util.get(sampler_cfg, 'blur_sigma', 0.0))))
    learned_variance = bool(config_util.get(diffusion_cfg, 'learned_variance', False))

    def denoise(x_t, t_B, c):
      return model.apply({'params': ema_params}, x_t, t_B, c, train=False)

    scale = float(config_util.get(sampler_cfg, 'guidance_scale', 1.0))
    if scale != 1.0 and ({'drop_text', 'drop_image'} & set(cond)):
      denoise = guidance.classifier_free(denoise, scale, learned_variance=learned_variance)
    x_T = jax.random.normal(k_x, x0.shape, jnp.float32)
    codec = self.conditioner.codec
    out = samplers.sample(
        denoise, x_T, k_run, schedule=schedule, sampler=sampler_cfg.name,
        num_steps=int(sampler_cfg.num_steps), eta=float(config_util.get(sampler_cfg, 'eta', 0.0)), cond=cond,
        parameterization=config_util.get(diffusion_cfg, 'parameterization', 'eps'),
        learned_variance=learned_variance, threshold=config_util.get(sampler_cfg, 'threshold', 'none'),
        percentile=float(config_util.get(sampler_cfg, 'percentile', 99.5)),
        threshold_max=float(config_util.get(sampler_cfg, 'threshold_max', 0.0)))
    if codec is None:
      return out
    return jnp.clip(codec.decode(frozen[conditioning.LATENT_FROZEN[0]], out), -1.0, 1.0)

  def __call__(self, step: int, state) -> np.ndarray | None:
    """Samples, writes WORKDIR/samples/step_<step>.png (+ captions) and returns the grid."""
    if not self.enabled:
      return None
    trainer = self.trainer
    batch = parallel.shard_batch(self.batch, trainer.mesh)
    with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(trainer.rules):
      images = self._fn(state.ema_params, batch, trainer.frozen_params,
                        jax.random.PRNGKey(self.seed))
    images = io_util.to_uint8(jax.device_get(images))
    grid = io_util.make_grid(images)
    if jax.process_index() == 0:
      out = os.path.join(trainer.workdir, 'samples')
      os.makedirs(out, exist_ok=True)
      Image.fromarray(grid).save(os.path.join(out, f'step_{step:08d}.png'))
      with open(os.path.join(out, 'captions.json'), 'w') as f:
        json.dump(self.captions, f, indent=1)
    return grid
