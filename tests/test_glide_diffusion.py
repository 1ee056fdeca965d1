"""Equal outputs with glide-text2im's diffusion (respacing, p_mean_variance, DDIM and DDPM
chains), guided-diffusion's hybrid loss and diffusers' timestep spacings, on a fixed analytic
stand-in model. The reference numbers are in fixtures/glide_diffusion_reference.npz, written
by fixtures/make_glide_diffusion_reference.py (which says how to rerun it); nothing here
imports those projects.

Converted GLIDE configs use log-SNR bounds of +-WIDE_LOGSNR: the default [-15, 15] clips the
cosine schedule's last step (-19.8) and its clean end (+inf); a test below shows that a chain
starting at that last step then misses glide's result.
"""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.diffusion import guidance, losses, process, samplers, schedules

REF = np.load(os.path.join(os.path.dirname(__file__), 'fixtures',
                           'glide_diffusion_reference.npz'))
T = 1000
WIDE = dict(logsnr_min=-schedules.WIDE_LOGSNR, logsnr_max=schedules.WIDE_LOGSNR)
SCHEDULE_NAMES = ('squaredcos_cap_v2', 'linear')
RESPACINGS = ('1000', '100', 'fast27', 'ddim25')


@functools.lru_cache(maxsize=None)
def _schedule(name, num_timesteps=T, wide=True):
  return schedules.get_schedule(name, num_timesteps=num_timesteps, **(WIDE if wide else {}))


def _stand_in(x_BHWC, t_B, num_timesteps=T):
  """The fixture's model (eps, variance in [-1, 1]) at glide's step k = T t - 1, in NHWC."""
  k = (jnp.round(t_B * num_timesteps) - 1.0).reshape(-1, 1, 1, 1)
  c = jnp.arange(3, dtype=jnp.float32).reshape(1, 1, 1, 3)
  x_next = jnp.roll(x_BHWC, -1, axis=-1)
  eps = jnp.tanh(0.8 * x_BHWC - 0.3 * x_next + 0.25 * jnp.sin(0.013 * k + c))
  var = jnp.sin(0.9 * x_BHWC + 0.004 * k + 0.7 * c)
  return jnp.concatenate([eps, var], axis=-1)


def _denoise_fn(x_t, t_B, cond):
  del cond
  return _stand_in(x_t, t_B)


def _rel_err(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(ours - ref)) / max(1.0, np.max(np.abs(ref))))


# --- timesteps ---------------------------------------------------------------------------


def test_glide_respacing_strings_pick_glides_timesteps():
  for i, spacing in enumerate(REF['glide_strings']):
    np.testing.assert_array_equal(schedules.glide_timesteps(T, str(spacing)),
                                  REF[f'glide_steps_{i}'], err_msg=str(spacing))


def test_diffusers_spacings_pick_diffusers_timesteps():
  for i, (spacing, offset, n) in enumerate(zip(REF['diffusers_spacing'], REF['diffusers_offset'],
                                               REF['diffusers_n'])):
    name = str(spacing) + (f'+{offset}' if offset else '')
    np.testing.assert_array_equal(schedules.integer_timesteps(T, int(n), name),
                                  REF[f'diffusers_steps_{i}'], err_msg=f'{name} n={n}')


def test_integer_spacing_grid_visits_t_k_plus_1_over_T():
  sched = _schedule('squaredcos_cap_v2')
  times = sched.timesteps(None, 'fast27')
  steps = schedules.glide_timesteps(T, 'fast27')
  np.testing.assert_allclose(times, np.concatenate([(steps[::-1] + 1) / T, [0.0]]))
  assert times[0] == pytest.approx(0.998) and len(times) == 28  # fast27 starts at k = 997
  np.testing.assert_allclose(sched.timesteps(10, 'trailing')[:2], [1.0, 0.9])
  np.testing.assert_allclose(sched.timesteps(10, 'leading+1')[:2], [0.902, 0.802])


