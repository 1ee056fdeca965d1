"""diffusers_io.scheduler: a released scheduler_config.json drives our samplers to diffusers'
own scheduler loop, step for step, with the same model outputs and noise."""
import numpy as np
import pytest
import torch

import jax.numpy as jnp

from diffusion_jax import errors
from diffusion_jax.diffusers_io import scheduler as dio_scheduler
from diffusion_jax.diffusion import guidance, samplers, schedules

diffusers = pytest.importorskip('diffusers')

# The released pipelines' schedulers (DeepFloyd IF stage I and II; Karlo's prior, decoder,
# super-resolution) and the DDIM of latent pipelines.
IF_I = dict(_class_name='DDPMScheduler', beta_schedule='squaredcos_cap_v2', clip_sample=True,
            dynamic_thresholding_ratio=0.95, num_train_timesteps=1000,
            prediction_type='epsilon', sample_max_value=1.5, thresholding=True,
            variance_type='learned_range')
KARLO_PRIOR = dict(_class_name='UnCLIPScheduler', clip_sample=True, clip_sample_range=5.0,
                   num_train_timesteps=1000, prediction_type='sample',
                   variance_type='fixed_small_log')
KARLO_DECODER = dict(_class_name='UnCLIPScheduler', clip_sample=True, clip_sample_range=1.0,
                     num_train_timesteps=1000, prediction_type='epsilon',
                     variance_type='learned_range')
KARLO_SR = dict(KARLO_DECODER, variance_type='fixed_small_log')
DDIM_LATENT = dict(_class_name='DDIMScheduler', beta_schedule='linear', beta_start=0.00085,
                   beta_end=0.012, clip_sample=False, set_alpha_to_one=True, steps_offset=1,
                   prediction_type='epsilon')
DDPM_V_LINSPACE = dict(_class_name='DDPMScheduler', beta_schedule='linear',
                       prediction_type='v_prediction', timestep_spacing='linspace',
                       clip_sample=False)


def _fake_output(x, k, learned_variance, lib):
  """A smooth stand-in network: the same function of (x_t, integer step) in torch and jax."""
  mean = lib.tanh(0.7 * x + 0.3 * k / 1000.0 - 0.1) * 1.3
  if not learned_variance:
    return mean
  var = lib.tanh(0.5 * x - 0.2 + k / 1000.0)
  return lib.concatenate([mean, var], -1) if lib is jnp else torch.cat([mean, var], 1)


def _diffusers_loop(config, num_steps, x_T_BHWC, noise_NBHWC, learned_variance):
  cls = getattr(diffusers, config['_class_name'])
  sched = cls.from_config({k: v for k, v in config.items() if k != '_class_name'})
  sched.set_timesteps(num_steps)
  # Its own betas, the rest in float64: in float32 its tables cancel (1 - alpha_bar_0 against
  # beta_0 is off by 1e-3 at t = 0, 1 - beta at t = 999 is noise).
  sched.betas = sched.betas.double()
  sched.alphas = 1.0 - sched.betas
  sched.alphas_cumprod = torch.cumprod(sched.alphas, 0)
  sched.one = torch.tensor(1.0, dtype=torch.float64)
  if hasattr(sched, 'final_alpha_cumprod'):  # DDIM's set_alpha_to_one
    sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
  draws = [torch.from_numpy(n.transpose(0, 3, 1, 2).astype(np.float64)) for n in noise_NBHWC]
  module = __import__(type(sched).__module__, fromlist=['randn_tensor'])
  real = module.randn_tensor
  module.randn_tensor = lambda shape, **kw: draws.pop(0)
  try:
    x = torch.from_numpy(x_T_BHWC.transpose(0, 3, 1, 2).astype(np.float64))
    timesteps = list(sched.timesteps)
    for i, t in enumerate(timesteps):
      out = _fake_output(x, float(t), learned_variance, torch)
      kw = {}
      if config['_class_name'] == 'UnCLIPScheduler':
        kw['prev_timestep'] = None if i + 1 == len(timesteps) else timesteps[i + 1]
      x = sched.step(out, t, x, **kw).prev_sample
  finally:
    module.randn_tensor = real
  return x.numpy().transpose(0, 2, 3, 1).astype(np.float32), [int(t) for t in timesteps]


@pytest.mark.parametrize('config, num_steps', [
    (IF_I, 10), (IF_I, 7), (KARLO_PRIOR, 6), (KARLO_DECODER, 5), (KARLO_SR, 4),
    (DDIM_LATENT, 8), (DDPM_V_LINSPACE, 6)])
