"""The autoencoder's training loss (latent diffusion's first stage, without its perceptual and
adversarial terms): a per-pixel reconstruction error of a posterior sample's decoding plus
`kl_weight` times the posterior's KL divergence to N(0, 1).

Per example, (sum of |x - x_hat| (l1) or (x - x_hat)^2 (l2) + kl_weight * KL) / (H W C): LDM's
per-example sums divided by the pixel count, so the balance of the two terms is LDM's
(kl_weight 1e-6) and the loss reads as a per-pixel error. The batch mean is the loss.
"""
from __future__ import annotations

import math

import jax.numpy as jnp

from diffusion_jax.diffusion.losses import _cfg_get

RECONSTRUCTIONS = ('l1', 'l2')


def kl_to_standard_normal(mean_BhwC, logvar_BhwC):
  """KL(N(mean, exp(logvar)) || N(0, 1)) summed over all but the batch axis: [B] float32."""
  mean = mean_BhwC.astype(jnp.float32)
  logvar = logvar_BhwC.astype(jnp.float32)
  per_element = mean * mean + jnp.exp(logvar) - 1.0 - logvar
  return 0.5 * jnp.sum(per_element, axis=tuple(range(1, mean.ndim)))


def autoencoder_terms(x_BHWC, recon_BHWC, mean_BhwC, logvar_BhwC, *, reconstruction: str = 'l1',
                      kl_weight: float = 1e-6):
  """(loss, aux) of reconstructions of `x` from posteriors N(mean, exp(logvar))."""
  if reconstruction not in RECONSTRUCTIONS:
    raise ValueError(f'loss.reconstruction={reconstruction!r} is not one of {RECONSTRUCTIONS}')
  err = x_BHWC.astype(jnp.float32) - recon_BHWC.astype(jnp.float32)
  per_pixel = jnp.abs(err) if reconstruction == 'l1' else err * err
  pixels = math.prod(x_BHWC.shape[1:])
  rec_B = jnp.sum(per_pixel.reshape(per_pixel.shape[0], -1), axis=1) / pixels
  kl_B = kl_to_standard_normal(mean_BhwC, logvar_BhwC)
  loss = jnp.mean(rec_B + kl_weight * kl_B / pixels)
  return loss, {'loss': loss, 'reconstruction': jnp.mean(rec_B), 'kl': jnp.mean(kl_B)}


def autoencoder_loss(apply_fn, params, batch, rng, cfg):
  """The trainer's objective 'autoencoder': batch {'x0': images, 'noise': the posterior's
  standard-normal draw, latent-shaped}; `cfg` is the stage's `loss` section."""
  x = batch['x0']
  t_B = jnp.zeros((x.shape[0],), jnp.float32)
  recon, mean, logvar = apply_fn(params, x, t_B, {'posterior_noise': batch['noise']}, rng)
  return autoencoder_terms(x, recon, mean, logvar,
                           reconstruction=_cfg_get(cfg, 'reconstruction', 'l1'),
                           kl_weight=float(_cfg_get(cfg, 'kl_weight', 1e-6)))
