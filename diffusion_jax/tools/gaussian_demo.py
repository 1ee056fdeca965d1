r"""Samples Gaussian data with its exact denoiser: a network-free check of every sampler.

For x0 ~ N(mean, std^2) the optimal eps-prediction is known in closed form
(diffusion_jax.diffusion.analytic), so a correct sampler must return samples with that mean
and standard deviation. Prints one JSON line per sampler.

  python -m diffusion_jax.tools.gaussian_demo --schedule=cosine --num_steps=50
"""
from __future__ import annotations

import json
import time

from absl import app, flags
import jax
import numpy as np

from diffusion_jax.diffusion import analytic, samplers, schedules

_SCHEDULE = flags.DEFINE_enum('schedule', 'cosine', ['cosine', 'linear', 'squaredcos_cap_v2'],
                              'Noise schedule.')
_SAMPLERS = flags.DEFINE_list('samplers', list(samplers.SAMPLERS), 'Samplers to run.')
_NUM_STEPS = flags.DEFINE_integer('num_steps', 50, 'Model calls per sample.')
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 4096, 'Samples (each of --dim values).')
_DIM = flags.DEFINE_integer('dim', 64, 'Dimensions per sample.')
_MEAN = flags.DEFINE_float('mean', 0.5, 'Data mean.')
_STD = flags.DEFINE_float('std', 0.3, 'Data standard deviation.')
_ETA = flags.DEFINE_float('eta', 0.0, 'DDIM eta.')
_SEED = flags.DEFINE_integer('seed', 0, 'Random seed.')


def run(schedule_name, sampler, num_steps, *, num_samples=4096, dim=64, mean=0.5, std=0.3,
        eta=0.0, seed=0):
  schedule = schedules.get_schedule(schedule_name)
  denoiser = analytic.GaussianEpsDenoiser(schedule, mean, std)
  k_init, k_run = jax.random.split(jax.random.PRNGKey(seed))
  x_T = jax.random.normal(k_init, (num_samples, dim))
  start = time.perf_counter()
  x = np.asarray(samplers.sample(denoiser, x_T, k_run, schedule=schedule, sampler=sampler,
                                 num_steps=num_steps, eta=eta))
  return {
      'schedule': schedule_name, 'sampler': sampler, 'num_steps': num_steps, 'eta': eta,
      'mean': round(float(x.mean()), 5), 'std': round(float(x.std()), 5),
      'target_mean': mean, 'target_std': std,
      'rel_err_std': round(abs(float(x.std()) - std) / std, 5) if std else None,
      'seconds': round(time.perf_counter() - start, 3),
  }


def main(argv):
  del argv
  for sampler in _SAMPLERS.value:
    print(json.dumps(run(_SCHEDULE.value, sampler, _NUM_STEPS.value,
                         num_samples=_NUM_SAMPLES.value, dim=_DIM.value, mean=_MEAN.value,
                         std=_STD.value, eta=_ETA.value, seed=_SEED.value)), flush=True)


if __name__ == '__main__':
  app.run(main)
