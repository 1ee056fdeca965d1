"""Samplers: one-step updates and whole-chain sampling as a `lax.scan` inside one jit.

`denoise_fn(x_t, t_B, cond) -> output` returns the model output in the parameterisation
given to the sampler ('eps' by default, or 'x0' / 'v'); with `learned_variance=True` it has
twice the channels (mean part, then the variance interpolation of improved DDPM). Guidance
is composed into `denoise_fn` beforehand (see guidance.classifier_free).

Every update is written for an arbitrary pair of times s < t, so respacing to any number of
steps needs nothing special: the chain visits `schedule.timesteps(num_steps, spacing)`, which
also takes the released models' integer spacings on discrete schedules (glide-text2im's
'100' / 'fast27' / 'ddim25', diffusers' 'leading' / 'trailing' / 'linspace'). The last step
(to t = 0) returns the predicted x0 without noise, as DDPM does (and glide-text2im, whose
last step has alphas_cumprod_prev = 1).

- 'ddpm': ancestral sampling from p(x_s | x_t) with variance 'small' (posterior beta-tilde),
  'large' (beta) or 'learned'.
- 'ddim': DDIM (Song et al. 2021) with eta; eta = 1 equals ancestral sampling with the
  posterior variance.
- 'dpmpp_2m': DPM-Solver++(2M) (Lu et al. 2022), data prediction, second-order multistep.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from diffusion_jax.diffusion import guidance, process

SAMPLERS = ('ddpm', 'ddim', 'dpmpp_2m')
VARIANCES = ('small', 'large', 'learned')


def _split_output(output, learned_variance: bool):
  if not learned_variance:
    return output, None
  channels = output.shape[-1] // 2
  return output[..., :channels], output[..., channels:]


def denoise(denoise_fn, x_t, t_B, cond, *, schedule, parameterization='eps',
            learned_variance=False, threshold_fn=None, grad_guidance_fn=None):
  """One model evaluation: returns (x0_hat, eps_hat, variance_raw).

  Thresholding is applied to x0_hat and eps_hat is recomputed from it, so every update below
  is a function of (x_t, x0_hat) and stays self-consistent. `grad_guidance_fn(x_t, t_B,
  cond)` returns the (already scaled) gradient of log p(y | x_t); it shifts eps by
  -sigma_t * grad (Dhariwal & Nichol 2021, alg. 2), i.e. the mean by variance * grad.
  """
  output = denoise_fn(x_t, t_B, cond).astype(jnp.float32)
  mean_output, variance_raw = _split_output(output, learned_variance)
  x0_hat, eps_hat = process.predict_x0_eps(mean_output, x_t, t_B, schedule, parameterization)
  alpha, sigma = schedule.alpha_sigma(t_B)
  if grad_guidance_fn is not None:
    grad = grad_guidance_fn(x_t, t_B, cond).astype(jnp.float32)
    eps_hat = eps_hat - process.bcast(sigma, x_t) * grad
    x0_hat = process.x0_from_eps(x_t, eps_hat, alpha, sigma)
  if threshold_fn is not None:
    x0_hat = threshold_fn(x0_hat)
    eps_hat = process.eps_from_x0(x_t, x0_hat, alpha, sigma)
  return x0_hat, eps_hat, variance_raw


def p_mean_variance(x_t, x0_hat, variance_raw, s_B, t_B, *, schedule, variance='small',
                    t_next_B=None):
  """Mean and log-variance (shaped as x_t) of p(x_s | x_t): the posterior mean at x0_hat and
  the chosen variance (glide-text2im's p_mean_variance once x0_hat is known). With
  'learned', `t_next_B` is the next time up the grid, which sets the variance at s = 0
  (process.learned_log_variance)."""
  mean, _, log_var_small = process.posterior(x0_hat, x_t, s_B, t_B, schedule)
  if variance == 'small':
    log_var = process.bcast(log_var_small, x_t) + jnp.zeros_like(x_t)
  elif variance == 'large':
    log_var = process.bcast(process.forward_log_variance(s_B, t_B, schedule), x_t)
    log_var = log_var + jnp.zeros_like(x_t)
  elif variance == 'learned':
    if variance_raw is None:
      raise ValueError("variance='learned' needs a denoiser with learned_variance=True")
    log_var = process.learned_log_variance(variance_raw, s_B, t_B, schedule, t_next_B)
  else:
    raise ValueError(f'unknown variance {variance!r}; choose one of {VARIANCES}')
  return mean, log_var


def ddpm_step(x_t, x0_hat, variance_raw, s_B, t_B, noise, *, schedule, variance='small'):
  """Ancestral step x_t -> x_s from the posterior mean at x0_hat."""
  mean, log_var = p_mean_variance(x_t, x0_hat, variance_raw, s_B, t_B, schedule=schedule,
                                  variance=variance)
  return mean + jnp.exp(0.5 * log_var) * noise


def ddim_step(x_t, x0_hat, eps_hat, s_B, t_B, noise, *, schedule, eta=0.0):
  """DDIM: x_s = alpha_s x0 + sqrt(sigma_s^2 - sig^2) eps + sig z, sig = eta sqrt(beta-tilde)."""
  alpha_s, sigma_s = schedule.alpha_sigma(s_B)
  _, _, var_tilde, _ = process.posterior_coefficients(s_B, t_B, schedule)
  sig2 = (eta**2) * var_tilde
  direction = jnp.sqrt(jnp.maximum(sigma_s**2 - sig2, 0.0))
  return (process.bcast(alpha_s, x_t) * x0_hat + process.bcast(direction, x_t) * eps_hat +
          process.bcast(jnp.sqrt(sig2), x_t) * noise)


def dpmpp_2m_step(x_t, x0_hat, x0_prev, s_B, t_B, t_prev_B, has_prev, *, schedule):
  """DPM-Solver++(2M) in half-log-SNR lambda = log(alpha / sigma).

  x_s = (sigma_s / sigma_t) x_t - alpha_s expm1(-h) D, h = lambda_s - lambda_t, with
  D = x0_hat on the first step and the multistep correction
  D = (1 + 1/(2r)) x0_hat - 1/(2r) x0_prev, r = h_prev / h, afterwards.
  """
  lam = lambda u: 0.5 * schedule.logsnr(u)
  alpha_s, sigma_s = schedule.alpha_sigma(s_B)
  _, sigma_t = schedule.alpha_sigma(t_B)
  h = lam(s_B) - lam(t_B)
  h_prev = lam(t_B) - lam(t_prev_B)
  r = h_prev / h
  d_second = (process.bcast(1.0 + 0.5 / r, x0_hat) * x0_hat -
              process.bcast(0.5 / r, x0_prev) * x0_prev)
  d = jnp.where(has_prev, d_second, x0_hat)
  return (process.bcast(sigma_s / sigma_t, x_t) * x_t -
          process.bcast(alpha_s * jnp.expm1(-h), x_t) * d)


@functools.partial(
    jax.jit,
    static_argnames=('denoise_fn', 'schedule', 'sampler', 'num_steps', 'spacing',
                     'parameterization',
                     'learned_variance', 'variance', 'threshold', 'percentile',
                     'threshold_max', 'grad_guidance_fn', 'guide_mean', 'progress_fn',
                     'return_x0_trajectory'))
def sample(denoise_fn: Callable, x_T, rng, *, schedule, sampler: str = 'ddim',
           num_steps: int | None = None, spacing: str | None = None, eta: float = 0.0,
           cond=None, parameterization: str = 'eps',
           learned_variance: bool = False, variance: str | None = None, threshold=None,
           percentile: float = 99.5, threshold_max: float = 0.0,
           grad_guidance_fn: Callable | None = None, guide_mean: bool = False,
           progress_fn: Callable | None = None, return_x0_trajectory: bool = False,
           step_noise=None):
  """Runs the reverse chain from x_T (at t = 1) down to t = 0 in `num_steps` model calls.

  Args:
    denoise_fn: (x_t, t_B, cond) -> model output; a hashable callable (static under jit).
    x_T: starting noise, e.g. jax.random.normal(key, shape).
    rng: key for the stochastic samplers' noise.
    schedule: a diffusion_jax.diffusion.schedules.Schedule.
    sampler: 'ddpm', 'ddim' or 'dpmpp_2m'.
    num_steps: model calls; None only with a glide-text2im respacing string, which fixes it.
    spacing: the time grid, 'time' or 'logsnr', or on a discrete schedule an integer spacing
      (see Schedule.timesteps); default 'logsnr' for 'dpmpp_2m' (equal steps in lambda, as
      DPM-Solver recommends) and 'time' otherwise.
    eta: DDIM's stochasticity (traced: changing it does not recompile).
    cond: conditioning pytree handed to denoise_fn unchanged.
    variance: for 'ddpm': 'small', 'large' or 'learned' (default: 'learned' when
      learned_variance else 'small').
    threshold: None, 'static', 'dynamic' or a callable on x0_hat.
    threshold_max: > 0: the cap of dynamic thresholding's s (guidance.dynamic_threshold).
    progress_fn: host callback called with the step index (0-based) after each step; it
      runs through jax.debug.callback, so the loop never leaves jit.
    grad_guidance_fn: (x_t, t_B, cond) -> the scaled gradient of log p(y | x_t) (classifier or
      CLIP guidance); by default it shifts eps before thresholding (see `denoise`).
    guide_mean: 'ddpm' only: the gradient shifts the mean of p(x_s | x_t), computed from the
      thresholded x0, by the step's variance times the gradient (glide-text2im's and ADM's
      `condition_mean`; with a learned variance, that variance).
    return_x0_trajectory: also return x0_hat at every step, [num_steps, *x_T.shape].
    step_noise: optional [num_steps, *x_T.shape] normal draws used, step by step, instead of
      draws from `rng` (to replay a reference implementation's noise).

  Returns:
    x_0 (and the x0 trajectory when asked).
  """
  if sampler not in SAMPLERS:
    raise ValueError(f'unknown sampler {sampler!r}; choose one of {SAMPLERS}')
  if guide_mean and sampler != 'ddpm':
    raise ValueError(f"guide_mean shifts an ancestral step's mean: sampler='ddpm', not "
                     f'{sampler!r}')
  if variance is None:
    variance = 'learned' if learned_variance else 'small'
  threshold_fn = guidance.get_threshold_fn(threshold, percentile, threshold_max)
  if spacing is None:
    spacing = 'logsnr' if sampler == 'dpmpp_2m' else 'time'
  times = jnp.asarray(schedule.timesteps(num_steps, spacing), jnp.float32)
  num_steps = times.shape[0] - 1
  batch = x_T.shape[0]
  x_T = x_T.astype(jnp.float32)
  if step_noise is not None and step_noise.shape != (num_steps,) + x_T.shape:
    raise ValueError(f'step_noise has shape {step_noise.shape}, expected '
                     f'{(num_steps,) + x_T.shape}')

  def step(carry, inputs):
    x_t, x0_prev, t_prev = carry
    index, t, s, key_or_noise = inputs
    t_B = jnp.full((batch,), t)
    s_B = jnp.full((batch,), s)
    x0_hat, eps_hat, variance_raw = denoise(
        denoise_fn, x_t, t_B, cond, schedule=schedule, parameterization=parameterization,
        learned_variance=learned_variance, threshold_fn=threshold_fn,
        grad_guidance_fn=None if guide_mean else grad_guidance_fn)
    noise = (jax.random.normal(key_or_noise, x_t.shape, jnp.float32) if step_noise is None
             else key_or_noise.astype(jnp.float32))
    last = x0_hat  # the final step lands on t = 0: the prediction itself, without noise
    if sampler == 'ddpm' and guide_mean and grad_guidance_fn is not None:
      mean, log_var = p_mean_variance(x_t, x0_hat, variance_raw, s_B, t_B, schedule=schedule,
                                      variance=variance)
      mean = mean + jnp.exp(log_var) * grad_guidance_fn(x_t, t_B, cond).astype(jnp.float32)
      x_s = mean + jnp.exp(0.5 * log_var) * noise
      last = mean  # at t = 0 the posterior mean is x0_hat; the guidance still shifts it
    elif sampler == 'ddpm':
      x_s = ddpm_step(x_t, x0_hat, variance_raw, s_B, t_B, noise, schedule=schedule,
                      variance=variance)
    elif sampler == 'ddim':
      x_s = ddim_step(x_t, x0_hat, eps_hat, s_B, t_B, noise, schedule=schedule, eta=eta)
    else:
      x_s = dpmpp_2m_step(x_t, x0_hat, x0_prev, s_B, t_B, jnp.full((batch,), t_prev),
                          index > 0, schedule=schedule)
    x_s = jnp.where(s <= 0.0, last, x_s)
    if progress_fn is not None:
      jax.debug.callback(progress_fn, index)  # unordered: ordered effects need 1 device
    return (x_s, x0_hat, t), (x0_hat if return_x0_trajectory else None)

  keys = jax.random.split(rng, num_steps) if step_noise is None else step_noise
  inputs = (jnp.arange(num_steps), times[:-1], times[1:], keys)
  (x_0, _, _), trajectory = jax.lax.scan(step, (x_T, jnp.zeros_like(x_T), times[0]), inputs)
  if return_x0_trajectory:
    return x_0, trajectory
  return x_0


@functools.partial(
    jax.jit,
    static_argnames=('denoise_fn', 'schedule', 'num_steps', 'spacing', 'parameterization',
                     'learned_variance', 'threshold', 'percentile', 'threshold_max',
                     'progress_fn'))
def ddim_invert(denoise_fn: Callable, x0, *, schedule, num_steps: int | None = None,
                spacing: str = 'time',
                cond=None,
                parameterization: str = 'eps', learned_variance: bool = False, threshold=None,
                percentile: float = 99.5, threshold_max: float = 0.0,
                progress_fn: Callable | None = None):
  """Deterministic DDIM inversion x_0 -> x_T (eta = 0), the reverse of sample(sampler='ddim').

  Walks the same time grid upwards; at each step the model is evaluated at the current,
  lower time and x moves along that prediction: x_t = alpha_t x0_hat(x_s) + sigma_t eps_hat(x_s).
  The error against exact inversion is first order in the step size and vanishes as
  num_steps grows.
  """
  threshold_fn = guidance.get_threshold_fn(threshold, percentile, threshold_max)
  times = jnp.asarray(schedule.timesteps(num_steps, spacing), jnp.float32)[::-1]  # 0 -> 1
  num_steps = times.shape[0] - 1
  batch = x0.shape[0]

  def step(x_s, inputs):
    index, s, t = inputs
    s_B = jnp.full((batch,), s)
    t_B = jnp.full((batch,), t)
    x0_hat, eps_hat, _ = denoise(
        denoise_fn, x_s, s_B, cond, schedule=schedule, parameterization=parameterization,
        learned_variance=learned_variance, threshold_fn=threshold_fn)
    alpha_t, sigma_t = schedule.alpha_sigma(t_B)
    x_t = process.bcast(alpha_t, x_s) * x0_hat + process.bcast(sigma_t, x_s) * eps_hat
    if progress_fn is not None:
      jax.debug.callback(progress_fn, index)  # unordered: ordered effects need 1 device
    return x_t, None

  inputs = (jnp.arange(num_steps), times[:-1], times[1:])
  x_T, _ = jax.lax.scan(step, x0.astype(jnp.float32), inputs)
  return x_T
