"""The latent space of latent diffusion: a frozen KL autoencoder between images and the latents
a diffusion network is trained on and samples.

    codec = latent.load_codec('stable-diffusion-v1-5/vae')     # or the pipeline directory
    z_BhwC = codec.encode(codec.params, images_BHWC, rng)      # scaled latents
    images_BHWC = codec.decode(codec.params, z_BhwC)           # [-1, 1], float32

The diffusion network sees z' = (z - shift) * scale, or with per-channel statistics
(z - mean) * scale / std (`LatentSpace`); the autoencoder's config gives them (diffusers'
`scaling_factor`, `shift_factor`, `latents_mean`, `latents_std`). `encode` draws a posterior
sample when given a key (as latent diffusion trains) and takes the posterior mean otherwise.
The parameters are an argument, so a train step or a sampler receives them as a sharded input
rather than as constants of the compiled program.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax.numpy as jnp

from diffusion_jax import errors
from diffusion_jax.diffusers_io import pipeline as dio_pipeline
from diffusion_jax.diffusers_io import vae as dio_vae
from diffusion_jax.models import autoencoder


@dataclasses.dataclass(frozen=True)
class LatentSpace:
  """z' = (z - shift) * scale, or (z - mean) * scale / std with per-channel statistics."""
  scaling_factor: float = 1.0
  shift_factor: float | None = None
  latents_mean: tuple[float, ...] | None = None
  latents_std: tuple[float, ...] | None = None

  def __post_init__(self):
    if (self.latents_mean is None) != (self.latents_std is None):
      raise errors.InputError('the latent space needs both latents_mean and latents_std, or '
                              'neither')
    if self.latents_mean is not None and self.shift_factor is not None:
      raise errors.InputError('give the latent space shift_factor or latents_mean/latents_std, '
                              'not both')
    if not self.scaling_factor > 0:
      raise errors.InputError(f'scaling_factor={self.scaling_factor}: must be positive')

  @classmethod
  def of(cls, module: autoencoder.AutoencoderKL) -> 'LatentSpace':
    """The latent space an autoencoder's config describes."""
    stats = lambda v: None if v is None else tuple(float(x) for x in v)
    shift = module.shift_factor
    return cls(float(module.scaling_factor), None if shift is None else float(shift),
               stats(module.latents_mean), stats(module.latents_std))

  def _center_scale(self, z):
    channels = z.shape[-1]
    if self.latents_mean is not None:
      if len(self.latents_mean) != channels or len(self.latents_std) != channels:
        raise errors.InputError(f'latents_mean/latents_std have {len(self.latents_mean)}/'
                                f'{len(self.latents_std)} entries for {channels} latent channels')
      per_channel = lambda v: jnp.asarray(v, jnp.float32).reshape((1,) * (z.ndim - 1) + (-1,))
      return per_channel(self.latents_mean), self.scaling_factor / per_channel(self.latents_std)
    return jnp.float32(self.shift_factor or 0.0), jnp.float32(self.scaling_factor)

  def scale(self, z_BhwC):
    """Autoencoder latents -> the diffusion network's."""
    center, scale = self._center_scale(z_BhwC)
    return (z_BhwC.astype(jnp.float32) - center) * scale

  def unscale(self, z_BhwC):
    """The diffusion network's latents -> the autoencoder's."""
    center, scale = self._center_scale(z_BhwC)
    return z_BhwC.astype(jnp.float32) / scale + center


@dataclasses.dataclass(frozen=True)
class Codec:
  """A frozen autoencoder and its latent space."""
  module: autoencoder.AutoencoderKL
  params: Any
  space: LatentSpace

  @property
  def downsample_factor(self) -> int:
    return self.module.downsample_factor

  @property
  def latent_channels(self) -> int:
    return self.module.latent_channels

  def latent_size(self, image_size: int) -> int:
    """The latent side of an image side (a multiple of the downsample factor)."""
    f = self.downsample_factor
    if image_size % f:
      raise errors.InputError(f'image size {image_size} is not a multiple of the '
                              f'autoencoder\'s downsample factor {f}')
    return image_size // f

  def encode(self, params, images_BHWC, rng=None):
    """Images in [-1, 1] -> scaled latents: a posterior sample with `rng`, else its mean."""
    mean, logvar = self.module.apply({'params': params}, images_BHWC, method='encode')
    z = mean if rng is None else autoencoder.sample_posterior(mean, logvar, rng)
    return self.space.scale(z)

  def decode(self, params, z_BhwC):
    """Scaled latents -> images in [-1, 1] (not clipped), float32."""
    return self.module.apply({'params': params}, self.space.unscale(z_BhwC), method='decode')


def autoencoder_folder(path: str) -> str:
  """The AutoencoderKL folder `path` names: itself, or a diffusers pipeline directory's vae/."""
  if dio_pipeline.is_pipeline_dir(path):
    return dio_pipeline.component(path, 'vae')
  return path


def load_codec(path: str, space: LatentSpace | None = None) -> Codec:
  """The codec of a diffusers `AutoencoderKL` folder (or a pipeline directory with vae/), in
  the latent space its config gives unless `space` is given."""
  if not os.path.isdir(path):
    raise errors.InputError(f'autoencoder {path}: no such directory; give a diffusers '
                            'AutoencoderKL folder or a pipeline directory with vae/')
  module, params = dio_vae.load_vae(autoencoder_folder(path))
  return Codec(module, params, space or LatentSpace.of(module))
