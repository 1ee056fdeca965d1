"""Closed-form checks of schedules, the forward process, losses, guidance and thresholding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from diffusion_jax.diffusion import analytic, guidance, losses, process, samplers, schedules

SCHEDULES = {
    'cosine': schedules.get_schedule('cosine'),
    'shifted_cosine': schedules.get_schedule('shifted_cosine', shift=4.0),
    'linear': schedules.get_schedule('linear'),
    'squaredcos_cap_v2': schedules.get_schedule('squaredcos_cap_v2'),
}


@pytest.mark.parametrize('name', sorted(SCHEDULES))
def test_schedule_alpha_sigma_unit_norm_and_monotone(name):
  sched = SCHEDULES[name]
  t = jnp.linspace(0.0, 1.0, 2001)
  alpha, sigma = sched.alpha_sigma(t)
  np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=1e-6,
                             err_msg=f'{name}: alpha^2 + sigma^2 != 1')
  logsnr = np.asarray(sched.logsnr(t))
  assert np.all(np.isfinite(logsnr)), f'{name}: log-SNR not finite at the ends'
  assert np.all(np.diff(logsnr) <= 1e-5), f'{name}: log-SNR must decrease with t'
  assert float(sigma[0]) > 0 and float(alpha[-1]) > 0, f'{name}: ends must not be clipped to 0'
  assert logsnr[0] >= 9 and logsnr[-1] <= -9, f'{name}: schedule does not span clean to noise'


def test_discrete_schedules_match_ddpm_tables():
  T = 1000
  lin = SCHEDULES['linear']
  betas = np.linspace(1e-4, 0.02, T)
  abar = np.cumprod(1 - betas)
  steps = np.array([1, 2, 10, 500, 999, 1000])
  alpha, _ = lin.alpha_sigma(jnp.asarray(steps / T, jnp.float32))
  np.testing.assert_allclose(alpha**2, abar[steps - 1], rtol=2e-5,
                             err_msg='linear schedule alpha_bar differs from DDPM')
  cos = SCHEDULES['squaredcos_cap_v2']
  f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2)**2
  expected = np.array([f(i / T) / f(0) for i in steps])
  alpha, _ = cos.alpha_sigma(jnp.asarray(steps / T, jnp.float32))
  # The cap at beta = 0.999 changes only the very last step.
  np.testing.assert_allclose(alpha[:-1]**2, expected[:-1], rtol=1e-4,
                             err_msg='squaredcos_cap_v2 alpha_bar differs from improved DDPM')


def test_respacing_grids():
  lin = SCHEDULES['linear']
  full = lin.timesteps(1000)
  np.testing.assert_allclose(full, np.concatenate([np.arange(1000, 0, -1) / 1000, [0.0]]))
  ten = lin.timesteps(10)
  np.testing.assert_allclose(ten, np.linspace(1, 0, 11), err_msg='trailing spacing on the grid')
  odd = lin.timesteps(7)
  np.testing.assert_allclose(odd * 1000, np.round(odd * 1000), err_msg='grid points only')
  assert odd[0] == 1.0 and odd[-1] == 0.0 and np.all(np.diff(odd) < 0)
  cont = SCHEDULES['cosine'].timesteps(7)
  np.testing.assert_allclose(cont, np.linspace(1, 0, 8))
  with pytest.raises(ValueError, match='exceeds'):
    lin.timesteps(1001)


def test_sample_t_discrete_grid_and_continuous_range():
  rng = jax.random.PRNGKey(0)
  t = np.asarray(SCHEDULES['linear'].sample_t(rng, (4096,)))
  np.testing.assert_allclose(t * 1000, np.round(t * 1000), atol=1e-3)
  assert t.min() >= 1e-3 and t.max() <= 1.0
  assert len(np.unique(np.round(t * 1000))) > 900, 'discrete times do not cover the grid'
  tc = np.asarray(SCHEDULES['cosine'].sample_t(rng, (4096,)))
  assert tc.min() > 0 and tc.max() <= 1 and abs(tc.mean() - 0.5) < 0.02


def test_parameterization_round_trips():
  rng = jax.random.PRNGKey(1)
  k1, k2, k3 = jax.random.split(rng, 3)
  x0 = jax.random.normal(k1, (8, 4, 4, 3))
  eps = jax.random.normal(k2, x0.shape)
  t = jax.random.uniform(k3, (8,), minval=0.02, maxval=0.98)
  sched = SCHEDULES['cosine']
  x_t = process.q_sample(x0, t, eps, sched)
  for param in process.PARAMETERIZATIONS:
    out = process.target(x0, eps, t, sched, param)
    x0_hat, eps_hat = process.predict_x0_eps(out, x_t, t, sched, param)
    np.testing.assert_allclose(x0_hat, x0, atol=2e-4, err_msg=f'{param}: x0 round trip')
    np.testing.assert_allclose(eps_hat, eps, atol=2e-4, err_msg=f'{param}: eps round trip')
  alpha, sigma = sched.alpha_sigma(t)
  v = process.v_from_x0_eps(x0, eps, alpha, sigma)
  np.testing.assert_allclose(process.x0_from_v(x_t, v, alpha, sigma), x0, atol=2e-5)
  np.testing.assert_allclose(process.eps_from_v(x_t, v, alpha, sigma), eps, atol=2e-5)


def test_posterior_equals_ddpm_formulas():
  lin = SCHEDULES['linear']
  betas = np.linspace(1e-4, 0.02, 1000)
  abar = np.cumprod(1 - betas)
  i = np.array([2, 10, 100, 500, 1000])
  t_B = jnp.asarray(i / 1000, jnp.float32)
  s_B = jnp.asarray((i - 1) / 1000, jnp.float32)
  coef_x0, coef_xt, var, log_var = process.posterior_coefficients(s_B, t_B, lin)
  ab_t, ab_s, beta = abar[i - 1], abar[i - 2], betas[i - 1]
  np.testing.assert_allclose(coef_x0, np.sqrt(ab_s) * beta / (1 - ab_t), rtol=1e-4)
  np.testing.assert_allclose(coef_xt, np.sqrt(1 - beta) * (1 - ab_s) / (1 - ab_t), rtol=1e-4)
  np.testing.assert_allclose(var, beta * (1 - ab_s) / (1 - ab_t), rtol=1e-4)
  np.testing.assert_allclose(np.exp(log_var), var, rtol=1e-4)
  np.testing.assert_allclose(np.exp(process.forward_log_variance(s_B, t_B, lin)), beta,
                             rtol=1e-3, err_msg='forward variance is not DDPM beta_t')
  x0 = jnp.ones((5, 3))
  x_t = 2 * jnp.ones((5, 3))
  mean, _, _ = process.posterior(x0, x_t, s_B, t_B, lin)
  np.testing.assert_allclose(mean[:, 0], coef_x0 + 2 * coef_xt, rtol=1e-6)


def test_q_sample_moments():
  sched = SCHEDULES['cosine']
  x0 = jnp.full((200_000,), 0.7)
  t = jnp.full((200_000,), 0.4)
  x_t = process.q_sample(x0, t, jax.random.normal(jax.random.PRNGKey(2), x0.shape), sched)
  alpha, sigma = sched.alpha_sigma(jnp.float32(0.4))
  assert abs(float(x_t.mean()) - 0.7 * float(alpha)) < 4 * float(sigma) / np.sqrt(2e5)
  assert abs(float(x_t.std()) / float(sigma) - 1) < 0.01


def test_learned_log_variance_ends():
  sched = SCHEDULES['squaredcos_cap_v2']
  s_B, t_B = jnp.array([0.3]), jnp.array([0.301])
  _, _, _, log_tilde = process.posterior_coefficients(s_B, t_B, sched)
  log_beta = process.forward_log_variance(s_B, t_B, sched)
  lo = process.learned_log_variance(-jnp.ones((1, 2)), s_B, t_B, sched)
  hi = process.learned_log_variance(jnp.ones((1, 2)), s_B, t_B, sched)
  mid = process.learned_log_variance(jnp.zeros((1, 2)), s_B, t_B, sched)
  np.testing.assert_allclose(lo[0], log_tilde[0], rtol=1e-6)
  np.testing.assert_allclose(hi[0], log_beta[0], rtol=1e-6)
  np.testing.assert_allclose(mid[0], 0.5 * (log_tilde[0] + log_beta[0]), rtol=1e-6)
  assert float(log_beta[0]) > float(log_tilde[0]), 'beta must exceed beta-tilde'


# Thresholding -------------------------------------------------------------------------------

def _sample_with_percentile_three():
  # 996 values spread over [-3, 3] plus four outliers at +-5: the 99.5th percentile of |x| is
  # exactly 3 (numpy's linear interpolation lands between two entries equal to 3).
  body = np.linspace(-3.0, 3.0, 996)
  return np.concatenate([body, [5.0, -5.0, 5.0, -5.0]])[None].astype(np.float32)


def test_dynamic_threshold_divides_by_percentile_not_clips():
  x = _sample_with_percentile_three()
  assert np.percentile(np.abs(x), 99.5) == pytest.approx(3.0)
  out = np.asarray(guidance.dynamic_threshold(jnp.asarray(x), 99.5))
  assert out.max() == pytest.approx(1.0) and out.min() == pytest.approx(-1.0)
  np.testing.assert_allclose(out[0, :996], x[0, :996] / 3.0, rtol=1e-6,
                             err_msg='values inside [-s, s] must be divided by s = 3')
  np.testing.assert_allclose(out[0, 996:], np.sign(x[0, 996:]), rtol=1e-6)
  # What static clipping (or a percentile passed as a fraction) would give differs:
  assert not np.allclose(out, np.clip(x, -1, 1))


def test_dynamic_threshold_rejects_fraction_percentile():
  with pytest.raises(ValueError, match='percent'):
    guidance.dynamic_threshold(jnp.ones((1, 4)), 0.995)
  with pytest.raises(ValueError, match='percent'):
    guidance.get_threshold_fn('dynamic', 0.995)


def test_dynamic_threshold_matches_reference_formula_per_sample():
  rng = np.random.default_rng(0)
  scales = np.array([0.3, 1.0, 2.5, 7.0])
  x = (rng.normal(size=(4, 8, 8, 3)) * scales[:, None, None, None]).astype(np.float32)
  out = np.asarray(guidance.dynamic_threshold(jnp.asarray(x), 99.5))
  for i in range(4):
    s = max(np.percentile(np.abs(x[i]), 99.5), 1.0)
    np.testing.assert_allclose(out[i], np.clip(x[i], -s, s) / s, rtol=1e-5, atol=1e-6,
                               err_msg=f'sample {i} (scale {scales[i]})')
  np.testing.assert_allclose(out[0], x[0], rtol=1e-6, err_msg='s = max(s, 1) must leave '
                             'samples already inside [-1, 1] unchanged')
  np.testing.assert_allclose(guidance.static_threshold(jnp.asarray(x)), np.clip(x, -1, 1))


# Guidance -----------------------------------------------------------------------------------

def _toy_conditional_denoiser(x_t, t_B, cond):
  drop = cond['drop_text'][:, None, None, None]
  signal = jnp.where(drop, 0.0, cond['text'][:, None, None, :])
  return jnp.tanh(x_t * 0.5 + signal + process.bcast(t_B, x_t))


def test_classifier_free_guidance_one_pass_equals_two_pass():
  rng = jax.random.PRNGKey(3)
  x = jax.random.normal(rng, (3, 4, 4, 2))
  t = jnp.array([0.1, 0.5, 0.9])
  cond = {'text': jnp.arange(6.0).reshape(3, 2) / 5, 'drop_text': jnp.zeros((3,), bool)}
  calls = []

  def counting(x_t, t_B, c):
    calls.append(x_t.shape[0])
    return _toy_conditional_denoiser(x_t, t_B, c)

  guided = guidance.classifier_free(counting, 3.0)(x, t, cond)
  assert calls == [6], 'CFG must run cond and uncond in ONE forward pass over 2B rows'
  c_out = _toy_conditional_denoiser(x, t, cond)
  u_out = _toy_conditional_denoiser(x, t, dict(cond, drop_text=jnp.ones((3,), bool)))
  np.testing.assert_allclose(guided, u_out + 3.0 * (c_out - u_out), rtol=1e-5, atol=1e-6)
  one = guidance.classifier_free(_toy_conditional_denoiser, 1.0)(x, t, cond)
  np.testing.assert_allclose(one, c_out, rtol=1e-5, atol=1e-6)


def test_classifier_free_guidance_learned_variance_keeps_cond_variance():
  def model(x_t, t_B, c):
    out = _toy_conditional_denoiser(x_t, t_B, c)
    return jnp.concatenate([out, 2 * out + 1], -1)
  x = jnp.ones((2, 2, 2, 2)) * 0.3
  t = jnp.array([0.2, 0.7])
  cond = {'text': jnp.ones((2, 2)), 'drop_text': jnp.zeros((2,), bool)}
  guided = guidance.classifier_free(model, 4.0, learned_variance=True)(x, t, cond)
  c_out = model(x, t, cond)
  u_out = model(x, t, dict(cond, drop_text=jnp.ones((2,), bool)))
  np.testing.assert_allclose(guided[..., :2], u_out[..., :2] + 4 * (c_out[..., :2] - u_out[..., :2]),
                             rtol=1e-5)
  np.testing.assert_allclose(guided[..., 2:], c_out[..., 2:], rtol=1e-6)


def test_prompt_contrast_adds_each_weighted_pair_difference():
  """guided + s * sum_k w_k (D(pos_k) - D(neg_k)), in one pass over the B * K * 2 pair rows;
  a weight-0 (padding) pair adds nothing, scale 0 leaves the guided output as it was."""
  x = jax.random.normal(jax.random.PRNGKey(4), (2, 3, 3, 2))
  t = jnp.array([0.3, 0.8])
  cond = {'text': jnp.ones((2, 2)) * 0.1, 'drop_text': jnp.zeros((2,), bool)}
  texts = jax.random.normal(jax.random.PRNGKey(5), (2, 2, 2, 2))  # example, pair, pos/neg
  pairs = {'text': texts.reshape(8, 2), 'drop_text': jnp.zeros((8,), bool)}
  weights = jnp.array([[1.0, 1.0], [1.0, 0.0]])
  guided = guidance.classifier_free(_toy_conditional_denoiser, 3.0)
  calls = []

  def counting(x_t, t_B, c):
    calls.append(x_t.shape[0])
    return _toy_conditional_denoiser(x_t, t_B, c)

  out = guidance.prompt_contrast(guided, counting, pairs, weights, 2.0)(x, t, cond)
  assert calls == [8], 'the pairs must run in ONE forward pass over B * K * 2 rows'

  def one(b, k, side):
    c = {'text': texts[b, k, side][None], 'drop_text': jnp.zeros((1,), bool)}
    return _toy_conditional_denoiser(x[b:b + 1], t[b:b + 1], c)[0]
  base = guided(x, t, cond)
  want = jnp.stack([
      base[0] + 2.0 * (one(0, 0, 0) - one(0, 0, 1) + one(0, 1, 0) - one(0, 1, 1)),
      base[1] + 2.0 * (one(1, 0, 0) - one(1, 0, 1))])
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6,
                             err_msg='not guided + s * sum of the weighted pair differences')
  np.testing.assert_allclose(
      guidance.prompt_contrast(guided, counting, pairs, weights, 0.0)(x, t, cond), base,
      rtol=0, atol=0, err_msg='scale 0 must leave the guided output unchanged')

  def model(x_t, t_B, c):  # learned variance: the second half of the channels is not pushed
    o = _toy_conditional_denoiser(x_t, t_B, c)
    return jnp.concatenate([o, 2 * o + 1], -1)
  lv = guidance.prompt_contrast(model, model, pairs, weights, 2.0, learned_variance=True)
  got = lv(x, t, cond)
  np.testing.assert_allclose(got[..., 2:], model(x, t, cond)[..., 2:], rtol=1e-6,
                             err_msg='the variance channels moved')
  np.testing.assert_allclose(got[..., :2] - model(x, t, cond)[..., :2], want - base,
                             rtol=1e-5, atol=1e-6, err_msg='the mean channels were not pushed')


def test_guidance_keeps_each_device_on_its_own_rows(num_devices):
  import re
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  mesh = Mesh(np.array(jax.devices()), ('data',))
  rows = NamedSharding(mesh, P('data'))

  def model(x, t, cond):  # row-wise, so any movement of rows between devices is needless
    drop = cond['drop_text'][:, None, None].astype(x.dtype)
    return x * t[:, None, None] + (1 - drop) * cond['text'][:, :, None]
  guided = guidance.classifier_free(model, 3.0)
  n = 2 * num_devices
  x = jax.random.normal(jax.random.PRNGKey(0), (n, 4, 3))
  t = jnp.linspace(0.1, 0.9, n)
  cond = {'text': jax.random.normal(jax.random.PRNGKey(1), (n, 4)),
          'drop_text': jnp.zeros((n,), bool)}
  args = jax.device_put((x, t, cond), rows)
  compiled = jax.jit(guided).lower(*args).compile()
  found = re.findall(r'(all-to-all|collective-permute|all-gather|all-reduce)', compiled.as_text())
  assert not found, f'guidance moves rows between devices: {sorted(set(found))}'
  want = x * t[:, None, None] + 3.0 * cond['text'][:, :, None]
  np.testing.assert_allclose(compiled(*args), want, rtol=1e-6,
                             err_msg='uncond + 3 (cond - uncond)')


def test_noise_augment_levels_and_moments():
  sched = SCHEDULES['cosine']
  low_res = jnp.full((4096, 4, 4, 3), 0.5)
  noised, aug_t = guidance.noise_augment(low_res, jax.random.PRNGKey(4), sched, 0.3)
  np.testing.assert_allclose(aug_t, 0.3)
  alpha, sigma = sched.alpha_sigma(jnp.float32(0.3))
  assert abs(float(noised.mean()) - 0.5 * float(alpha)) < 0.005
  assert abs(float(noised.std()) / float(sigma) - 1) < 0.01
  _, drawn = guidance.noise_augment(low_res[:512], jax.random.PRNGKey(5), sched, max_level=0.5)
  assert 0 <= float(drawn.min()) and float(drawn.max()) <= 0.5 and float(drawn.std()) > 0.1
  clean, _ = guidance.noise_augment(low_res[:8], jax.random.PRNGKey(6), sched, 0.0)
  # Level 0 is the schedule's cleanest point (log-SNR 15, sigma ~ 5.5e-4).
  np.testing.assert_allclose(clean, low_res[:8], atol=5e-3)


def test_gaussian_blur_matches_scipy_per_example_sigma():
  from scipy import ndimage
  x = np.random.default_rng(0).standard_normal((3, 16, 12, 3)).astype(np.float32)
  sigma = np.array([0.0, 0.7, 1.5], np.float32)
  out = np.asarray(guidance.gaussian_blur(jnp.asarray(x), sigma, max_sigma=1.5))
  np.testing.assert_array_equal(out[0], x[0], err_msg='sigma 0 must leave the image as it is')
  for i in (1, 2):  # jnp 'reflect' padding is scipy's 'mirror'; taps reach 3 * max_sigma
    want = ndimage.gaussian_filter(x[i], (sigma[i], sigma[i], 0), mode='mirror',
                                   truncate=3 * 1.5 / sigma[i])
    np.testing.assert_allclose(out[i], want, atol=1e-5, err_msg=f'blur of sigma {sigma[i]}')
  np.testing.assert_allclose(out.mean(axis=(1, 2)), x.mean(axis=(1, 2)), atol=0.05,
                             err_msg='a normalised blur keeps the mean colour')


def test_blur_augment_draws_per_example_and_fixes_at_sampling():
  edge = np.zeros((64, 16, 16, 3), np.float32)
  edge[:, :, 8:] = 1.0  # a vertical step edge: its spread measures the blur
  drawn = np.asarray(guidance.blur_augment(jnp.asarray(edge), jax.random.PRNGKey(0),
                                           max_sigma=2.0))
  # Values across the edge: one per example, 0.5 for no blur, up to ~0.6 at sigma 2.
  width = (drawn[:, 8, :, 0] > 0.02).sum(-1) - (drawn[:, 8, :, 0] > 0.98).sum(-1)
  assert width.min() <= 1 and width.max() >= 4, f'per-example sigmas not spread: {width}'
  fixed = np.asarray(guidance.blur_augment(jnp.asarray(edge[:4]), jax.random.PRNGKey(1), 1.0,
                                           max_sigma=1.0))
  np.testing.assert_allclose(fixed, fixed[:1].repeat(4, 0), err_msg='a fixed sigma is random')
  np.testing.assert_allclose(
      fixed[0], guidance.gaussian_blur(jnp.asarray(edge[:1]), [1.0], max_sigma=1.0)[0])


def test_schedule_from_a_stage_config_for_every_continuous_name():
  # A stage config carries num_timesteps (0: continuous time; the VLB's step count)
  # whichever schedule it names.
  cfg = {'num_timesteps': 0, 'shift': 2.0, 'logsnr_min': -15.0, 'logsnr_max': 15.0}
  t = jnp.linspace(0.1, 0.9, 5)
  plain = schedules.from_config(dict(cfg, schedule='cosine'))
  shifted = schedules.from_config(dict(cfg, schedule='shifted_cosine'))
  # (up to the endpoints' clipping, which the shift moves with it)
  np.testing.assert_allclose(shifted.logsnr(t), plain.logsnr(t) - 2 * np.log(2.0), atol=0.01,
                             err_msg='shift 2 lowers the log-SNR by 2 log 2')
  assert np.isfinite(np.asarray(schedules.from_config(
      dict(cfg, schedule='linear_logsnr')).logsnr(t))).all()


# Losses -------------------------------------------------------------------------------------

def _gaussian_batch(n=4096, d=8, mean=0.5, std=0.3, seed=0):
  x0 = mean + std * jax.random.normal(jax.random.PRNGKey(seed), (n, d))
  return {'x0': x0, 'cond': {}}


@pytest.mark.parametrize('schedule_name', ['cosine', 'linear'])
def test_analytic_denoiser_has_the_lowest_loss(schedule_name):
  cfg = {'schedule': schedule_name, 'parameterization': 'eps'}
  sched = schedules.from_config(cfg)
  denoiser = analytic.GaussianEpsDenoiser(sched, 0.5, 0.3)
  batch = _gaussian_batch()
  rng = jax.random.PRNGKey(7)

  def loss_of(perturb):
    apply_fn = lambda p, x_t, t, c, r: perturb(denoiser(x_t, t, c))
    return float(losses.diffusion_loss(apply_fn, None, batch, rng, cfg)[0])

  best = loss_of(lambda e: e)
  for name, perturb in [('bias', lambda e: e + 0.05), ('scale up', lambda e: 1.05 * e),
                        ('scale down', lambda e: 0.95 * e), ('noise', lambda e: e + 0.05 * jnp.sin(e * 37))]:
    assert loss_of(perturb) > best, f'a {name}-perturbed denoiser beat the optimal one'


def test_weightings_agree_across_parameterizations():
  # The same prediction expressed as eps, x0 or v must get the same weighted loss.
  sched = SCHEDULES['cosine']
  batch = _gaussian_batch(n=64, d=4)
  rng = jax.random.PRNGKey(8)
  wrong = analytic.GaussianEpsDenoiser(sched, 0.2, 0.5)  # deliberately not optimal

  def apply_in(param):
    def apply_fn(p, x_t, t, c, r):
      eps = wrong(x_t, t)
      alpha, sigma = sched.alpha_sigma(t)
      x0 = process.x0_from_eps(x_t, eps, alpha, sigma)
      return {'eps': eps, 'x0': x0, 'v': process.v_from_x0_eps(x0, eps, alpha, sigma)}[param]
    return apply_fn

  for weighting, offset in (('min_snr', 0.0), ('min_snr', 0.5), ('p2', 0.0)):
    values = [float(losses.diffusion_loss(apply_in(p), None, batch, rng,
                                          {'schedule': 'cosine', 'parameterization': p,
                                           'loss_weighting': weighting,
                                           'min_snr_offset': offset})[0])
              for p in process.PARAMETERIZATIONS]
    np.testing.assert_allclose(values, values[0], rtol=2e-3,
                               err_msg=f'{weighting} weighting depends on the parameterisation')
  snr = jnp.array([0.1, 5.0, 50.0])
  np.testing.assert_allclose(losses.loss_weight(jnp.log(snr), 'x0', 'min_snr'),
                             jnp.minimum(snr, 5.0), rtol=1e-5)
  np.testing.assert_allclose(losses.loss_weight(jnp.log(snr), 'eps', 'min_snr'),
                             jnp.minimum(snr, 5.0) / snr, rtol=1e-5)
  # An offset c keeps v-MSE weight (snr + c) / (snr + 1) below gamma: c = 1 is the v-MSE
  # itself up to snr = gamma - 1, then gamma / (1 + snr).
  np.testing.assert_allclose(
      losses.loss_weight(jnp.log(snr), 'v', 'min_snr', min_snr_offset=0.25),
      [0.35 / 1.1, 5.0 / 6.0, 5.0 / 51.0], rtol=1e-5, err_msg='min_snr_offset on v is wrong')
  np.testing.assert_allclose(
      losses.loss_weight(jnp.log(snr), 'v', 'min_snr', min_snr_offset=1.0),
      [1.0, 5.0 / 6.0, 5.0 / 51.0], rtol=1e-5, err_msg='offset 1 is not the capped v-MSE')


def test_vlb_zero_for_exact_model_and_mean_gets_no_vlb_gradient():
  sched = SCHEDULES['squaredcos_cap_v2']
  c = 0.25
  x0 = jnp.full((4, 3, 3, 1), c)
  t_B = jnp.array([0.2, 0.5, 0.8, 0.999])
  s_B = t_B - 0.001
  eps = jax.random.normal(jax.random.PRNGKey(9), x0.shape)
  x_t = process.q_sample(x0, t_B, eps, sched)
  alpha, sigma = sched.alpha_sigma(t_B)
  exact_eps = process.eps_from_x0(x_t, x0, alpha, sigma)
  vlb = losses.vlb_terms(x0, x_t, s_B, t_B, exact_eps, -jnp.ones_like(x0), schedule=sched,
                         parameterization='eps')
  np.testing.assert_allclose(vlb, 0.0, atol=1e-4, err_msg='KL of the exact posterior is not 0')
  # beta and beta-tilde differ most at small t (they converge as t -> 1).
  early_t, early_s = jnp.array([0.002, 0.01, 0.05]), jnp.array([0.001, 0.009, 0.049])
  x_early = process.q_sample(x0[:3], early_t, eps[:3], sched)
  a_e, s_e = sched.alpha_sigma(early_t)
  wrong_var = losses.vlb_terms(x0[:3], x_early, early_s, early_t,
                               process.eps_from_x0(x_early, x0[:3], a_e, s_e),
                               jnp.ones_like(x0[:3]), schedule=sched, parameterization='eps')
  assert np.all(np.asarray(wrong_var) > 1e-4), f'a wrong variance must cost KL: {wrong_var}'

  cfg = {'schedule': 'squaredcos_cap_v2', 'learned_variance': True, 'vlb_weight': 0.001}
  batch = {'x0': x0, 'cond': {}}

  def vlb_only(mean_shift, var_raw):
    def apply_fn(p, x_t, t, cond, r):
      a, s = sched.alpha_sigma(t)
      e = process.eps_from_x0(x_t, jnp.full_like(x_t, c), a, s) + mean_shift
      return jnp.concatenate([e, jnp.broadcast_to(var_raw, e.shape)], -1)
    loss, aux = losses.diffusion_loss(apply_fn, None, batch, jax.random.PRNGKey(10), cfg)
    return loss - aux['mse']

  g_mean, g_var = jax.grad(vlb_only, argnums=(0, 1))(0.1, 0.3)
  assert abs(float(g_mean)) < 1e-8, 'L_vlb must not train the mean (stop-gradient missing)'
  # The exact posterior variance is at var_raw = -1, so the loss must grow with var_raw.
  assert float(g_var) > 0, f'L_vlb must pull the variance toward beta-tilde (grad {g_var})'


def test_discretized_gaussian_log_likelihood_matches_scipy():
  x = jnp.array([-1.0, -0.5, 0.0, 0.3, 1.0])
  mean = jnp.array([-0.9, -0.45, 0.1, 0.3, 0.95])
  log_scale = jnp.log(jnp.array([0.1, 0.02, 0.3, 0.004, 0.05]))
  ours = np.exp(np.asarray(losses.discretized_gaussian_log_likelihood(x, mean, log_scale)))
  scale = np.exp(np.asarray(log_scale))
  h = 1 / 255
  cdf = lambda v: stats.norm.cdf(v, loc=np.asarray(mean), scale=scale)
  expected = cdf(np.asarray(x) + h) - cdf(np.asarray(x) - h)
  expected[0] = cdf(np.asarray(x) + h)[0]
  expected[-1] = 1 - cdf(np.asarray(x) - h)[-1]
  np.testing.assert_allclose(ours, expected, rtol=1e-4)


def test_loss_shape_mismatch_is_a_clear_error():
  apply_fn = lambda p, x_t, t, c, r: jnp.concatenate([x_t, x_t], -1)
  with pytest.raises(ValueError, match='learned_variance'):
    losses.diffusion_loss(apply_fn, None, {'x0': jnp.zeros((2, 4, 4, 3))}, jax.random.PRNGKey(0),
                          {'schedule': 'cosine'})


def test_unknown_names_are_refused():
  with pytest.raises(ValueError, match='unknown schedule'):
    schedules.get_schedule('cosin')
  with pytest.raises(ValueError, match='parameterization'):
    process.check_parameterization('epsilon')
  with pytest.raises(ValueError, match='unknown sampler'):
    samplers.sample(analytic.GaussianEpsDenoiser(SCHEDULES['cosine'], 0., 1.), jnp.zeros((1, 1)),
                    jax.random.PRNGKey(0), schedule=SCHEDULES['cosine'], sampler='euler',
                    num_steps=2)
