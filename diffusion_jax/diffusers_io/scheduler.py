"""A diffusers `scheduler_config.json` as our `diffusion` and `sampler` config sections.

diffusers keeps in one scheduler what this library splits in two: the noise process (betas,
what the network predicts, whether it learns its variance) is the stage's `diffusion`
section, and how it samples (ancestral or DDIM steps, their spacing, thresholding) is its
`sampler` section. Every field that changes the arithmetic is mapped or refused with a line
saying so; none is dropped silently.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping

import numpy as np

from diffusion_jax import convert, errors
from diffusion_jax.diffusion import schedules

SAMPLER_OF = {'DDPMScheduler': 'ddpm', 'UnCLIPScheduler': 'ddpm', 'DDIMScheduler': 'ddim'}
PARAMETERIZATION_OF = {'epsilon': 'eps', 'sample': 'x0', 'v_prediction': 'v'}
# The variance of an ancestral step: the posterior's ('small') or the network's.
LEARNED_VARIANCE_OF = {'fixed_small': False, 'fixed_small_log': False, 'learned_range': True}
LOGSNR_BOUNDS = (-schedules.WIDE_LOGSNR, schedules.WIDE_LOGSNR)  # no clipping of the betas'


def _refuse(where: str, field: str, value, what_to_do: str):
  raise errors.InputError(f'{where}: {field}={value!r} is not supported; {what_to_do}')


def sibling_num_timesteps(folder: str, scheduler: str = 'scheduler') -> int:
  """num_train_timesteps of the scheduler folder beside a pipeline component's `folder`
  (../<scheduler>/scheduler_config.json), else diffusers' default 1000."""
  where = os.path.join(os.path.dirname(os.path.abspath(folder)), scheduler,
                       'scheduler_config.json')
  if not os.path.exists(where):
    return 1000
  return convert.read_json_object(where).get('num_train_timesteps', 1000)


def diffusion_section(config: Mapping[str, Any], where: str = 'scheduler_config.json'
                      ) -> dict[str, Any]:
  """Our `diffusion` section (noise process and parameterisation) of a scheduler config."""
  cls = str(config.get('_class_name', 'DDPMScheduler'))
  if cls not in SAMPLER_OF:
    _refuse(where, '_class_name', cls, f'use one of {", ".join(sorted(SAMPLER_OF))}')
  if config.get('trained_betas') is not None:
    _refuse(where, 'trained_betas', '[...]', 'give beta_schedule linear or squaredcos_cap_v2')
  if config.get('rescale_betas_zero_snr'):
    _refuse(where, 'rescale_betas_zero_snr', True, 'zero terminal SNR is not implemented')
  schedule = str(config.get('beta_schedule', 'squaredcos_cap_v2' if cls == 'UnCLIPScheduler'
                            else 'linear'))
  if schedule not in schedules.DISCRETE_SCHEDULES:
    _refuse(where, 'beta_schedule', schedule,
            f'use one of {", ".join(schedules.DISCRETE_SCHEDULES)}')
  prediction = str(config.get('prediction_type', 'epsilon'))
  if prediction not in PARAMETERIZATION_OF:
    _refuse(where, 'prediction_type', prediction,
            f'use one of {", ".join(PARAMETERIZATION_OF)}')
  variance = str(config.get('variance_type', 'fixed_small'))
  if cls in ('DDPMScheduler', 'UnCLIPScheduler') and variance not in LEARNED_VARIANCE_OF:
    _refuse(where, 'variance_type', variance, f'use one of {", ".join(LEARNED_VARIANCE_OF)}')
  section = dict(schedule=schedule, num_timesteps=int(config.get('num_train_timesteps', 1000)),
                 shift=1.0, logsnr_min=LOGSNR_BOUNDS[0], logsnr_max=LOGSNR_BOUNDS[1],
                 parameterization=PARAMETERIZATION_OF[prediction],
                 learned_variance=LEARNED_VARIANCE_OF.get(variance, False),
                 vlb_weight=0.001 if LEARNED_VARIANCE_OF.get(variance) else 0.0,
                 loss_weighting='none', cond_drop_text=0.1, cond_drop_image=0.0,
                 noise_aug=False)
  if schedule in ('linear', 'scaled_linear'):
    section.update(beta_start=float(config.get('beta_start', 1e-4)),
                   beta_end=float(config.get('beta_end', 0.02)))
  return section


