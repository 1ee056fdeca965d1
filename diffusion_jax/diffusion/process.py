"""The forward process and conversions between parameterisations.

x_t = alpha_t x_0 + sigma_t eps, with (alpha_t, sigma_t) from a schedule. All functions take
per-example times `t_B` (shape [B]) and broadcast them over the remaining axes of `x`.

For s < t, the forward posterior q(x_s | x_t, x_0) (DDPM eq. 6-7, written with the log-SNR
lambda so that it holds for any spacing of s and t):
  c        = 1 - exp(lambda_t - lambda_s)
  mean     = alpha_s * ((1 - c) * x_t / alpha_t + c * x_0)
  variance = sigma_s^2 * c                     (DDPM's beta-tilde)
and the variance of q(x_t | x_s), DDPM's beta, is 1 - alpha_t^2 / alpha_s^2.
"""
from __future__ import annotations

import jax.numpy as jnp

PARAMETERIZATIONS = ('eps', 'x0', 'v')


def bcast(v_B, x):
  """Reshapes a per-example [B] array to broadcast against x [B, ...]."""
  v_B = jnp.asarray(v_B)
  return v_B.reshape(v_B.shape + (1,) * (x.ndim - v_B.ndim))


def q_sample(x0, t_B, noise, schedule):
  alpha, sigma = schedule.alpha_sigma(t_B)
  return bcast(alpha, x0) * x0 + bcast(sigma, x0) * noise


def posterior_coefficients(s_B, t_B, schedule):
  """(coef_x0, coef_xt, variance, log_variance) of q(x_s | x_t, x_0), each [B]."""
  logsnr_s, logsnr_t = schedule.logsnr(s_B), schedule.logsnr(t_B)
  alpha_s, sigma_s = schedule.alpha_sigma(s_B)
  alpha_t, _ = schedule.alpha_sigma(t_B)
  c = -jnp.expm1(logsnr_t - logsnr_s)
  coef_x0 = alpha_s * c
  # 1 - c as exp(...) itself: near t = T (alpha_bar ~ 1e-9) 1 - c cancels to 0 in float32.
  coef_xt = alpha_s * jnp.exp(logsnr_t - logsnr_s) / alpha_t
  variance = sigma_s**2 * c
  # log(sigma_s^2) = log sigmoid(-logsnr_s), computed without underflow.
  log_variance = -jnp.logaddexp(0.0, logsnr_s) + jnp.log(c)
  return coef_x0, coef_xt, variance, log_variance


def posterior(x0, x_t, s_B, t_B, schedule):
  """Mean, variance and log-variance of q(x_s | x_t, x_0); variances are [B]."""
  coef_x0, coef_xt, variance, log_variance = posterior_coefficients(s_B, t_B, schedule)
  mean = bcast(coef_x0, x0) * x0 + bcast(coef_xt, x_t) * x_t
  return mean, variance, log_variance


def forward_log_variance(s_B, t_B, schedule):
  """log of DDPM's beta between s and t: log(1 - alpha_t^2 / alpha_s^2), i.e. of q(x_t|x_s)."""
  logsnr_s, logsnr_t = schedule.logsnr(s_B), schedule.logsnr(t_B)
  # log alpha^2 = log sigmoid(logsnr) = -softplus(-logsnr).
  log_alpha2_ratio = -jnp.logaddexp(0.0, -logsnr_t) + jnp.logaddexp(0.0, -logsnr_s)
  return jnp.log(-jnp.expm1(log_alpha2_ratio))


def learned_log_variance(frac_raw, s_B, t_B, schedule, t_next_B=None):
  """Improved DDPM's learned variance: interpolate log beta and log beta-tilde.

  `frac_raw` is the network's variance output in [-1, 1] (v = (frac_raw + 1) / 2), with the
  shape of x; -1 gives the posterior variance beta-tilde, +1 the forward variance beta.
  At s = 0 beta-tilde is 0 (or the clipping's tiny value), so there, as improved DDPM's
  `posterior_log_variance_clipped`, the lower end is beta-tilde of the next step up,
  (t, t_next); `t_next_B` defaults to 2 t - s, the next point of a uniform grid.
  """
  _, _, _, log_beta_tilde = posterior_coefficients(s_B, t_B, schedule)
  if t_next_B is None:
    t_next_B = 2.0 * t_B - s_B
  _, _, _, log_beta_tilde_next = posterior_coefficients(t_B, t_next_B, schedule)
  log_beta_tilde = jnp.where(s_B <= 0.0, log_beta_tilde_next, log_beta_tilde)
  log_beta = forward_log_variance(s_B, t_B, schedule)
  frac = (frac_raw + 1.0) / 2.0
  return frac * bcast(log_beta, frac_raw) + (1.0 - frac) * bcast(log_beta_tilde, frac_raw)


# Conversions. Each takes x_t and per-example alpha/sigma [B].

def x0_from_eps(x_t, eps, alpha_B, sigma_B):
  return (x_t - bcast(sigma_B, x_t) * eps) / bcast(alpha_B, x_t)


def eps_from_x0(x_t, x0, alpha_B, sigma_B):
  return (x_t - bcast(alpha_B, x_t) * x0) / bcast(sigma_B, x_t)


def v_from_x0_eps(x0, eps, alpha_B, sigma_B):
  return bcast(alpha_B, x0) * eps - bcast(sigma_B, x0) * x0


def x0_from_v(x_t, v, alpha_B, sigma_B):
  return bcast(alpha_B, x_t) * x_t - bcast(sigma_B, x_t) * v


def eps_from_v(x_t, v, alpha_B, sigma_B):
  return bcast(sigma_B, x_t) * x_t + bcast(alpha_B, x_t) * v


def check_parameterization(parameterization: str) -> str:
  if parameterization not in PARAMETERIZATIONS:
    raise ValueError(f'parameterization {parameterization!r} is not one of {PARAMETERIZATIONS}')
  return parameterization


def predict_x0_eps(output, x_t, t_B, schedule, parameterization: str):
  """Turns a model output (eps, x0 or v) into the pair (x0_hat, eps_hat)."""
  alpha, sigma = schedule.alpha_sigma(t_B)
  check_parameterization(parameterization)
  if parameterization == 'eps':
    return x0_from_eps(x_t, output, alpha, sigma), output
  if parameterization == 'x0':
    return output, eps_from_x0(x_t, output, alpha, sigma)
  return x0_from_v(x_t, output, alpha, sigma), eps_from_v(x_t, output, alpha, sigma)


def target(x0, noise, t_B, schedule, parameterization: str):
  """The regression target of a parameterisation."""
  check_parameterization(parameterization)
  if parameterization == 'eps':
    return noise
  if parameterization == 'x0':
    return x0
  alpha, sigma = schedule.alpha_sigma(t_B)
  return v_from_x0_eps(x0, noise, alpha, sigma)
