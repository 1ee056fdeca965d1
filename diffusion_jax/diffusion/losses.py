"""Diffusion training losses: L_simple in any parameterisation, SNR weightings, and the hybrid
loss with a learned variance (improved DDPM; GLIDE; the unCLIP decoder).

`diffusion_loss(apply_fn, params, batch, rng, cfg)` is the one entry point the trainer
calls. The network never computes the loss: `apply_fn(params, x_t, t_B, cond, rng)` only
returns its output.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from diffusion_jax.diffusion import process, schedules

WEIGHTINGS = ('none', 'min_snr', 'p2')


def _mean_over_examples(x):
  """Mean over all but the batch axis."""
  return jnp.mean(x.reshape(x.shape[0], -1), axis=1)


def _eps_mse_ratio(snr_B, parameterization: str):
  """MSE of a parameterisation's output per unit of eps-MSE at fixed x_t.

  x0 = (x_t - sigma eps) / alpha, so x0-errors are eps-errors / sqrt(snr); v errors are
  eps-errors / alpha, and 1 / alpha^2 = (1 + snr) / snr.
  """
  if parameterization == 'eps':
    return jnp.ones_like(snr_B)
  if parameterization == 'x0':
    return 1.0 / snr_B
  return (1.0 + snr_B) / snr_B


def loss_weight(logsnr_B, parameterization: str, weighting: str = 'none', *,
                min_snr_gamma: float = 5.0, min_snr_offset: float = 0.0, p2_gamma: float = 1.0,
                p2_k: float = 1.0):
  """Per-example weight on the parameterisation's MSE.

  - 'none': L_simple of the parameterisation.
  - 'min_snr': Min-SNR-gamma (Hang et al. 2023): eps-equivalent weight min(snr, gamma)/snr;
    with `min_snr_offset` c, min(snr + c, gamma)/snr. For v-prediction that is a v-MSE weight
    (snr + c)/(snr + 1) below gamma: the noisiest levels keep weight c instead of none (c = 1:
    the v-MSE itself, capped above snr = gamma - 1).
  - 'p2': perception-prioritised weighting (Choi et al. 2022): eps-equivalent weight
    1 / (k + snr)^gamma.
  Both are defined on the eps-MSE and converted, so they mean the same thing whatever the
  network predicts.
  """
  process.check_parameterization(parameterization)
  if weighting == 'none':
    return jnp.ones_like(logsnr_B)
  snr = jnp.exp(logsnr_B)
  if weighting == 'min_snr':
    w_eps = jnp.minimum(snr + min_snr_offset, min_snr_gamma) / snr
  elif weighting == 'p2':
    w_eps = 1.0 / (p2_k + snr)**p2_gamma
  else:
    raise ValueError(f'unknown loss weighting {weighting!r}; choose one of {WEIGHTINGS}')
  return w_eps / _eps_mse_ratio(snr, parameterization)


def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) +
                (mean1 - mean2)**2 * jnp.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, mean, log_scale, num_bins: int = 256):
  """log-probability of 8-bit data x in [-1, 1] under a Gaussian discretised into `num_bins`
  bins (Ho et al. 2020 eq. 13), elementwise, in nats; the edge bins extend to +-infinity."""
  half_bin = 1.0 / (num_bins - 1)
  inv_std = jnp.exp(-log_scale)
  upper = inv_std * (x - mean + half_bin)
  lower = inv_std * (x - mean - half_bin)
  log_cdf_upper = jax.scipy.special.log_ndtr(upper)
  log_sf_lower = jax.scipy.special.log_ndtr(-lower)

  def log1mexp(d):
    # log(1 - exp(d)) for d <= 0, floored so that neither value nor gradient is ever inf/nan
    # (jnp.where differentiates both branches).
    return jnp.log(jnp.maximum(-jnp.expm1(jnp.minimum(d, 0.0)), 1e-12))

  # log(Phi(upper) - Phi(lower)), factoring out the larger of the two tails.
  log_delta = jnp.where(
      lower > 0,
      log_sf_lower + log1mexp(jax.scipy.special.log_ndtr(-upper) - log_sf_lower),
      log_cdf_upper + log1mexp(jax.scipy.special.log_ndtr(lower) - log_cdf_upper))
  return jnp.where(x < -0.999, log_cdf_upper, jnp.where(x > 0.999, log_sf_lower, log_delta))


def vlb_terms(x0, x_t, s_B, t_B, mean_output, variance_raw, *, schedule, parameterization):
  """Per-example L_{t-1} of the variational bound, in bits per dimension.

  KL(q(x_s | x_t, x0) || p(x_s | x_t)) for s > 0 and the discretised decoder NLL
  -log p(x0 | x_t) at the first step (s = 0). The mean comes from `mean_output`, which the
  caller passes through stop_gradient so that the bound trains the variance only (improved
  DDPM sec. 3.1).
  """
  x0_hat, _ = process.predict_x0_eps(mean_output, x_t, t_B, schedule, parameterization)
  true_mean, _, true_log_var = process.posterior(x0, x_t, s_B, t_B, schedule)
  model_mean, _, _ = process.posterior(x0_hat, x_t, s_B, t_B, schedule)
  model_log_var = process.learned_log_variance(variance_raw, s_B, t_B, schedule)
  kl = normal_kl(true_mean, process.bcast(true_log_var, x0), model_mean, model_log_var)
  kl_B = _mean_over_examples(kl) / math.log(2.0)
  nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)
  nll_B = _mean_over_examples(nll) / math.log(2.0)
  return jnp.where(s_B <= 0.0, nll_B, kl_B)


def _cfg_get(cfg, key, default):
  try:
    value = cfg[key]
  except (KeyError, AttributeError):
    return default
  return default if value is None else value


def diffusion_loss(apply_fn: Callable, params, batch, rng, cfg) -> tuple[jax.Array, dict[str, Any]]:
  """The diffusion training loss of one batch.

  Args:
    apply_fn: (params, x_t, t_B, cond, rng) -> model output (2x channels with a learned
      variance).
    params: the network parameters.
    batch: {'x0': clean data [B, ...], 'cond': dict handed to the network unchanged,
      optionally 't' [B] and 'noise' (the draws; otherwise made here from `rng`)}.
    rng: PRNG key (times, noise, dropout).
    cfg: the `diffusion` config section: schedule (+ its fields), parameterization,
      learned_variance, vlb_weight (lambda of L_hybrid, 0.001 in improved DDPM),
      loss_weighting ('none' | 'min_snr' | 'p2') with min_snr_gamma / p2_gamma / p2_k, and
      num_timesteps (the VLB's step count for continuous schedules, default 1000).

  Returns:
    (scalar loss, aux dict of per-batch scalars: mse, vlb (when learned), mean t).
  """
  schedule = schedules.from_config(cfg)
  parameterization = process.check_parameterization(_cfg_get(cfg, 'parameterization', 'eps'))
  learned_variance = bool(_cfg_get(cfg, 'learned_variance', False))
  x0 = batch['x0'].astype(jnp.float32)
  cond = batch.get('cond', {})
  rng_t, rng_noise, rng_model = jax.random.split(rng, 3)
  t_B = batch['t'] if 't' in batch else schedule.sample_t(rng_t, (x0.shape[0],))
  noise = batch['noise'] if 'noise' in batch else jax.random.normal(rng_noise, x0.shape,
                                                                     jnp.float32)
  x_t = process.q_sample(x0, t_B, noise, schedule)

  output = apply_fn(params, x_t, t_B, cond, rng_model).astype(jnp.float32)
  if learned_variance:
    channels = output.shape[-1] // 2
    mean_output, variance_raw = output[..., :channels], output[..., channels:]
  else:
    mean_output, variance_raw = output, None
  if mean_output.shape != x0.shape:
    raise ValueError(f'network output {output.shape} does not match the data {x0.shape} '
                     f'(learned_variance={learned_variance})')

  target = process.target(x0, noise, t_B, schedule, parameterization)
  mse_B = _mean_over_examples((mean_output - target)**2)
  weight_B = loss_weight(
      schedule.logsnr(t_B), parameterization, _cfg_get(cfg, 'loss_weighting', 'none'),
      min_snr_gamma=float(_cfg_get(cfg, 'min_snr_gamma', 5.0)),
      min_snr_offset=float(_cfg_get(cfg, 'min_snr_offset', 0.0)),
      p2_gamma=float(_cfg_get(cfg, 'p2_gamma', 1.0)), p2_k=float(_cfg_get(cfg, 'p2_k', 1.0)))
  loss_B = weight_B * mse_B
  aux = {'mse': jnp.mean(mse_B), 't_mean': jnp.mean(t_B)}

  if learned_variance:
    # continuous time: the config's step count, 0 meaning the discrete schedules' default
    num_timesteps = (schedule.num_timesteps or int(_cfg_get(cfg, 'num_timesteps', 0)) or
                     schedules.DEFAULT_NUM_TIMESTEPS)
    s_B = jnp.maximum(t_B - 1.0 / num_timesteps, 0.0)
    vlb_B = vlb_terms(x0, x_t, s_B, t_B, jax.lax.stop_gradient(mean_output), variance_raw,
                      schedule=schedule, parameterization=parameterization)
    # L_vlb = sum over T steps = T * E_t[L_t]; lambda * T * L_t is improved DDPM's hybrid term.
    vlb_weight = float(_cfg_get(cfg, 'vlb_weight', 0.001))
    loss_B = loss_B + vlb_weight * num_timesteps * vlb_B
    aux['vlb'] = jnp.mean(vlb_B)

  loss = jnp.mean(loss_B)
  aux['loss'] = loss
  return loss, aux
