r"""Samples Gaussian data with its exact denoiser: a network-free check of every sampler.

  python -m diffusion_jax.tools.gaussian_demo --schedule=cosine --num_steps=50

For x0 ~ N(mean, std^2) the optimal eps-prediction is known in closed form
(diffusion_jax.diffusion.analytic), so a correct sampler must return samples with that mean
and standard deviation. Prints one JSON line per sampler.
"""
from __future__ import annotations

import json
import time

from absl import flags

from diffusion_jax import cli

SCHEDULES = ('cosine', 'linear', 'squaredcos_cap_v2')


def define_flags(flag_values: flags.FlagValues = flags.FLAGS, sys_argv=None) -> None:
  del sys_argv
  fv = dict(flag_values=flag_values)
  flags.DEFINE_enum('schedule', 'cosine', SCHEDULES, 'Noise schedule.', **fv)
  flags.DEFINE_list('samplers', None, 'Samplers to run (default: every one of '
                    'diffusion_jax.diffusion.samplers.SAMPLERS: ddpm, ddim, dpmpp_2m, ...).',
                    **fv)
  flags.DEFINE_integer('num_steps', 50, 'Model calls per sample.', **fv)
  flags.DEFINE_integer('num_samples', 4096, 'Samples (each of --dim values).', **fv)
  flags.DEFINE_integer('dim', 64, 'Dimensions per sample.', **fv)
  flags.DEFINE_float('mean', 0.5, 'Data mean.', **fv)
  flags.DEFINE_float('std', 0.3, 'Data standard deviation.', **fv)
  flags.DEFINE_float('eta', 0.0, 'DDIM eta.', **fv)
  flags.DEFINE_integer('seed', 0, 'Random seed.', **fv)


def run(schedule_name, sampler, num_steps, *, num_samples=4096, dim=64, mean=0.5, std=0.3,
        eta=0.0, seed=0):
  import jax
  import numpy as np
  from diffusion_jax.diffusion import analytic, samplers, schedules
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


def main(argv, F: flags.FlagValues = flags.FLAGS):
  del argv
  from diffusion_jax.diffusion import samplers, schedules
  names = F.samplers or list(samplers.SAMPLERS)
  unknown = [n for n in names if n not in samplers.SAMPLERS]
  if unknown:
    raise cli.CLIError(f'--samplers: unknown {", ".join(unknown)}; the samplers are '
                       f'{", ".join(samplers.SAMPLERS)}')
  for name, least in (('num_steps', 1), ('num_samples', 1), ('dim', 1), ('std', 0.0),
                      ('eta', 0.0)):
    if not F[name].value >= least:
      raise cli.CLIError(f'--{name}={F[name].value}: must be at least {least}')
  timesteps = schedules.DEFAULT_NUM_TIMESTEPS
  if F.schedule in schedules.DISCRETE_SCHEDULES and F.num_steps > timesteps:
    raise cli.CLIError(f'--num_steps={F.num_steps}: must be at most the {timesteps} '
                       f'timesteps of the {F.schedule} schedule')
  for sampler in names:
    print(json.dumps(run(F.schedule, sampler, F.num_steps, num_samples=F.num_samples,
                         dim=F.dim, mean=F.mean, std=F.std, eta=F.eta, seed=F.seed)),
          flush=True)


if __name__ == '__main__':
  define_flags()
  cli.run(main)
