"""A diffusers `scheduler_config.json` as our `diffusion` and `sampler` config sections.

diffusers keeps in one scheduler what this library splits in two: the noise process (betas,
what the network predicts, whether it learns its variance) is the stage's `diffusion`
section, and how it samples (ancestral or DDIM steps, their spacing, thresholding) is its
`sampler` section. Every field that changes the arithmetic is mapped or refused with a line
saying so; none is dropped silently.
"""
from __future__ import annotations

from typing import Any, Mapping

from diffusion_jax import errors
from diffusion_jax.diffusion import schedules

SAMPLER_OF = {'DDPMScheduler': 'ddpm', 'UnCLIPScheduler': 'ddpm', 'DDIMScheduler': 'ddim'}
PARAMETERIZATION_OF = {'epsilon': 'eps', 'sample': 'x0', 'v_prediction': 'v'}
# The variance of an ancestral step: the posterior's ('small') or the network's.
LEARNED_VARIANCE_OF = {'fixed_small': False, 'fixed_small_log': False, 'learned_range': True}
LOGSNR_BOUNDS = (-schedules.WIDE_LOGSNR, schedules.WIDE_LOGSNR)  # no clipping of the betas'


def _refuse(where: str, field: str, value, what_to_do: str):
  raise errors.InputError(f'{where}: {field}={value!r} is not supported; {what_to_do}')


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
  if schedule == 'linear':
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
    offset = int(config.get('steps_offset', 0) or 0)
    if offset and spacing != 'leading':
      _refuse(where, 'steps_offset', offset, 'only leading spacing is offset')
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