def test_scheduler_config_samples_as_diffusers_does(config, num_steps):
  diffusion = dio_scheduler.diffusion_section(config)
  sampler = dio_scheduler.sampler_section(config, num_steps)
  schedule = schedules.from_config(diffusion)
  T = diffusion['num_timesteps']
  learned = diffusion['learned_variance']
  grid = schedule.timesteps(num_steps, sampler['spacing'])
  rng = np.random.default_rng(num_steps)
  x_T = rng.normal(size=(2, 8, 8, 3)).astype(np.float32) * 1.5
  noise = rng.normal(size=(num_steps, 2, 8, 8, 3)).astype(np.float32)
  want, timesteps = _diffusers_loop(config, num_steps, x_T, noise, learned)
  assert [int(round(float(t) * T)) - 1 for t in grid[:-1]] == timesteps, \
      'the same integer timesteps as the scheduler'

  def denoise(x_t, t_B, cond):
    k = jnp.round(t_B * T) - 1.0
    return _fake_output(x_t, k[:, None, None, None], learned, jnp)
  got = samplers.sample(
      denoise, jnp.asarray(x_T), None, schedule=schedule, sampler=sampler['name'],
      num_steps=num_steps, spacing=sampler['spacing'], eta=sampler['eta'],
      parameterization=diffusion['parameterization'], learned_variance=learned,
      threshold=sampler['threshold'], percentile=sampler['percentile'],
      threshold_max=sampler['threshold_max'], step_noise=jnp.asarray(noise))
  scale = max(1.0, float(np.abs(want).max()))
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-4 * scale, rtol=0)


def test_thresholds_clip_where_diffusers_does():
  spread_B111 = np.array([0.5, 2.0, 9.0])[:, None, None, None]
  x0 = (np.random.default_rng(0).normal(size=(3, 4, 4, 3)) * spread_B111).astype(np.float32)
  sched = diffusers.DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.95,
                                  sample_max_value=1.5)
  want = sched._threshold_sample(torch.from_numpy(x0.transpose(0, 3, 1, 2).copy()))
  got = guidance.get_threshold_fn('dynamic', 95.0, 1.5)(jnp.asarray(x0))
  np.testing.assert_allclose(np.asarray(got), want.numpy().transpose(0, 2, 3, 1), atol=1e-6)
  uncapped = guidance.get_threshold_fn('dynamic', 95.0)(jnp.asarray(x0))
  assert float(jnp.abs(uncapped[2]).max()) == pytest.approx(1.0, abs=1e-6) and not np.allclose(
      uncapped, got), "without the cap s follows the 95th percentile (Imagen's rule)"
  clipped = guidance.get_threshold_fn('static', 99.5, 5.0)(jnp.asarray(x0))
  np.testing.assert_array_equal(np.asarray(clipped), np.clip(x0, -5, 5))
  with pytest.raises(ValueError, match='cap >= 1'):
    guidance.dynamic_threshold(jnp.asarray(x0), 95.0, 0.5)


@pytest.mark.parametrize('change, field', [
    (dict(beta_schedule='sigmoid'), 'beta_schedule'),
    (dict(_class_name='EulerDiscreteScheduler'), '_class_name'),
    (dict(variance_type='fixed_large'), 'variance_type'),
    (dict(prediction_type='flow_prediction'), 'prediction_type'),
    (dict(trained_betas=[0.1] * 1000), 'trained_betas'),
    (dict(timestep_spacing='karras'), 'timestep_spacing'),
])
def test_unsupported_scheduler_fields_are_refused_in_one_line(change, field):
  with pytest.raises(errors.InputError) as e:
    dio_scheduler.sampler_section(dict(IF_I, **change), 10, where='x/scheduler_config.json')
  message = str(e.value)
  assert '\n' not in message and message.startswith('x/scheduler_config.json: ' + field)


@pytest.mark.parametrize('spacing, offset, ours', [
    ('linspace', 0, 'dpm_linspace'), ('leading', 0, 'dpm_leading'),
    ('leading', 1, 'dpm_leading+1'), ('trailing', 0, 'trailing')])
def test_dpm_solver_grids_are_diffusers(spacing, offset, ours):
  """DPMSolverMultistepScheduler takes n of n + 1 linspace/leading points: our 'dpm_'
  spacings pick its timesteps exactly, the plain ones do not."""
  for n in (1, 7, 8, 25, 50, 100):
    ref = diffusers.DPMSolverMultistepScheduler(timestep_spacing=spacing, steps_offset=offset)
    ref.set_timesteps(n)
    want = np.sort(ref.timesteps.numpy())
    np.testing.assert_array_equal(schedules.integer_timesteps(1000, n, ours), want)
  if ours.startswith('dpm_'):
    plain = ours[len('dpm_'):]
    assert not np.array_equal(schedules.integer_timesteps(1000, 8, plain),
                              schedules.integer_timesteps(1000, 8, ours))


def test_ddim_that_diffusers_steps_differently_is_refused():
  for change in (dict(clip_sample=True), dict(timestep_spacing='trailing', steps_offset=0),
                 dict(set_alpha_to_one=False)):
    with pytest.raises(errors.InputError):
      dio_scheduler.sampler_section(dict(DDIM_LATENT, **change), 10)
