"""Exact denoisers for data whose posterior is known in closed form.

For Gaussian data x0 ~ N(m, s^2 I), x_t = alpha x0 + sigma eps is Gaussian too and the
optimal eps-prediction is E[eps | x_t] = sigma (x_t - alpha m) / (alpha^2 s^2 + sigma^2).
Sampling with it must reproduce N(m, s^2); s = 0 is a point mass at m. The tests and the
Gaussian demo use these to check the samplers end to end without a network.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from diffusion_jax.diffusion import process


@dataclasses.dataclass(frozen=True)
class GaussianEpsDenoiser:
  """Hashable (a static jit argument): `denoiser(x_t, t_B, cond) -> eps_hat`."""
  schedule: object
  mean: float
  std: float

  def __call__(self, x_t, t_B, cond=None):
    alpha, sigma = self.schedule.alpha_sigma(t_B)
    alpha, sigma = process.bcast(alpha, x_t), process.bcast(sigma, x_t)
    return sigma * (x_t - alpha * self.mean) / (alpha**2 * self.std**2 + sigma**2)