@pytest.mark.parametrize('num_steps, spacing, match', [
    (50, '100', 'gives 100 steps'),
    (None, 'trailing', 'needs 1 <= num_steps'),
    (1000, 'leading+1', 'leaves the 1000 timesteps'),
    (None, 'ddim1', 'no integer stride'),
    (None, '10,abc', 'unknown spacing'),
    (None, '2000', 'cannot hold'),
])
def test_integer_spacing_errors(num_steps, spacing, match):
  with pytest.raises(ValueError, match=match):
    _schedule('linear').timesteps(num_steps, spacing)


def test_continuous_schedule_refuses_integer_spacings():
  with pytest.raises(ValueError, match='continuous'):
    schedules.get_schedule('cosine').timesteps(100, 'leading')
  with pytest.raises(ValueError, match='continuous'):
    samplers.sample(_denoise_fn, jnp.zeros((1, 3, 3, 3)), jax.random.PRNGKey(0),
                    schedule=schedules.get_schedule('cosine'), spacing='100')


# --- schedule values ---------------------------------------------------------------------


@pytest.mark.parametrize('name', SCHEDULE_NAMES)
def test_wide_bounds_give_glides_alphas_cumprod_at_every_step(name):
  ref = REF[f'alphas_cumprod_{name}']
  t = jnp.arange(1, T + 1, dtype=jnp.float32) / T
  alpha, sigma = _schedule(name).alpha_sigma(t)
  np.testing.assert_allclose(np.asarray(alpha, np.float64)**2, ref, rtol=2e-5)
  np.testing.assert_allclose(np.asarray(sigma, np.float64)**2, 1 - ref, rtol=2e-5)
  alpha0, sigma0 = _schedule(name).alpha_sigma(jnp.zeros(()))
  assert float(alpha0) == 1.0 and float(sigma0) < 1e-8  # the clean end: alphas_cumprod_prev = 1


def test_default_bounds_are_unchanged_and_miss_glides_last_step():
  ref = REF['alphas_cumprod_squaredcos_cap_v2']
  assert np.log(ref[-1] / (1 - ref[-1])) < -19.5  # beyond the default LOGSNR_MIN
  default = _schedule('squaredcos_cap_v2', wide=False)
  assert float(default.logsnr(jnp.ones(()))) == pytest.approx(schedules.LOGSNR_MIN)
  # A chain that starts at glide's step 999 then ends elsewhere: converted configs need WIDE.
  key = 'squaredcos_cap_v2_100'
  x0 = samplers.sample(_denoise_fn, jnp.asarray(REF[f'ddim_xT_{key}']), jax.random.PRNGKey(0),
                       schedule=default, sampler='ddim', spacing='100', learned_variance=True,
                       threshold='static')
  assert _rel_err(x0, REF[f'ddim_x0_{key}']) > 1e-3


# --- p_mean_variance, DDIM and DDPM chains -----------------------------------------------


@pytest.mark.parametrize('clip', [True, False])
@pytest.mark.parametrize('respacing', RESPACINGS)
@pytest.mark.parametrize('name', SCHEDULE_NAMES)
def test_p_mean_variance_equals_glide(name, respacing, clip):
  key = f'{name}_{respacing}'
  sched = _schedule(name)
  use = REF[f'use_{key}']
  np.testing.assert_array_equal(schedules.integer_timesteps(T, None, respacing), use)
  times = np.concatenate([[0.0], (use + 1) / T])  # times[j + 1]: respaced index j
  for row, (i, x) in enumerate(zip(REF[f'pmv_index_{key}'], REF[f'pmv_x_{key}'])):
    batch = x.shape[0]
    t_B, s_B = jnp.full((batch,), times[i + 1]), jnp.full((batch,), times[i])
    t_next_B = jnp.full((batch,), times[min(i + 2, len(times) - 1)])
    x0_hat, _, var_raw = samplers.denoise(
        _denoise_fn, jnp.asarray(x), t_B, None, schedule=sched, learned_variance=True,
        threshold_fn=guidance.static_threshold if clip else None)
    mean, log_var = samplers.p_mean_variance(jnp.asarray(x), x0_hat, var_raw, s_B, t_B,
                                             schedule=sched, variance='learned',
                                             t_next_B=t_next_B)
    for what, ours in (('mean', mean), ('logvar', log_var)):
      err = _rel_err(ours, REF[f'pmv_{what}_{key}_clip{int(clip)}'][row])
      assert err < 1e-4, f'{what} at respaced index {i}: rel err {err:.2e}'


