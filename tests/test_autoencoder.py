"""The KL autoencoder (models.autoencoder): the posterior's closed forms, shapes, names.

The diffusers parity of the network itself is in test_diffusers_vae.py.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from diffusion_jax.diffusion import reconstruction
from diffusion_jax.models import autoencoder as ae

TINY = dict(block_out_channels=(8, 16, 16), layers_per_block=1, latent_channels=3,
            norm_num_groups=4, sample_size=16)


def test_kl_of_standard_normal_is_zero():
  zeros = jnp.zeros((2, 4, 4, 3))
  kl = reconstruction.kl_to_standard_normal(zeros, zeros)
  assert kl.shape == (2,) and kl.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(kl), 0.0)


def test_kl_equals_numerical_integral():
  """Each element's KL as the integral of p log(p / q) on a fine grid, summed per row."""
  rng = np.random.default_rng(0)
  mean = rng.normal(0, 1.5, (2, 2, 2, 3))
  logvar = rng.uniform(-2.0, 1.5, (2, 2, 2, 3))
  x = np.linspace(-25, 25, 400_001)
  log_q = -0.5 * (x ** 2 + np.log(2 * np.pi))

  def integral(m, lv):
    log_p = -0.5 * ((x - m) ** 2 / np.exp(lv) + lv + np.log(2 * np.pi))
    return np.trapezoid(np.exp(log_p) * (log_p - log_q), x)

  want = np.vectorize(integral)(mean, logvar).sum(axis=(1, 2, 3))
  got = np.asarray(reconstruction.kl_to_standard_normal(jnp.asarray(mean, jnp.float32),
                                            jnp.asarray(logvar, jnp.float32)))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # A unit shift of the mean alone costs 1/2 per element.
  ones = jnp.ones((1, 2, 3, 5))
  np.testing.assert_allclose(np.asarray(reconstruction.kl_to_standard_normal(ones, 0 * ones)), [15.0])


def test_posterior_sample_statistics():
  mean = jnp.array([[[[-2.0, 0.5], [3.0, 0.0]]]])         # [1, 1, 2, 2]
  logvar = jnp.array([[[[0.0, -2.0], [1.0, -6.0]]]])
  n = 20_000
  keys = jax.random.split(jax.random.key(0), n)
  z = np.asarray(jax.vmap(lambda k: ae.sample_posterior(mean, logvar, k))(keys))
  std = np.exp(0.5 * np.asarray(logvar))
  assert z.shape == (n, 1, 1, 2, 2) and z.dtype == np.float32
  # Sample means within 5 standard errors, sample deviations within 3%.
  assert np.all(np.abs(z.mean(0) - np.asarray(mean)) < 5 * std / np.sqrt(n))
  np.testing.assert_allclose(z.std(0), std, rtol=0.03)
  # Standardised, the elements are uncorrelated.
  u = ((z - np.asarray(mean)) / std).reshape(n, -1)
  corr = np.corrcoef(u.T)
  assert np.abs(corr - np.eye(4)).max() < 0.05
  # Another key, another sample; the same key, the same sample.
  a, b, c = (ae.sample_posterior(mean, logvar, jax.random.key(s)) for s in (1, 2, 1))
  assert not np.allclose(a, b) and np.array_equal(a, c)


def random_params(abstract, seed: int = 0):
  """Random numpy values for an abstract (unboxed) tree: norm scales near 1, the rest
  N(0, 0.2^2); nothing compiled (initialising the module under jit compiles for a minute
  on a loaded 2-core machine)."""
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(abstract)
  return traverse_util.unflatten_dict({
      path: ((1.0 if path[-1] == 'scale' else 0.0) +
             0.2 * rng.standard_normal(a.shape)).astype(np.float32)
      for path, a in flat.items()})


@pytest.fixture(scope='module')
def tiny():
  module = ae.AutoencoderKL(**TINY)
  x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)
  boxed = jax.eval_shape(module.init, jax.random.key(0), x)['params']
  return module, random_params(nn.meta.unbox(boxed)), boxed, x


_APPLY = {}


def _apply(module, *args, **kw):
  """module.apply, jitted once per module and call signature."""
  fn = _APPLY.setdefault(module, jax.jit(module.apply, static_argnames=('method', 'train')))
  return fn(*args, **kw)


