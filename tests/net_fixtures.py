"""Shared helpers for the network tests: tiny stage configs, random inputs shaped like
`models.example_inputs`, random non-zero parameters without an init compile, and a jitted
forward of a built network."""
from __future__ import annotations

import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import models

B = 2


def config(family, stage, size='tiny'):
  return importlib.import_module(f'configs.{family}').get_config(f'stage={stage},size={size}')


def _randn(rng, shape):
  return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def random_inputs(model_cfg, seed=0):
  """example_inputs with every float array randomised (ids random, masks partly padded)."""
  rng = np.random.default_rng(seed)
  x, t, cond = models.example_inputs(model_cfg, B)
  x = _randn(rng, x.shape)
  t = jnp.asarray(rng.uniform(0.1, 0.9, t.shape), jnp.float32)
  out = {}
  for k, v in cond.items():
    if k == 'text_mask':
      n, L = v.shape  # alternate rows: 3 padding positions, half padding
      lengths = np.where(np.arange(n) % 2 == 0, L - 3, L // 2)
      out[k] = jnp.asarray(np.arange(L)[None, :] < lengths[:, None])
    elif k == 'text_ids':
      out[k] = jnp.asarray(rng.integers(1, model_cfg.vocab_size, v.shape), jnp.int32)
    elif k == 'inpaint_mask':
      m = np.zeros(v.shape, np.float32)
      m[:, : v.shape[1] // 2] = 1.0  # top half known
      out[k] = jnp.asarray(m)
    elif k == 'aug_t':
      out[k] = jnp.asarray(rng.uniform(0.1, 0.9, v.shape), jnp.float32)
    elif v.dtype == jnp.bool_:
      out[k] = v
    else:
      out[k] = _randn(rng, v.shape)
  return x, t, out


def random_params(module, model_cfg, seed=1):
  """Random parameters of the right shapes, every one non-zero (numpy draws on the shapes of
  `jax.eval_shape(init)`: no init compile). Kernels ~ N(0, 1/fan_in), norm scales ~ 1."""
  x, t, cond = models.example_inputs(model_cfg, B)
  abstract = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), x, t, cond))['params']
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = str(path[-1].key)
    shape = leaf.shape
    z = rng.standard_normal(shape).astype(np.float32)
    if name == 'scale':
      return jnp.asarray(1.0 + 0.05 * z)
    if name == 'embedding':
      return jnp.asarray(0.5 * z)
    if len(shape) >= 2 and name == 'kernel':
      return jnp.asarray(z / np.sqrt(np.prod(shape[:-1])))
    return jnp.asarray(0.05 * z)

  return jax.tree_util.tree_map_with_path(draw, abstract)


class Net:
  """A built tiny network with perturbed params and a jitted forward."""

  def __init__(self, family, stage):
    self.cfg = config(family, stage)
    self.module = models.build(self.cfg.model)
    self.x, self.t, self.cond = random_inputs(self.cfg.model)
    self.params = random_params(self.module, self.cfg.model)
    self._fwd = jax.jit(lambda p, x, t, c: self.module.apply({'params': p}, x, t, c))

  def __call__(self, x=None, t=None, **cond_updates):
    cond = dict(self.cond, **cond_updates)
    return self._fwd(self.params, self.x if x is None else x, self.t if t is None else t, cond)