def sampler_section(config: Mapping[str, Any], num_steps: int,
                    where: str = 'scheduler_config.json') -> dict[str, Any]:
  """Our `sampler` section of a scheduler config: the sampler, the time grid, thresholding."""
  diffusion_section(config, where)  # the same refusals
  cls = str(config.get('_class_name', 'DDPMScheduler'))
  s = dict(name=SAMPLER_OF[cls], num_steps=int(num_steps), eta=0.0, guidance_scale=1.0,
           threshold='none', percentile=99.5, threshold_max=0.0, aug_level=0.0)
  if cls == 'UnCLIPScheduler':
    s['spacing'] = 'linspace'  # round(k (T - 1) / (N - 1)), k = N-1 .. 0
  else:
    spacing = str(config.get('timestep_spacing', 'leading'))
    if spacing not in schedules.DIFFUSERS_SPACINGS:
      _refuse(where, 'timestep_spacing', spacing,
              f'use one of {", ".join(schedules.DIFFUSERS_SPACINGS)}')
    # diffusers offsets only the leading grid (released SD configs keep steps_offset 1 when
    # switched to trailing/linspace).
    offset = int(config.get('steps_offset', 0) or 0) if spacing == 'leading' else 0
    s['spacing'] = f'leading+{offset}' if offset else spacing
  if cls == 'DDIMScheduler':
    if not config.get('set_alpha_to_one', True):
      _refuse(where, 'set_alpha_to_one', False, 'our DDIM lands its last step on t = 0')
    if s['spacing'].split('+')[0] != 'leading':
      # diffusers' DDIM steps from t to t - T // N whatever the grid; only 'leading' is a chain.
      _refuse(where, 'timestep_spacing', s['spacing'], 'DDIM here needs leading spacing')
    if config.get('thresholding') or config.get('clip_sample', True):
      # diffusers' DDIM moves along the unclipped eps, ours along the clipped x0's.
      _refuse(where, 'clip_sample/thresholding', True, 'set both false for DDIM (or use DDPM)')
  if config.get('thresholding'):
    s.update(threshold='dynamic',
             percentile=100.0 * float(config.get('dynamic_thresholding_ratio', 0.995)),
             threshold_max=float(config.get('sample_max_value', 1.0)))
  elif config.get('clip_sample', True):  # diffusers' default in all three
    s.update(threshold='static', threshold_max=float(config.get('clip_sample_range', 1.0)))
  return s


# Our sections back to a diffusers scheduler config (`diffusion_section`/`sampler_section`'s
# inverse) ---------------------------------------------------------------------------------------

SCHEDULER_OF = {'ddpm': 'DDPMScheduler', 'ddim': 'DDIMScheduler'}
PREDICTION_OF = {ours: theirs for theirs, ours in PARAMETERIZATION_OF.items()}


def _our_spacing(sampler: Mapping[str, Any]) -> str:
  return str(sampler.get('spacing') or 'time')


