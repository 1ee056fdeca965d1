"""GLIDE's noised CLIP: contrastive loss, time conditioning, training, finite image gradients."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from diffusion_jax import convert
from diffusion_jax.diffusion import contrastive
from diffusion_jax.models import clip

SCHEDULE = {'schedule': 'cosine'}


def _np_infonce(img, txt, log_scale):
  img = img / np.linalg.norm(img, axis=1, keepdims=True)
  txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
  logits = np.exp(log_scale) * img @ txt.T
  def ce(lg):
    lg = lg - lg.max(1, keepdims=True)
    return -np.mean(np.diag(lg) - np.log(np.exp(lg).sum(1)))
  return 0.5 * (ce(logits) + ce(logits.T))


def test_contrastive_loss_matches_reference():
  rng = np.random.RandomState(0)
  img, txt = rng.randn(6, 5).astype(np.float32), rng.randn(6, 5).astype(np.float32)
  got = float(contrastive.clip_contrastive_loss(img, txt, 1.3))
  np.testing.assert_allclose(got, _np_infonce(img, txt, 1.3), rtol=1e-5)
  # Symmetric in its two sides; log(B) when nothing is distinguishable; ~0 when aligned.
  np.testing.assert_allclose(float(contrastive.clip_contrastive_loss(txt, img, 1.3)), got, rtol=1e-5)
  same = np.ones((6, 5), np.float32)
  np.testing.assert_allclose(float(contrastive.clip_contrastive_loss(same, same, 2.0)), np.log(6), rtol=1e-5)
  eye = np.eye(6, dtype=np.float32) * 3.0
  assert float(contrastive.clip_contrastive_loss(eye, eye, np.log(100.0))) < 1e-3
  # The temperature is clamped at 100, as CLIP does.
  np.testing.assert_allclose(float(contrastive.clip_contrastive_loss(img, txt, 9.0)),
                             _np_infonce(img, txt, np.log(100.0)), rtol=1e-4)


def _dataset(n=8):
  """n solid-colour images with distinct captions (bos 62, word 10+i, eos 63, eos padding)."""
  rng = np.random.RandomState(0)
  colours = rng.uniform(-1, 1, size=(n, 1, 1, 3)).astype(np.float32)
  images = np.broadcast_to(colours, (n, 16, 16, 3)).copy()
  images[:, :8] *= -1.0  # some spatial structure
  ids = np.full((n, 16), 63, np.int32)
  ids[:, 0], ids[:, 1] = 62, 10 + np.arange(n)
  mask = np.zeros((n, 16), bool)
  mask[:, :3] = True
  return {'x0': jnp.asarray(images), 'cond': {'text_ids': jnp.asarray(ids), 'text_mask': jnp.asarray(mask)}}


@pytest.fixture(scope='module')
def model_and_params():
  module = clip.make_noised('tiny')
  x, t, cond = clip.noised_clip_example_inputs(clip.NOISED_PRESETS['tiny'], 2)
  params = jax.jit(lambda k: nn.meta.unbox(module.init(k, x, t, cond)['params']))(
      jax.random.PRNGKey(0))
  return module, params


def _apply(module):
  return lambda p, x, t, c, r: module.apply({'params': p}, x, t, c)


def test_noised_clip_trains(model_and_params):
  module, params = model_and_params
  batch = _dataset()
  loss_fn = lambda p, r: contrastive.noised_clip_loss(_apply(module), p, batch, r, SCHEDULE)
  eval_keys = jax.random.split(jax.random.PRNGKey(123), 8)

  @jax.jit
  def eval_loss(p):
    return jnp.mean(jax.vmap(lambda k: loss_fn(p, k)[0])(eval_keys))

  opt = optax.adam(3e-3)
  state = opt.init(params)

  @jax.jit
  def step(p, s, r):
    (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(p, r)
    upd, s = opt.update(g, s, p)
    return optax.apply_updates(p, upd), s, loss

  before = float(eval_loss(params))
  p, s = params, state
  for i in range(80):
    p, s, loss = step(p, s, jax.random.PRNGKey(i))
    assert np.isfinite(float(loss)), f'loss became {float(loss)} at step {i}'
  after = float(eval_loss(p))
  assert before > 1.8, f'initial loss {before} should be near log(8) = 2.08'
  assert after < 0.75 * before, f'contrastive loss did not decrease enough: {before:.3f} -> {after:.3f}'


@pytest.fixture(scope='module')
def image_grad(model_and_params):
  module, params = model_and_params

  @jax.jit
  def grad(x, t_B, ids, mask):
    txt = module.apply({'params': params}, ids, mask, method='encode_text')
    txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)

    def guidance(x):  # GLIDE's CLIP guidance objective: image-text cosine similarity
      img = module.apply({'params': params}, x, t_B, method='encode_image')
      return jnp.sum(img / jnp.linalg.norm(img, axis=-1, keepdims=True) * txt)

    return jax.grad(guidance)(x)

  return grad


@pytest.mark.parametrize('t', [0.0, 0.5, 1.0])
def test_image_gradient_is_finite(image_grad, t):
  batch = _dataset(4)
  g = image_grad(batch['x0'], jnp.full((4,), t), batch['cond']['text_ids'], batch['cond']['text_mask'])
  assert g.shape == batch['x0'].shape
  assert bool(jnp.all(jnp.isfinite(g))), f'non-finite image gradient at t={t}'
  assert float(jnp.abs(g).max()) > 0, f'zero image gradient at t={t}'


def test_time_conditioning_is_wired(model_and_params):
  module, params = model_and_params
  x = _dataset(2)['x0']
  enc = jax.jit(lambda p, t: module.apply({'params': p}, x, jnp.full((2,), t), method='encode_image'))
  # Zero-initialised output layer: at init the time has no effect (a CLIP seed stays exact).
  np.testing.assert_allclose(enc(params, 0.0), enc(params, 1.0), atol=1e-6)
  p = jax.tree.map(lambda a: a, params)
  k = p['clip']['vision_model']['time_fc2']['kernel']
  p['clip']['vision_model']['time_fc2']['kernel'] = jax.random.normal(jax.random.PRNGKey(1), k.shape)
  assert float(jnp.abs(enc(p, 0.0) - enc(p, 1.0)).max()) > 1e-3, 't does not reach the image tower'


def test_seed_from_pretrained_clip_is_exact():
  module = clip.make('tiny')
  ids = jnp.zeros((1, 16), jnp.int32)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
  params = jax.jit(lambda k: nn.meta.unbox(module.init(k, x, ids)['params']))(jax.random.PRNGKey(3))
  noised = clip.make_noised('tiny')
  nparams = convert.clip_to_noised_clip(params, noised, jax.random.PRNGKey(4))
  want = jax.jit(lambda p: module.apply({'params': p}, x, method='encode_image'))(params)
  got = jax.jit(lambda p: noised.apply({'params': p}, x, jnp.array([0.1, 0.9]),
                                       method='encode_image'))(nparams)
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_loss_noises_images_with_the_schedule():
  from diffusion_jax.diffusion import schedules
  seen = {}

  def stub(p, x_t, t_B, cond, rng):
    seen['x_t'], seen['t'] = np.asarray(x_t), np.asarray(t_B)
    emb = jnp.mean(x_t, axis=(1, 2))
    return emb, emb, jnp.float32(0.0)

  x0 = jnp.full((16, 32, 32, 3), 0.8)
  loss, aux = contrastive.noised_clip_loss(stub, None, {'x0': x0, 'cond': {}}, jax.random.PRNGKey(0),
                                           SCHEDULE)
  t = seen['t']
  assert t.shape == (16,) and t.min() >= 0 and t.max() <= 1 and t.std() > 0.1, f't ~ U[0, 1]? {t}'
  alpha, sigma = (np.asarray(a) for a in schedules.get_schedule('cosine').alpha_sigma(jnp.asarray(t)))
  x_t = seen['x_t'].reshape(16, -1)
  np.testing.assert_allclose(x_t.mean(1), 0.8 * alpha, atol=0.06, err_msg='x_t mean is not alpha(t) x0')
  np.testing.assert_allclose(x_t.std(1), sigma, atol=0.06, err_msg='x_t noise level is not sigma(t)')
  assert np.isfinite(float(loss)) and set(aux) >= {'loss', 'accuracy', 'temperature', 't_mean'}