def test_shapes_and_dtypes(tiny):
  module, params, _, x = tiny
  apply = functools.partial(_apply, module)
  mean, logvar = apply({'params': params}, x, method='encode')
  assert mean.shape == logvar.shape == (2, 4, 4, 3) and mean.dtype == jnp.float32
  assert module.downsample_factor == 4
  image = apply({'params': params}, mean, method='decode')
  assert image.shape == (2, 16, 16, 3) and image.dtype == jnp.float32
  # The flax group norm (train=True) and the inference one give the same numbers.
  mean_t, _ = apply({'params': params}, x, method='encode', train=True)
  np.testing.assert_allclose(mean_t, mean, atol=1e-5)
  # Called with a key: a posterior sample decoded, not the mean.
  sampled, mean_c, logvar_c = apply({'params': params}, x, jax.random.key(3))
  np.testing.assert_allclose(mean_c, mean, atol=1e-6)
  np.testing.assert_allclose(logvar_c, logvar, atol=1e-6)
  assert sampled.shape == image.shape
  assert np.abs(np.asarray(sampled) - np.asarray(image)).max() > 1e-3


def test_logvar_is_clipped(tiny):
  """The log-variance half of quant_conv's output is clipped to [-30, 20]."""
  module, params, _, x = tiny
  C = module.latent_channels
  for offset, bound in ((1e4, 20.0), (-1e4, -30.0)):
    bias = np.asarray(params['quant_conv']['bias']).copy()
    bias[C:] += offset
    moved = jax.tree.map(lambda a: a, params)
    moved['quant_conv'] = dict(params['quant_conv'], bias=jnp.asarray(bias))
    mean, logvar = _apply(module, {'params': moved}, x, method='encode')
    np.testing.assert_array_equal(np.asarray(logvar), bound)
    assert np.all(np.isfinite(np.asarray(mean)))


def test_every_parameter_has_logical_names(tiny):
  _, _, boxed, _ = tiny
  leaves = jax.tree.leaves(boxed, is_leaf=lambda a: isinstance(a, nn.Partitioned))
  assert leaves and all(isinstance(a, nn.Partitioned) and len(a.names) == len(a.value.shape)
                        for a in leaves)


def test_options_change_the_tree():
  """No quant convs and no middle attention leave those parameters out; the SD shapes."""
  def tree(**kw):
    module = ae.AutoencoderKL(**dict(TINY, **kw))
    shapes = jax.eval_shape(lambda: nn.meta.unbox(module.init(
        jax.random.key(0), jnp.zeros((1, 4, 4, 3)))['params']))
    return traverse_util.flatten_dict(shapes)

  full = tree()
  bare = tree(use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False)
  gone = {p[0] if p[0].endswith('quant_conv') else p[1] for p in set(full) - set(bare)}
  assert gone == {'quant_conv', 'post_quant_conv', 'mid_attn'} and set(bare) < set(full)
  sd = ae.AutoencoderKL()
  shapes = jax.eval_shape(lambda: sd.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))
  assert sum(a.size for a in jax.tree.leaves(nn.meta.unbox(shapes))) == 83_653_863


@pytest.mark.parametrize('train', [False, True])
def test_group_norms_use_eps_1e6(train):
  """diffusers' VAE normalises with eps 1e-6 (1e-5 would shrink this low-variance input's
  output by half)."""
  x = 1e-3 * jax.random.normal(jax.random.key(0), (2, 3, 5, 8))
  norm = ae._group_norm(4, train, jnp.float32, jnp.float32)
  y = np.asarray(norm.apply(norm.init(jax.random.key(1), x), x))
  g = np.asarray(x, np.float64).reshape(2, 15, 4, 2)
  mean, var = g.mean(axis=(1, 3), keepdims=True), g.var(axis=(1, 3), keepdims=True)
  want = ((g - mean) / np.sqrt(var + 1e-6)).reshape(x.shape)
  np.testing.assert_allclose(y, want, rtol=1e-3, atol=1e-4)


def test_bad_shapes_are_refused(tiny):
  module, params, _, x = tiny
  with pytest.raises(ValueError, match=r'\[B, H, W, 3\]'):
    module.apply({'params': params}, x[..., :2], method='encode')
  with pytest.raises(ValueError, match=r'\[B, H, W, 3\]'):
    module.apply({'params': params}, jnp.zeros((1, 4, 4, 5)), method='decode')
  with pytest.raises(ValueError, match='norm_num_groups'):
    ae.AutoencoderKL(**dict(TINY, norm_num_groups=3)).init(jax.random.key(0), x)
