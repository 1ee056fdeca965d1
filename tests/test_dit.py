"""Our DiT: shapes, adaLN-Zero's identity start, patchify round trip, scanned = unrolled,
class-label dropout, and the registry's example inputs."""
from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models.dit import DiT, example_inputs, patchify, unpatchify

CLASS = dict(image_size=8, in_channels=4, out_channels=4, patch_size=2, hidden_size=24, depth=2,
             num_heads=3, num_classes=10)
TEXT = dict(image_size=8, in_channels=3, out_channels=3, learned_variance=True, patch_size=4,
            hidden_size=32, depth=2, num_heads=2, adaln='single', text_source='tokens',
            text_len=5, text_dim=12)


def _unbox(tree):
  return flax.linen.meta.unbox(tree)


def _random_like(params, seed, skip=lambda path: False):
  flat = flax.traverse_util.flatten_dict(params)
  rng = np.random.RandomState(seed)
  out = {k: (v if skip(k) else jnp.asarray(0.3 * rng.randn(*v.shape), v.dtype))
         for k, v in flat.items()}
  return flax.traverse_util.unflatten_dict(out)


def _init(cfg, batch=2):
  module = DiT(**cfg)
  x, t, cond = example_inputs(cfg, batch)
  params = _unbox(jax.jit(module.init)(jax.random.key(0), x, t, cond)['params'])
  return module, params, x, t, cond


def _inputs(cfg, cond, seed=0):
  rng = np.random.RandomState(seed)
  x = jnp.asarray(rng.randn(*(2, cfg['image_size'], cfg['image_size'], cfg['in_channels'])),
                  jnp.float32)
  cond = dict(cond)
  if 'text_tokens' in cond:
    cond['text_tokens'] = jnp.asarray(rng.randn(*cond['text_tokens'].shape), jnp.float32)
    cond['text_mask'] = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
  if 'class_labels' in cond:
    cond['class_labels'] = jnp.asarray([3, 7], jnp.int32)
  return x, jnp.asarray([0.1, 0.8], jnp.float32), cond


@pytest.mark.parametrize('cfg,channels', [(CLASS, 4), (TEXT, 6),
                                          (dict(CLASS, learned_variance=True), 8)])
def test_shapes_and_zero_start(cfg, channels):
  """[B, H, W, out] (twice out with learned_variance); the zero-initialised final layer
  makes the freshly initialised network's output exactly zero."""
  module = DiT(**cfg)
  x, t, cond = _inputs(cfg, example_inputs(cfg, 2)[2])
  out = jax.jit(lambda: module.apply(module.init(jax.random.key(0), x, t, cond), x, t, cond))()
  assert out.shape == (2, cfg['image_size'], cfg['image_size'], channels)
  assert out.dtype == jnp.float32
  assert np.all(np.asarray(out) == 0.0)


def test_adaln_zero_blocks_start_as_identity():
  """With the blocks' adaLN maps zero (their init), every gate is zero: the blocks' attention
  and MLP weights do not change the (otherwise random, nonzero) output."""
  module, params, _, _, cond = _init(CLASS)
  apply = jax.jit(module.apply)
  x, t, cond = _inputs(CLASS, cond)
  is_adaln = lambda path: path[:2] == ('blocks', 'adaln')
  rand = _random_like(params, 1, skip=is_adaln)
  assert all(np.all(np.asarray(v) == 0) for k, v in flax.traverse_util.flatten_dict(rand).items()
             if is_adaln(k))
  other = _random_like(params, 2, skip=lambda p: p[0] != 'blocks' or is_adaln(p))
  other = flax.traverse_util.flatten_dict(other)
  mixed = {k: (other[k] if k[0] == 'blocks' else v)
           for k, v in flax.traverse_util.flatten_dict(rand).items()}
  mixed = flax.traverse_util.unflatten_dict(mixed)
  a = np.asarray(apply({'params': rand}, x, t, cond))
  b = np.asarray(apply({'params': mixed}, x, t, cond))
  assert np.abs(a).max() > 0.1
  np.testing.assert_array_equal(a, b)
  # ... and nonzero gates make them matter.
  live = _random_like(params, 3)
  c = np.asarray(apply({'params': live}, x, t, cond))
  live_mixed = flax.traverse_util.flatten_dict(live)
  for k, v in other.items():
    if k[0] == 'blocks' and not is_adaln(k):
      live_mixed[k] = v
  d = np.asarray(apply({'params': flax.traverse_util.unflatten_dict(live_mixed)}, x, t,
                              cond))
  assert np.abs(c - d).max() > 1e-3


