"""Guidance and thresholding: classifier-free guidance in one batched forward pass, a hook for
gradient guidance (CLIP guidance), static and dynamic thresholding, and noise-conditioning
augmentation (and Gaussian-blur augmentation) of super-resolution inputs.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from diffusion_jax.diffusion import process

# The flags a denoiser reads to replace a conditioning by its learned null (see
# docs/ARCHITECTURE.md); the unconditional half of CFG sets all of them.
DEFAULT_UNCOND_FLAGS = ('drop_text', 'drop_image')


def classifier_free(denoise_fn: Callable, guidance_scale, *, learned_variance: bool = False,
                    uncond_flags=DEFAULT_UNCOND_FLAGS,
                    uncond_overrides: Mapping[str, jax.Array] | None = None) -> Callable:
  """Wraps `denoise_fn(x_t, t_B, cond)` into classifier-free guidance (Ho & Salimans 2021).

  One forward pass over the conditional and unconditional rows interleaved (each example's
  conditional row, then its unconditional one: with the batch sharded, every device keeps
  both rows of its own examples and nothing moves between devices); the unconditional rows
  have every flag in `uncond_flags` set to True (and `uncond_overrides` replacing cond
  entries), and the result is uncond + scale * (cond - uncond). A scale of 1
  is the conditional model. The combination is linear in the output, so it is the same
  whether the model predicts eps, x0 or v. With a learned variance, only the first half of
  the channels is guided; the variance channels are the conditional rows' (as GLIDE).
  """
  def guided(x_t, t_B, cond):
    batch = x_t.shape[0]
    cond = dict(cond)
    uncond = dict(cond)
    for flag in uncond_flags:
      uncond[flag] = jnp.ones((batch,), bool)
      cond[flag] = jnp.asarray(cond.get(flag, jnp.zeros((batch,), bool)), bool)
    if uncond_overrides:
      uncond.update(uncond_overrides)
    both = jax.tree.map(_interleave, cond, uncond)
    out = denoise_fn(_interleave(x_t, x_t), _interleave(t_B, t_B), both)
    pairs = out.reshape((batch, 2) + out.shape[1:])
    out_cond, out_uncond = pairs[:, 0], pairs[:, 1]
    if learned_variance:
      channels = out.shape[-1] // 2
      mean_c, var_c = out_cond[..., :channels], out_cond[..., channels:]
      mean_u = out_uncond[..., :channels]
      return jnp.concatenate([mean_u + guidance_scale * (mean_c - mean_u), var_c], axis=-1)
    return out_uncond + guidance_scale * (out_cond - out_uncond)

  return guided


def prompt_contrast(guided_fn: Callable, denoise_fn: Callable, pairs_cond: Mapping[str, Any],
                    weights_BK, scale, *, learned_variance: bool = False) -> Callable:
  """Adds contrastive prompt guidance to a guided denoiser:
  `guided(x_t, t, cond) + scale * sum_k w_k (D(x_t, t, pos_k) - D(x_t, t, neg_k))`.

  Each example has K (positive, negative) prompt pairs that differ in one thing (Wu & De la
  Torre 2023); the difference of the two conditional outputs is the direction of that one
  thing, with what the pair shares cancelled. `pairs_cond` is the cond of the B * K * 2
  prompts, example-major (example b's pair k: row 2 (b K + k) the positive, the next its
  negative), so a batch-sharded x_t and its pairs stay on one device; `weights_BK` (0 for a
  padding pair) scales each pair. With a learned variance only the mean channels move.
  """
  def contrasted(x_t, t_B, cond):
    out = guided_fn(x_t, t_B, cond)
    batch, pairs = weights_BK.shape
    rows = 2 * pairs
    both = denoise_fn(jnp.repeat(x_t, rows, axis=0), jnp.repeat(t_B, rows, axis=0),
                      pairs_cond)
    channels = x_t.shape[-1] if learned_variance else both.shape[-1]
    both = both[..., :channels].reshape((batch, pairs, 2) + out.shape[1:-1] + (channels,))
    w_BK = jnp.asarray(weights_BK, out.dtype).reshape((batch, pairs) + (1,) * (out.ndim - 1))
    push = scale * jnp.sum(w_BK * (both[:, :, 0] - both[:, :, 1]), axis=1)
    if learned_variance:
      return jnp.concatenate([out[..., :channels] + push, out[..., channels:]], axis=-1)
    return out + push

  return contrasted


def _interleave(a, b):
  """[a0, b0, a1, b1, ...] along the leading (batch) axis."""
  a, b = jnp.asarray(a), jnp.asarray(b)
  return jnp.stack([a, b], axis=1).reshape((-1,) + a.shape[1:])


def static_threshold(x0, max_value: float = 0.0):
  """Clips the predicted x0 to the data range [-1, 1], or to [-max_value, max_value] when
  max_value > 0 (diffusers' `clip_sample_range`: Karlo's prior clips its embeddings to 5)."""
  m = float(max_value) or 1.0
  return jnp.clip(x0, -m, m)


def dynamic_threshold(x0, percentile: float = 99.5, max_value: float = 0.0):
  """Imagen's dynamic thresholding (Saharia et al. 2022, sec. 2.3).

  Per sample, s = the `percentile`-th percentile of |x0| over all non-batch axes,
  s = max(s, 1), then x0 is clipped to [-s, s] and divided by s. `percentile` is in percent
  (99.5), never a fraction: passing 0.995 is what silently turns other implementations into
  static clipping, so anything outside [50, 100] is refused. `max_value` > 0 also caps s
  (diffusers' `sample_max_value`: DeepFloyd IF samples with 95 and 1.5); 0 leaves it uncapped.
  """
  percentile = float(percentile)
  if not 50.0 <= percentile <= 100.0:
    raise ValueError(f'dynamic_threshold percentile={percentile} must be in percent (e.g. 99.5), '
                     'not a fraction like 0.995')
  flat = jnp.abs(x0.reshape(x0.shape[0], -1)).astype(jnp.float32)
  s_B = jnp.percentile(flat, percentile, axis=1)
  s_B = jnp.maximum(s_B, 1.0)
  if max_value:
    if max_value < 1.0:
      raise ValueError(f'dynamic_threshold max_value={max_value}: give a cap >= 1 (or 0: none)')
    s_B = jnp.minimum(s_B, float(max_value))
  s = process.bcast(s_B, x0).astype(x0.dtype)
  return jnp.clip(x0, -s, s) / s


def get_threshold_fn(threshold, percentile: float = 99.5,
                     max_value: float = 0.0) -> Callable | None:
  """None/'none' -> None; 'static' / 'dynamic' (with `max_value` > 0: clipped to that range /
  s capped there); or a callable passed through."""
  if threshold is None or threshold == 'none':
    return None
  if callable(threshold):
    return threshold
  if threshold == 'static':
    return static_threshold if not max_value else lambda x0: static_threshold(x0, max_value)
  if threshold == 'dynamic':
    if not 50.0 <= float(percentile) <= 100.0:
      raise ValueError(f'threshold percentile={percentile} must be in percent (e.g. 99.5)')
    return lambda x0: dynamic_threshold(x0, percentile, max_value)
  raise ValueError(f'unknown threshold {threshold!r}; choose none, static or dynamic')


def noise_augment(low_res, rng, schedule, aug_t_B=None, *, max_level: float = 1.0, noise=None):
  """Noise-conditioning augmentation (Imagen; Ho et al.'s cascaded diffusion).

  Corrupts the low-resolution conditioning image with the forward process at level
  `aug_t_B` (drawn uniformly from [0, max_level] when None, as in training; a fixed level at
  sampling) and returns (noised_low_res, aug_t_B) so the network can condition on the level.
  `noise`, when given, is the standard normal noise to use.
  """
  batch = low_res.shape[0]
  rng_t, rng_noise = jax.random.split(rng)
  if aug_t_B is None:
    aug_t_B = jax.random.uniform(rng_t, (batch,), minval=0.0, maxval=max_level)
  else:
    aug_t_B = jnp.broadcast_to(jnp.asarray(aug_t_B, jnp.float32), (batch,))
  if noise is None:
    noise = jax.random.normal(rng_noise, low_res.shape, low_res.dtype)
  return process.q_sample(low_res, aug_t_B, noise, schedule), aug_t_B


def gaussian_blur(images_BHWC, sigma_B, *, max_sigma: float):
  """Blurs each image with its own isotropic Gaussian of std `sigma_B` (pixels; 0 leaves it
  unchanged). Separable, reflect-padded; taps reach 3 * max_sigma, which bounds sigma_B."""
  radius = max(1, int(math.ceil(3.0 * float(max_sigma))))
  offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  sigma_B = jnp.clip(jnp.asarray(sigma_B, jnp.float32), 1e-3, max(float(max_sigma), 1e-3))
  taps_BK = jnp.exp(-0.5 * (offsets[None, :] / sigma_B[:, None]) ** 2)
  taps_BK = taps_BK / jnp.sum(taps_BK, axis=1, keepdims=True)
  x = images_BHWC.astype(jnp.float32)
  for axis in (1, 2):
    n = x.shape[axis]
    if radius >= n:
      raise ValueError(f'blur of up to sigma={max_sigma} needs images wider than {radius} px')
    pad = [(0, 0)] * 4
    pad[axis] = (radius, radius)
    padded = jnp.pad(x, pad, mode='reflect')
    shape = [-1, 1, 1, 1]
    x = sum(jax.lax.slice_in_dim(padded, k, k + n, axis=axis)
            * taps_BK[:, k].reshape(shape) for k in range(2 * radius + 1))
  return x.astype(images_BHWC.dtype)


def blur_augment(low_res_BHWC, rng, sigma_B=None, *, max_sigma: float):
  """Gaussian-blur conditioning augmentation (Ho et al. 2022, cascaded diffusion models): the
  low-res input blurred with std drawn from U[0, max_sigma] low-res pixels per example when
  `sigma_B` is None (training), or a fixed std at sampling. It teaches an SR stage not to
  copy the softness of its input, as the stage before it may produce. (On the CPU Shapes
  demo, 600 steps were too few for it to help: the stage kept its input's outlines.)"""
  batch = low_res_BHWC.shape[0]
  if sigma_B is None:
    sigma_B = jax.random.uniform(rng, (batch,), minval=0.0, maxval=max_sigma)
  else:
    sigma_B = jnp.broadcast_to(jnp.asarray(sigma_B, jnp.float32), (batch,))
  return gaussian_blur(low_res_BHWC, sigma_B, max_sigma=max_sigma)