@pytest.mark.parametrize('respacing', RESPACINGS)
@pytest.mark.parametrize('name', SCHEDULE_NAMES)
def test_ddim_chain_equals_glide(name, respacing):
  key = f'{name}_{respacing}'
  x0 = samplers.sample(_denoise_fn, jnp.asarray(REF[f'ddim_xT_{key}']), jax.random.PRNGKey(0),
                       schedule=_schedule(name), sampler='ddim', spacing=respacing,
                       num_steps=len(REF[f'use_{key}']), eta=0.0, learned_variance=True,
                       threshold='static')
  err = _rel_err(x0, REF[f'ddim_x0_{key}'])
  assert err < 1e-4, f'DDIM {key}: max abs diff {err:.2e}'


@pytest.mark.parametrize('name, respacing', [('squaredcos_cap_v2', '100'), ('linear', 'ddim25')])
def test_ddpm_chain_with_recorded_noise_equals_glide(name, respacing):
  key = f'{name}_{respacing}'
  x0 = samplers.sample(_denoise_fn, jnp.asarray(REF[f'ddpm_xT_{key}']), jax.random.PRNGKey(0),
                       schedule=_schedule(name), sampler='ddpm', spacing=respacing,
                       learned_variance=True, threshold='static',
                       step_noise=jnp.asarray(REF[f'ddpm_noise_{key}']))
  err = _rel_err(x0, REF[f'ddpm_x0_{key}'])
  assert err < 1e-4, f'DDPM {key}: max abs diff {err:.2e}'


# --- hybrid loss ---------------------------------------------------------------------------

LOSS_CASES = [('squaredcos_cap_v2', 1000), ('linear', 1000), ('squaredcos_cap_v2', 100)]


def _loss_inputs(name, steps):
  key = f'{name}_{steps}'
  x0 = jnp.asarray(REF[f'loss_x0_{key}'])
  t_B = jnp.asarray((REF[f'loss_t_{key}'] + 1) / steps, jnp.float32)
  return key, x0, t_B, jnp.asarray(REF[f'loss_noise_{key}'])


@pytest.mark.parametrize('name, steps', LOSS_CASES)
def test_vlb_terms_equal_guided_diffusion(name, steps):
  key, x0, t_B, noise = _loss_inputs(name, steps)
  sched = _schedule(name, steps)
  x_t = process.q_sample(x0, t_B, noise, sched)
  out = _stand_in(x_t, t_B, steps)
  s_B = jnp.maximum(t_B - 1.0 / steps, 0.0)
  vb = losses.vlb_terms(x0, x_t, s_B, t_B, out[..., :3], out[..., 3:], schedule=sched,
                        parameterization='eps')
  # guided-diffusion's vb is (T / 1000) L_t; the first two examples are t = 0 (decoder NLL).
  scale = steps / 1000.0
  np.testing.assert_allclose(scale * vb, REF[f'loss_vb_exactcdf_{key}'], rtol=1e-4, atol=1e-6)
  # Its own tanh approximation of the normal CDF moves the decoder NLL a little.
  np.testing.assert_allclose(scale * vb, REF[f'loss_vb_{key}'], rtol=5e-3, atol=1e-6)


@pytest.mark.parametrize('name, steps', LOSS_CASES)
def test_diffusion_loss_equals_guided_diffusion_hybrid_loss(name, steps):
  key, x0, t_B, noise = _loss_inputs(name, steps)
  cfg = dict(schedule=name, num_timesteps=steps, parameterization='eps', learned_variance=True,
             vlb_weight=0.001, loss_weighting='none', **WIDE)
  apply_fn = lambda params, x_t, t, cond, rng: _stand_in(x_t, t, steps)
  loss, aux = losses.diffusion_loss(apply_fn, None, {'x0': x0, 't': t_B, 'noise': noise},
                                    jax.random.PRNGKey(0), cfg)
  np.testing.assert_allclose(aux['mse'], REF[f'loss_mse_{key}'].mean(), rtol=1e-5)
  np.testing.assert_allclose(loss, REF[f'loss_loss_exactcdf_{key}'].mean(), rtol=1e-4)
