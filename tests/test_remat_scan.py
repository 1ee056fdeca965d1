"""Memory/layout switches leave the maths alone: remat gives the same gradients, scanned
transformer stacks and U-Net levels give the same outputs as unrolled ones (params copied
between layouts)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import models
from diffusion_jax.models import layers
from net_fixtures import config, random_inputs, random_params


@pytest.mark.parametrize('policy', ['full'])  # named policies: tests/test_layers.py
def test_unet_remat_gives_same_gradients(policy):
  cfg = config('glide', 'base64')  # ResBlocks, attention with text, scanned text transformer
  plain = models.build(cfg.model)
  cfg.model.remat_policy = policy
  remat = models.build(cfg.model)
  params = random_params(plain, cfg.model)
  x, t, cond = random_inputs(cfg.model)

  def grads(m):
    loss = lambda p: jnp.mean(m.apply({'params': p}, x, t, cond) ** 2)
    return jax.jit(jax.grad(loss))(params)

  g0, g1 = grads(plain), grads(remat)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g0)) > 0, 'zero gradients'
  jax.tree_util.tree_map_with_path(lambda path, a, b: np.testing.assert_allclose(
      a, b, atol=1e-5, rtol=1e-4,
      err_msg=f'remat_policy={policy} changes the gradient of {jax.tree_util.keystr(path)}'),
      g0, g1)


@pytest.mark.parametrize('family,stage,num_layers_key', [
    ('unclip', 'prior', 'num_layers'),   # the prior's causal transformer
    ('glide', 'base64', 'xf_layers'),    # GLIDE's text transformer inside the U-Net
])
def test_scan_and_unrolled_models_agree(family, stage, num_layers_key):
  cfg = config(family, stage)
  scanned = models.build(cfg.model)
  cfg.model.scan_layers = False
  unrolled = models.build(cfg.model)
  n = cfg.model[num_layers_key]
  p_unrolled = random_params(unrolled, cfg.model)
  p_scanned = layers.stack_layer_params(p_unrolled, n)
  ref = random_params(scanned, cfg.model)
  assert jax.tree.map(jnp.shape, p_scanned) == jax.tree.map(jnp.shape, ref), (
      'stacked unrolled params do not have the scanned layout')
  x, t, cond = random_inputs(cfg.model)
  a = jax.jit(lambda p: unrolled.apply({'params': p}, x, t, cond))(p_unrolled)
  b = jax.jit(lambda p: scanned.apply({'params': p}, x, t, cond))(p_scanned)
  assert float(jnp.abs(a).max()) > 1e-3, 'degenerate (all-zero) output'
  np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5,
                             err_msg=f'{family}/{stage}: scan_layers changes the output')


@pytest.mark.parametrize('policy', ['full'])  # remat inside the scanned body
def test_efficient_unet_scanned_blocks_agree_with_unrolled(policy):
  """scan_blocks: the same outputs and gradients as the unrolled network, params restacked."""
  from diffusion_jax.models.efficient_unet import stack_block_params
  cfg = config('imagen', 'sr256')  # cross-attention at its second level
  cfg.model.num_res_blocks = (2, 3)
  cfg.model.remat_policy = policy
  unrolled = models.build(cfg.model)
  cfg.model.scan_blocks = True
  scanned = models.build(cfg.model)
  p_unrolled = random_params(unrolled, cfg.model)
  p_scanned = stack_block_params(p_unrolled, cfg.model.num_res_blocks)
  ref = random_params(scanned, cfg.model)
  assert 'up1_blocks' in ref and 'up1_res1' not in ref, 'scan_blocks did not scan a level'
  assert jax.tree.map(jnp.shape, p_scanned) == jax.tree.map(jnp.shape, ref), (
      'stacked unrolled params do not have the scanned layout')
  x, t, cond = random_inputs(cfg.model)

  def loss(m, p):
    return jnp.mean(m.apply({'params': p}, x, t, cond) ** 2)

  a = jax.jit(lambda p: unrolled.apply({'params': p}, x, t, cond))(p_unrolled)
  b = jax.jit(lambda p: scanned.apply({'params': p}, x, t, cond))(p_scanned)
  assert float(jnp.abs(a).max()) > 1e-3, 'degenerate (all-zero) output'
  np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg='scan_blocks changes the output')
  g_unrolled = stack_block_params(
      jax.jit(jax.grad(lambda p: loss(unrolled, p)))(p_unrolled), cfg.model.num_res_blocks)
  g_scanned = jax.jit(jax.grad(lambda p: loss(scanned, p)))(p_scanned)
  jax.tree_util.tree_map_with_path(lambda path, u, v: np.testing.assert_allclose(
      u, v, atol=1e-5, rtol=1e-4,
      err_msg=f'scan_blocks (remat {policy}) changes the gradient of {jax.tree_util.keystr(path)}'),
      g_unrolled, g_scanned)


@pytest.mark.parametrize('family,stage', [('imagen', 'base64'), ('imagen', 'sr256'),
                                          ('unclip', 'prior'), ('unclip', 'up256')])
@pytest.mark.parametrize('policy', ['full', 'dots_with_no_batch_dims_saveable'])
def test_every_network_differentiates_under_remat(family, stage, policy):
  """Shapes only: each network (self-only attention, cross-attention, scanned prior) traces
  through jax.grad with remat on, and the gradient tree matches the parameter tree."""
  cfg = config(family, stage)
  cfg.model.remat_policy = policy
  module = models.build(cfg.model)
  x, t, cond = models.example_inputs(cfg.model, 2)
  params = jax.eval_shape(lambda: random_params(module, cfg.model))
  grads = jax.eval_shape(jax.grad(lambda p: jnp.sum(module.apply({'params': p}, x, t, cond))),
                         params)
  assert jax.tree.map(jnp.shape, grads) == jax.tree.map(jnp.shape, params)
