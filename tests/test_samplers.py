"""End-to-end sampler checks against closed forms (analytic denoisers, no network)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from diffusion_jax.diffusion import analytic, process, samplers, schedules

MEAN, STD = 0.5, 0.3
# 4096 samples of 64 independent dims: moments pooled over 262144 values, so that sampling
# noise (~0.15%) is small against the 2% tolerance.
SHAPE = (4096, 64)
COSINE = schedules.get_schedule('cosine')
LINEAR = schedules.get_schedule('linear')
SQUAREDCOS = schedules.get_schedule('squaredcos_cap_v2')


def _moments(x):
  x = np.asarray(x)
  return float(x.mean()), float(x.std())


def _run(schedule, sampler, num_steps, *, mean=MEAN, std=STD, eta=0.0, seed=0, **kw):
  denoiser = analytic.GaussianEpsDenoiser(schedule, mean, std)
  k_init, k_run = jax.random.split(jax.random.PRNGKey(seed))
  x_T = jax.random.normal(k_init, SHAPE)
  return samplers.sample(denoiser, x_T, k_run, schedule=schedule, sampler=sampler,
                         num_steps=num_steps, eta=eta, **kw)


def _assert_gaussian(x, what, tol=0.02):
  m, s = _moments(x)
  assert abs(m - MEAN) / MEAN < tol, f'{what}: mean {m:.4f} vs {MEAN}'
  assert abs(s - STD) / STD < tol, f'{what}: std {s:.4f} vs {STD}'


@pytest.mark.parametrize('schedule', [COSINE, LINEAR], ids=['cosine', 'linear'])
def test_ddpm_1000_steps_reproduces_gaussian(schedule):
  _assert_gaussian(_run(schedule, 'ddpm', 1000), 'DDPM 1000 steps')


def test_ddpm_large_variance_reproduces_gaussian():
  _assert_gaussian(_run(LINEAR, 'ddpm', 1000, variance='large'), 'DDPM large variance')


# DPM-Solver++ steps evenly in log-SNR by default, which makes it schedule-independent: even
# DDPM's linear schedule, whose log-SNR is steep near t = 0, is within 2% at 20 steps (with 20
# steps evenly spaced in t it loses ~14% of the standard deviation; docs/ARCHITECTURE.md).
@pytest.mark.parametrize('schedule', [COSINE, LINEAR, SQUAREDCOS],
                         ids=['cosine', 'linear', 'squaredcos_cap_v2'])
def test_dpmpp_2m_20_steps_reproduces_gaussian(schedule):
  _assert_gaussian(_run(schedule, 'dpmpp_2m', 20), 'DPM-Solver++(2M) 20 steps')


def _moment_error(x):
  m, s = _moments(x)
  return max(abs(m - MEAN) / MEAN, abs(s - STD) / STD)


def test_ddim_eta0_error_shrinks_with_steps():
  errors = {n: _moment_error(_run(COSINE, 'ddim', n)) for n in (5, 20, 200)}
  assert errors[5] > errors[20] > errors[200], f'DDIM error must shrink with steps: {errors}'
  assert errors[200] < 0.02, f'DDIM eta=0 at 200 steps: {errors}'


def test_ddim_eta1_error_shrinks_with_steps():
  errors = {n: _moment_error(_run(COSINE, 'ddim', n, eta=1.0)) for n in (10, 50, 1000)}
  assert errors[10] > errors[50] > errors[1000], f'DDIM eta=1 error must shrink: {errors}'
  assert errors[1000] < 0.02, f'DDIM eta=1 at 1000 steps: {errors}'


def test_ddim_eta1_is_ddpm_with_posterior_variance():
  a = _run(LINEAR, 'ddim', 25, eta=1.0)
  b = _run(LINEAR, 'ddpm', 25, variance='small')
  np.testing.assert_allclose(a, b, atol=2e-4, err_msg='DDIM(eta=1) must equal DDPM (small var)')


@pytest.mark.parametrize('sampler', samplers.SAMPLERS)
@pytest.mark.parametrize('num_steps', [1, 2, 7, 50])
def test_point_mass_is_recovered_at_any_step_count(sampler, num_steps):
  for schedule in (COSINE, LINEAR):
    x = _run(schedule, sampler, num_steps, mean=0.37, std=0.0, eta=0.5)
    np.testing.assert_allclose(x, 0.37, atol=1e-3,
                               err_msg=f'{sampler}, {num_steps} steps: point mass not recovered')


def test_parameterizations_sample_identically():
  """The same denoiser expressed as eps, x0 or v must give the same samples."""
  eps_fn = analytic.GaussianEpsDenoiser(COSINE, MEAN, STD)

  @functools.lru_cache(None)
  def as_param(param):
    def fn(x_t, t_B, cond):
      eps = eps_fn(x_t, t_B)
      alpha, sigma = COSINE.alpha_sigma(t_B)
      x0 = process.x0_from_eps(x_t, eps, alpha, sigma)
      return {'x0': x0, 'v': process.v_from_x0_eps(x0, eps, alpha, sigma)}[param]
    return fn

  x_T = jax.random.normal(jax.random.PRNGKey(0), (64, 8))
  ref = samplers.sample(eps_fn, x_T, jax.random.PRNGKey(1), schedule=COSINE, sampler='ddpm',
                        num_steps=30)
  for param in ('x0', 'v'):
    out = samplers.sample(as_param(param), x_T, jax.random.PRNGKey(1), schedule=COSINE,
                          sampler='ddpm', num_steps=30, parameterization=param)
    np.testing.assert_allclose(out, ref, atol=1e-3, err_msg=f'{param} sampling differs from eps')


def test_sampler_noise_is_standard_gaussian():
  """One ancestral step from x_T = 0 with x0_hat = x_t = 0 leaves only the injected noise."""
  def identity_x0(x_t, t_B, cond):
    return x_t
  x_T = jnp.zeros((20000, 4))
  out = samplers.sample(identity_x0, x_T, jax.random.PRNGKey(3), schedule=COSINE, sampler='ddpm',
                        num_steps=2, parameterization='x0')
  # Step 1 (t=1 -> 0.5) injects N(0, var) noise; step 2 (to t=0) returns x0_hat = x_{0.5}.
  _, _, var, _ = process.posterior_coefficients(jnp.array([0.5]), jnp.array([1.0]), COSINE)
  z = np.asarray(out).ravel() / np.sqrt(float(var[0]))
  assert abs(z.mean()) < 0.02 and abs(z.std() - 1) < 0.02, 'noise is not N(0, variance)'
  assert abs(stats.kurtosis(z, fisher=False) - 3.0) < 0.1, 'noise kurtosis is not Gaussian (3)'
  assert stats.kstest(z, 'norm').pvalue > 1e-3, 'noise fails a KS test for normality'


def test_ddim_inversion_reconstructs_and_error_falls_with_steps():
  x0 = MEAN + STD * jax.random.normal(jax.random.PRNGKey(5), (256, 8))
  denoiser = analytic.GaussianEpsDenoiser(COSINE, MEAN, STD)
  errors = {}
  for n in (20, 100, 500):
    x_T = samplers.ddim_invert(denoiser, x0, schedule=COSINE, num_steps=n)
    rec = samplers.sample(denoiser, x_T, jax.random.PRNGKey(0), schedule=COSINE, sampler='ddim',
                          num_steps=n, eta=0.0)
    errors[n] = float(jnp.linalg.norm(rec - x0) / jnp.linalg.norm(x0))
  assert errors[20] > errors[100] > errors[500], f'inversion error must fall with steps: {errors}'
  assert errors[500] < 0.01, f'DDIM inversion round trip at 500 steps: {errors}'
  # x_T of a Gaussian is (close to) standard normal: the inversion really reaches the prior.
  m, s = _moments(x_T)
  assert abs(m) < 0.1 and abs(s - 1) < 0.1, f'inverted latents are not N(0, 1): {m}, {s}'


def test_dynamic_threshold_inside_sampler_bounds_x0():
  """With a wildly over-scaled x0 prediction, dynamic thresholding keeps outputs in [-1, 1]."""
  def overshoot_x0(x_t, t_B, cond):
    return 5.0 * jnp.tanh(x_t)
  x_T = jax.random.normal(jax.random.PRNGKey(6), (16, 8, 8, 3))
  for threshold in ('dynamic', 'static'):
    out = samplers.sample(overshoot_x0, x_T, jax.random.PRNGKey(7), schedule=COSINE,
                          sampler='ddim', num_steps=10, parameterization='x0', threshold=threshold)
    assert float(jnp.abs(out).max()) <= 1.0 + 1e-5, f'{threshold} thresholding let |x0| exceed 1'
  free = samplers.sample(overshoot_x0, x_T, jax.random.PRNGKey(7), schedule=COSINE,
                         sampler='ddim', num_steps=10, parameterization='x0')
  assert float(jnp.abs(free).max()) > 2.0


def test_learned_variance_sampling_interpolates_between_fixed_variances():
  denoiser = analytic.GaussianEpsDenoiser(LINEAR, MEAN, STD)

  @functools.lru_cache(None)
  def with_var(raw):
    return lambda x_t, t_B, c: jnp.concatenate([denoiser(x_t, t_B), jnp.full_like(x_t, raw)], -1)

  x_T = jax.random.normal(jax.random.PRNGKey(0), (512, 8))
  kw = dict(schedule=LINEAR, sampler='ddpm', num_steps=40, learned_variance=True)
  small = samplers.sample(denoiser, x_T, jax.random.PRNGKey(1), schedule=LINEAR, sampler='ddpm',
                          num_steps=40, variance='small')
  large = samplers.sample(denoiser, x_T, jax.random.PRNGKey(1), schedule=LINEAR, sampler='ddpm',
                          num_steps=40, variance='large')
  np.testing.assert_allclose(samplers.sample(with_var(-1.0), x_T, jax.random.PRNGKey(1), **kw),
                             small, atol=1e-4, err_msg='learned variance at -1 must be beta-tilde')
  np.testing.assert_allclose(samplers.sample(with_var(1.0), x_T, jax.random.PRNGKey(1), **kw),
                             large, atol=1e-4, err_msg='learned variance at +1 must be beta')


def test_progress_callback_reports_every_step_without_leaving_jit():
  seen = []
  progress = lambda i: seen.append(int(i))
  denoiser = analytic.GaussianEpsDenoiser(COSINE, MEAN, STD)
  out = samplers.sample(denoiser, jnp.zeros((2, 3)), jax.random.PRNGKey(0), schedule=COSINE,
                        sampler='dpmpp_2m', num_steps=6, progress_fn=progress)
  jax.block_until_ready(out)
  jax.effects_barrier()
  assert sorted(seen) == list(range(6)), f'progress steps: {seen}'


def test_gradient_guidance_shifts_the_mean_linearly():
  """A constant log-likelihood gradient g moves N(0, 1) samples toward +x, linearly in g."""
  denoiser = analytic.GaussianEpsDenoiser(COSINE, 0.0, 1.0)
  pull = lambda g: (lambda x_t, t_B, cond: jnp.full_like(x_t, g))
  x_T = jax.random.normal(jax.random.PRNGKey(0), (2048, 8))
  kw = dict(schedule=COSINE, sampler='ddpm', num_steps=200)
  plain = samplers.sample(denoiser, x_T, jax.random.PRNGKey(1), **kw)
  shift = {g: float((samplers.sample(denoiser, x_T, jax.random.PRNGKey(1),
                                     grad_guidance_fn=pull(g), **kw) - plain).mean())
           for g in (0.1, 0.2)}
  assert shift[0.1] > 0.05, f'gradient guidance toward +x had little effect: {shift}'
  assert abs(shift[0.2] / shift[0.1] - 2.0) < 0.05, f'guidance is not linear in g: {shift}'