def test_patchify_round_trip_and_layout():
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(2, 8, 12, 3), jnp.float32)
  tokens = patchify(x, 4)
  assert tokens.shape == (2, 6, 48)
  np.testing.assert_array_equal(np.asarray(unpatchify(tokens, 4, 2, 3)), np.asarray(x))
  # token 4 is patch row 1, column 1; its features run (p, q, c)
  np.testing.assert_array_equal(np.asarray(tokens[1, 4]).reshape(4, 4, 3),
                                np.asarray(x[1, 4:8, 4:8]))


def test_scan_equals_unrolled_and_class_dropout():
  """Scanned and unrolled blocks agree; drop_class reads the null class (row num_classes)."""
  cfg = dict(CLASS, zero_init=False, block_condition_embed=True)
  module, params, _, _, cond = _init(cfg)
  apply = jax.jit(module.apply)
  params = _random_like(params, 4)
  x, t, cond = _inputs(cfg, cond)
  unrolled = DiT(**dict(cfg, scan_layers=False))
  blocks = {f'blocks_{i}': jax.tree.map(lambda a: a[i], params['blocks']) for i in range(2)}
  flat = dict(params, **blocks)
  del flat['blocks']
  a = np.asarray(apply({'params': params}, x, t, cond))
  b = np.asarray(jax.jit(unrolled.apply)({'params': flat}, x, t, cond))
  np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(a).max())
  dropped = apply({'params': params}, x, t, dict(cond, drop_class=jnp.array([True, False])))
  null = apply({'params': params}, x, t, dict(cond, class_labels=jnp.array([10, 7])))
  np.testing.assert_array_equal(np.asarray(dropped), np.asarray(null))
  assert np.abs(np.asarray(dropped)[0] - a[0]).max() > 1e-3


def test_text_learned_null_and_remat():
  """A dropped caption reads the learned null caption: its tokens no longer matter; remat
  and the CPU kernels leave the output unchanged."""
  cfg = dict(TEXT, zero_init=False)
  module, params, _, _, cond = _init(cfg)
  apply = jax.jit(module.apply)
  params = _random_like(params, 5)
  x, t, cond = _inputs(cfg, cond)
  drop = dict(cond, drop_text=jnp.array([True, False]))
  a = np.asarray(apply({'params': params}, x, t, drop))
  other = dict(drop, text_tokens=drop['text_tokens'] * 3.0)
  b = np.asarray(apply({'params': params}, x, t, other))
  np.testing.assert_array_equal(a[0], b[0])
  assert np.abs(a[1] - b[1]).max() > 1e-3
  fast = DiT(**dict(cfg, remat_policy='full', cpu_kernels=True))
  c = np.asarray(jax.jit(lambda p: fast.apply({'params': p}, x, t, drop))(params))
  np.testing.assert_allclose(a, c, atol=1e-5 * np.abs(a).max())


def test_example_inputs_and_logical_axes():
  x, t, cond = example_inputs(CLASS, 3)
  assert x.shape == (3, 8, 8, 4) and t.shape == (3,)
  assert cond['class_labels'].dtype == jnp.int32 and cond['drop_class'].shape == (3,)
  _, _, tcond = example_inputs(dict(TEXT, learned_null_text=False), 2)
  assert tcond['text_tokens'].shape == (2, 5, 12) and 'null_text_tokens' in tcond
  boxed = DiT(**CLASS).init(jax.random.key(0), x, t, cond)['params']
  specs = flax.linen.get_partition_spec(boxed)
  assert specs['blocks']['query']['kernel'] == jax.sharding.PartitionSpec(
      'layers', 'embed', 'heads', 'kv')
  assert specs['cond_embed']['class_embedding'] == jax.sharding.PartitionSpec('vocab', 'embed')