def scheduler_config(diffusion: Mapping[str, Any], sampler: Mapping[str, Any],
                     where: str = 'stage config') -> dict[str, Any]:
  """The diffusers scheduler config of our `diffusion` and `sampler` sections; one-line
  errors.InputError for what a diffusers scheduler cannot express (continuous time, clipped
  log-SNR, other samplers or spacings)."""
  schedule = str(diffusion.get('schedule'))
  num_timesteps = int(diffusion.get('num_timesteps') or 0)
  if schedule not in schedules.DISCRETE_SCHEDULES or num_timesteps < 1:
    _refuse(where, 'diffusion.schedule', schedule,
            'diffusers schedulers are discrete: train with schedule linear or '
            'squaredcos_cap_v2 and num_timesteps >= 1')
  ours = schedules.from_config(dict(diffusion))
  unclipped = schedules.get_schedule(
      schedule, num_timesteps=num_timesteps, logsnr_min=LOGSNR_BOUNDS[0],
      logsnr_max=LOGSNR_BOUNDS[1], **({k: diffusion[k] for k in ('beta_start', 'beta_end')
                                       if diffusion.get(k) is not None}
                                      if schedule in ('linear', 'scaled_linear') else {}))
  if not (ours.logsnr_grid()[1:] == unclipped.logsnr_grid()[1:]).all():
    _refuse(where, 'diffusion.logsnr_min/logsnr_max',
            (diffusion.get('logsnr_min'), diffusion.get('logsnr_max')),
            f'they clip the betas\' log-SNR; diffusers does not: use {LOGSNR_BOUNDS}')
  parameterization = str(diffusion.get('parameterization', 'eps'))
  if parameterization not in PREDICTION_OF:
    _refuse(where, 'diffusion.parameterization', parameterization,
            f'use one of {", ".join(PREDICTION_OF)}')
  name = str(sampler.get('name', 'ddpm'))
  if name not in SCHEDULER_OF:
    _refuse(where, 'sampler.name', name, f'use one of {", ".join(SCHEDULER_OF)}')
  spacing = _our_spacing(sampler)
  if spacing == 'time':  # evenly spaced in t from t = 1: diffusers' 'trailing'
    spacing = 'trailing'
  match = re.fullmatch(r'leading\+(\d+)', spacing)
  offset = int(match.group(1)) if match else 0
  base_spacing = 'leading' if match else spacing
  if base_spacing not in schedules.DIFFUSERS_SPACINGS:
    _refuse(where, 'sampler.spacing', spacing,
            f'use one of {", ".join(schedules.DIFFUSERS_SPACINGS)} (or time, leading+N)')
  num_steps = int(sampler.get('num_steps') or 0)
  if num_steps >= 1:  # the same model calls as our chain, else refused
    want = ours.timesteps(num_steps, _our_spacing(sampler))
    theirs = schedules.diffusers_timesteps(num_timesteps, num_steps, base_spacing, offset)
    if not (np.round(want[:-1] * num_timesteps).astype(np.int64) - 1
            == theirs[::-1]).all():
      _refuse(where, 'sampler.spacing', _our_spacing(sampler),
              f'its {num_steps} steps differ from diffusers\' {base_spacing} grid')
  config: dict[str, Any] = {
      '_class_name': SCHEDULER_OF[name], 'num_train_timesteps': num_timesteps,
      'beta_schedule': schedule, 'prediction_type': PREDICTION_OF[parameterization],
      'timestep_spacing': base_spacing, 'steps_offset': offset, 'trained_betas': None,
      'rescale_betas_zero_snr': False, 'clip_sample': False, 'thresholding': False,
      'clip_sample_range': 1.0, 'dynamic_thresholding_ratio': 0.995, 'sample_max_value': 1.0,
  }
  if schedule in ('linear', 'scaled_linear'):
    config.update(beta_start=float(diffusion.get('beta_start') or 1e-4),
                  beta_end=float(diffusion.get('beta_end') or 0.02))
  learned = bool(diffusion.get('learned_variance'))
  if name == 'ddpm':
    config['variance_type'] = 'learned_range' if learned else 'fixed_small'
  else:
    if float(sampler.get('eta') or 0.0) != 0.0:
      _refuse(where, 'sampler.eta', sampler.get('eta'), "diffusers' IF pipelines run DDIM "
              'with eta 0')
    if base_spacing != 'leading':
      _refuse(where, 'sampler.spacing', spacing, 'DDIM here needs leading spacing')
    config.update(set_alpha_to_one=True,
                  variance_type='learned_range' if learned else 'fixed_small')
  threshold = str(sampler.get('threshold', 'none'))
  threshold_max = float(sampler.get('threshold_max') or 0.0)
  if threshold == 'dynamic':
    if name == 'ddim':
      _refuse(where, 'sampler.threshold', threshold, 'set none for DDIM (or use DDPM)')
    # No cap (threshold_max 0): the largest float32 never binds.
    config.update(thresholding=True,
                  dynamic_thresholding_ratio=float(sampler.get('percentile', 99.5)) / 100.0,
                  sample_max_value=threshold_max or float(np.finfo(np.float32).max))
  elif threshold == 'static':
    if name == 'ddim':
      _refuse(where, 'sampler.threshold', threshold, 'set none for DDIM (or use DDPM)')
    config.update(clip_sample=True, clip_sample_range=threshold_max or 1.0)
  elif threshold != 'none':
    _refuse(where, 'sampler.threshold', threshold, 'use none, static or dynamic')
  return config
