"""Building blocks: embeddings, residual blocks, attention masking, scan/remat equivalence."""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import layers


def _randn(seed, shape):
  # numpy draws: jax.random would compile a kernel per shape, which dominates tiny tests.
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _perturb(params, seed, scale=0.1):
  """Adds noise to every parameter so that zero-initialised output layers become live."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda p: p + jnp.asarray(scale * rng.standard_normal(p.shape), p.dtype), params)


def _unboxed_init(module, *args):
  return nn.meta.unbox(jax.jit(module.init)(jax.random.key(0), *args))['params']


def _apply(module):
  """Jitted `apply(params, *args)`: one compile serves every call with the same shapes."""
  return jax.jit(lambda p, *args: module.apply({'params': p}, *args))


def test_sinusoidal_embedding_closed_form():
  x_B = jnp.array([0.0, 1.0, 250.0])
  dim = 8
  emb = np.asarray(layers.sinusoidal_embedding(x_B, dim))
  assert emb.shape == (3, dim)
  freqs = np.exp(-math.log(10000.0) * np.arange(4) / 4)
  xs = np.asarray(x_B)[:, None]
  expected = np.concatenate([np.cos(xs * freqs[None]), np.sin(xs * freqs[None])], -1)
  np.testing.assert_allclose(emb, expected, rtol=1e-5, atol=1e-5,
                             err_msg='sinusoidal embedding is not [cos(x f), sin(x f)]')


def test_time_embedding_scales_t_by_1000():
  """Networks embed 1000 * t: t = 0.001 must embed like the integer step 1."""
  m = layers.TimeEmbedding(features=8, sin_dim=8)
  p = _unboxed_init(m, jnp.zeros((1,)))
  sin = layers.sinusoidal_embedding(jnp.array([1.0]), 8)
  direct = m.apply({'params': p}, jnp.array([0.001]))
  via_sin = nn.Dense(8).apply({'params': p['Dense_1']}, nn.silu(
      nn.Dense(8).apply({'params': p['Dense_0']}, sin)))
  np.testing.assert_allclose(direct, via_sin, rtol=1e-4, atol=1e-5,
                             err_msg='TimeEmbedding does not embed 1000 * t')


@pytest.mark.parametrize('up,down', [(False, False), (True, False), (False, True)])
def test_resblock_shapes_and_zero_init_identity(up, down):
  x = _randn(1, (2, 8, 8, 16))
  emb = _randn(2, (2, 32))
  m = layers.ResBlock(out_channels=16, up=up, down=down, norm_groups=4)
  p = _unboxed_init(m, x, emb)
  apply = _apply(m)
  out = apply(p, x, emb)
  size = 16 if up else (4 if down else 8)
  assert out.shape == (2, size, size, 16), f'ResBlock(up={up}, down={down}) gave {out.shape}'
  # The last conv starts at zero: a fresh block passes its (resampled) input through.
  expected = layers._resample(x, up, down)
  np.testing.assert_allclose(out, expected, atol=1e-6,
                             err_msg='fresh ResBlock is not the identity on its skip path')


def _conv_ref(p, x, padding='SAME'):
  return jax.lax.conv_general_dilated(x, p['kernel'], (1, 1), padding,
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + p['bias'][None, None, None]


def _nearest_up(x):
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


@pytest.mark.parametrize('kernel_size', [3, 1])
def test_upsampled_conv_is_conv_of_nearest_upsampling(kernel_size):
  """The sub-pixel form must equal the conv of the upsampled map, borders included, with
  nn.Conv's parameters (a non-square map and a change of width)."""
  x = _randn(4, (2, 5, 3, 6))
  m = layers.UpsampledConv(10, kernel_size)
  p = _perturb(_unboxed_init(m, x), 5, scale=0.3)
  shapes = jax.tree.map(jnp.shape, p)
  assert shapes == {'kernel': (kernel_size, kernel_size, 6, 10), 'bias': (10,)}, shapes
  expected = _conv_ref(p, _nearest_up(x))
  np.testing.assert_allclose(_apply(m)(p, x), expected, rtol=1e-5, atol=1e-5,
                             err_msg='UpsampledConv differs from conv(nearest_upsample(x))')


@pytest.mark.parametrize('kernel,stride,padding', [
    (1, 1, 'SAME'), (1, 2, 'VALID'), (2, 1, 'VALID'), (2, 2, ((1, 0), (0, 1))), (3, 2, 'SAME')])
def test_matmul_weight_grad_equals_xla_conv_grad(kernel, stride, padding):
  """The per-tap matmul weight gradient (and the input gradient beside it) must equal XLA's
  conv VJP: strides, explicit asymmetric pads and a non-square map included."""
  x, w = _randn(1, (3, 9, 7, 5)), _randn(2, (kernel, kernel, 5, 6))
  g_BHWO = _randn(3, jax.eval_shape(
      lambda: layers.conv_nhwc(x, w, (stride, stride), padding)).shape)

  def loss(x, w, max_kernel):
    y = layers.conv_nhwc(x, w, (stride, stride), padding,
                         matmul_weight_grad_max_kernel=max_kernel)
    return jnp.sum(y * g_BHWO)

  assert 'custom_vjp' in str(jax.make_jaxpr(loss, static_argnums=2)(x, w, kernel)), (
      'matmul_weight_grad_max_kernel >= kernel did not take the per-tap matmul gradient')
  ours = jax.jit(jax.grad(loss, (0, 1)), static_argnums=2)(x, w, kernel)
  xla = jax.jit(jax.grad(loss, (0, 1)), static_argnums=2)(x, w, 0)
  for name, a, b in zip(('input', 'weight'), ours, xla):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4,
                               err_msg=f'per-tap matmul conv: {name} gradient differs from XLA')


def test_resblock_matmul_weight_grads_same_gradients_and_flops():
  """An up ResBlock (2x2 phase conv, 1x1 skip conv) with per-tap matmul weight gradients:
  the same parameters, gradients and counted FLOPs as with XLA's."""
  from diffusion_jax import flops
  x, emb = _randn(1, (2, 4, 6, 16)), _randn(2, (2, 32))
  blocks = [layers.ResBlock(out_channels=8, up=True, norm_groups=4,
                            matmul_weight_grad_max_kernel=k) for k in (0, 2)]
  p = _perturb(_unboxed_init(blocks[0], x, emb), 6)
  assert jax.tree.map(jnp.shape, p) == jax.tree.map(jnp.shape, _unboxed_init(blocks[1], x, emb))
  # Inside a network the block's input needs its gradient too (a custom VJP always makes it).
  grad_fns = [jax.grad(lambda p, x, m=m: jnp.sum(jnp.sin(m.apply({'params': p}, x, emb))),
                       (0, 1)) for m in blocks]
  xla, ours = (jax.jit(f)(p, x) for f in grad_fns)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-5, atol=1e-5, err_msg='matmul weight gradients change ResBlock gradients'),
      xla, ours)
  assert flops.count_flops(grad_fns[0], p, x) == flops.count_flops(grad_fns[1], p, x), (
      'the per-tap weight gradient changed the analytic FLOP count')


@pytest.mark.parametrize('shape,groups', [((2, 6, 5, 64), 32), ((3, 7, 24), 8)])
def test_group_norm_equals_flax_group_norm(shape, groups):
  """layers.GroupNorm (per-channel sums first) is nn.GroupNorm: parameters, output, grads."""
  x = _randn(1, shape) * 3.0 + 1.5  # an offset mean: the variance formula is exercised
  ours, ref = layers.GroupNorm(groups), nn.GroupNorm(num_groups=groups, epsilon=1e-5)
  p = _perturb(_unboxed_init(ours, x), 2, scale=0.3)
  assert jax.tree.map(jnp.shape, p) == jax.tree.map(jnp.shape, _unboxed_init(ref, x))
  np.testing.assert_allclose(_apply(ours)(p, x), _apply(ref)(p, x), rtol=1e-5, atol=1e-5,
                             err_msg='GroupNorm differs from nn.GroupNorm')
  grads = [jax.jit(jax.grad(lambda p, x, m=m: jnp.sum(jnp.sin(m.apply({'params': p}, x))),
                            (0, 1)))(p, x) for m in (ours, ref)]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-4, atol=1e-4, err_msg='GroupNorm gradients differ from nn.GroupNorm'),
      *grads)


@pytest.mark.parametrize('block', ['res', 'attn', 'cross', 'ff'])
def test_inference_group_norm_same_output(block):
  """Blocks normalise with layers.GroupNorm for inference (sampling) and with nn.GroupNorm
  when training: the same parameters give the same output."""
  x, emb = _randn(1, (2, 8, 8, 64)), _randn(2, (2, 32))
  ctx, ctx_mask = _randn(3, (2, 5, 16)), jnp.arange(5)[None, :] < jnp.array([[5], [2]])
  make, args = {
      'res': (lambda i: layers.ResBlock(out_channels=64, deterministic=i), (x, emb)),
      'attn': (lambda i: layers.ImageAttention(num_heads=2, inference=i), (x,)),
      'cross': (lambda i: layers.CrossAttention(num_heads=2, inference=i), (x, ctx, ctx_mask)),
      'ff': (lambda i: layers.FeedForward2d(inference=i), (x,)),
  }[block]
  p = _perturb(_unboxed_init(make(True), *args), 3)
  outs = [_apply(make(i))(p, *args) for i in (True, False)]
  np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5,
                             err_msg=f'{block}: inference and training forms disagree')
  jaxprs = [str(jax.make_jaxpr(lambda p, i=i: make(i).apply({'params': p}, *args))(p))
            for i in (True, False)]
  assert jaxprs[0] != jaxprs[1], f'{block}: the inference flag does not reach its GroupNorm'


def test_resblock_up_is_resample_then_conv():
  """BigGAN up block: GN-SiLU, upsample, conv ...; skip: upsample, 1x1 conv (C_in != C)."""
  x = _randn(1, (2, 4, 6, 16))
  emb = _randn(2, (2, 32))
  m = layers.ResBlock(out_channels=8, up=True, norm_groups=4)
  p = _perturb(_unboxed_init(m, x, emb), 6)
  gn = lambda name, v: nn.GroupNorm(num_groups=4, epsilon=1e-5).apply({'params': p[name]}, v)
  h = _conv_ref(p['Conv_0'], _nearest_up(nn.silu(gn('GroupNorm_0', x))))
  e = nn.Dense(16).apply({'params': p['Dense_0']}, nn.silu(emb))[:, None, None, :]
  h = gn('GroupNorm_1', h) * (1 + e[..., :8]) + e[..., 8:]
  h = _conv_ref(p['Conv_1'], nn.silu(h))
  expected = _conv_ref(p['Conv_2'], _nearest_up(x)) + h
  np.testing.assert_allclose(_apply(m)(p, x, emb), expected, rtol=1e-4, atol=1e-5,
                             err_msg='ResBlock(up=True) is not upsample-then-conv')


def test_resblock_uses_embedding_scale_shift():
  x = _randn(1, (2, 8, 8, 16))
  emb = _randn(2, (2, 32))
  m = layers.ResBlock(out_channels=24, norm_groups=4)
  p = _perturb(_unboxed_init(m, x, emb), 3)
  apply = _apply(m)
  a = apply(p, x, emb)
  b = apply(p, x, emb + 1.0)
  assert a.shape == (2, 8, 8, 24)
  assert float(jnp.abs(a - b).max()) > 1e-3, 'ResBlock output ignores the embedding'


@pytest.mark.parametrize('masked', [False, True])
def test_query_chunked_attention_equals_whole(masked):
  """Chunked queries give the whole attention's output and gradients (key mask or none)."""
  q, k, v = (_randn(s, (2, 12, 2, 4)) for s in (1, 2, 3))
  mask = layers.key_mask(jnp.arange(12)[None, :] < jnp.array([[12], [7]])) if masked else None
  w_BTNH = _randn(4, (2, 12, 2, 4))  # a weighted loss: position-sensitive gradients

  def out_and_grads(chunk):
    f = lambda q, k, v: layers.attention(q, k, v, mask, chunk)
    return f(q, k, v), jax.grad(lambda *a: jnp.sum(w_BTNH * f(*a)), (0, 1, 2))(q, k, v)
  (whole, g_whole), (chunked, g_chunked) = out_and_grads(0), out_and_grads(4)
  np.testing.assert_allclose(chunked, whole, rtol=1e-5, err_msg='query chunks change the output')
  for a, b in zip(g_chunked, g_whole):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg='query chunks change grads')


@pytest.mark.parametrize('chunk', [0, 4])
def test_einsum_attention_equals_jax_attention(chunk):
  """impl='einsum' is jax.nn.dot_product_attention written out: the same output and
  gradients, a key mask included, and a fully masked row (all values averaged) too."""
  q, k, v = _randn(1, (3, 12, 2, 4)), _randn(2, (3, 5, 2, 4)), _randn(3, (3, 5, 2, 4))
  mask = layers.key_mask(jnp.arange(5)[None, :] < jnp.array([[5], [2], [0]]))
  w_BTNH = _randn(4, (3, 12, 2, 4))

  def out_and_grads(impl):
    f = lambda q, k, v: layers.attention(q, k, v, mask, chunk, impl)
    return f(q, k, v), jax.grad(lambda *a: jnp.sum(w_BTNH * f(*a)), (0, 1, 2))(q, k, v)
  (ref, g_ref), (ours, g_ours) = out_and_grads('jax'), out_and_grads('einsum')
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6,
                             err_msg='einsum attention differs from jax.nn.dot_product_attention')
  np.testing.assert_allclose(ours[2], jnp.broadcast_to(v[2].mean(0), (12, 2, 4)), rtol=1e-5,
                             err_msg='a fully masked row is not the mean of the values')
  for name, a, b in zip('qkv', g_ours, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6,
                               err_msg=f'einsum attention: d{name} differs from jax')
  with pytest.raises(ValueError, match='attention impl'):
    layers.attention(q, k, v, impl='flash')


def test_glide_attention_ignores_masked_text_tokens():
  x = _randn(1, (2, 4, 4, 16))
  ctx = _randn(2, (2, 5, 12))
  mask = jnp.array([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], bool)
  m = layers.ImageAttention(num_heads=2, norm_groups=4)
  p = _perturb(_unboxed_init(m, x, ctx, mask), 3)
  apply = _apply(m)
  out = apply(p, x, ctx, mask)
  ctx_pad = ctx.at[:, 3:].set(100.0)  # only padding changes
  out_pad = apply(p, x, ctx_pad, mask)
  np.testing.assert_allclose(out, out_pad, atol=1e-5, err_msg='padding tokens leak into attention')
  ctx_real = ctx.at[:, 0].add(1.0)  # a real token changes
  out_real = apply(p, x, ctx_real, mask)
  assert float(jnp.abs(out - out_real).max()) > 1e-3, 'text tokens do not reach the keys/values'
  assert 'context_key' in p and 'context_value' in p, 'no per-layer text key/value projection'


def test_cross_attention_fully_masked_is_learned_null():
  x = _randn(1, (2, 4, 4, 16))
  ctx = _randn(2, (2, 5, 12))
  mask = jnp.zeros((2, 5), bool)
  m = layers.CrossAttention(num_heads=2, norm_groups=4)
  p = _perturb(_unboxed_init(m, x, ctx, mask), 3)
  apply = _apply(m)
  a = apply(p, x, ctx, mask)
  b = apply(p, x, ctx * 3.0 + 1.0, mask)
  assert bool(jnp.all(jnp.isfinite(a))), 'fully masked cross-attention is not finite'
  np.testing.assert_allclose(a, b, atol=1e-5, err_msg='masked context still changes the output')
  c = apply(p, x, ctx, jnp.ones((2, 5), bool))
  assert float(jnp.abs(a - c).max()) > 1e-3, 'unmasked context does not change the output'


def test_attention_pool_ignores_padding():
  tok = _randn(1, (2, 6, 16))
  mask = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], bool)
  m = layers.AttentionPool(features=24, num_heads=2)
  p = _perturb(_unboxed_init(m, tok, mask), 3)
  apply = _apply(m)
  a = apply(p, tok, mask)
  b = apply(p, tok.at[:, 4:].set(-50.0), mask)
  assert a.shape == (2, 24)
  np.testing.assert_allclose(a, b, atol=1e-5, err_msg='attention pooling reads padding tokens')
  # (a constant shift would vanish in the LayerNorm: change the token's direction instead)
  c = apply(p, tok.at[:, 0].set(_randn(4, (2, 16))),
              mask)
  assert float(jnp.abs(a - c).max()) > 1e-4, 'attention pooling ignores the real tokens'


def _stack(scan: bool, remat: str = 'none', num_layers: int = 3):
  return layers.TransformerStack(num_layers=num_layers, width=16, num_heads=2, scan_layers=scan,
                                 remat_policy=remat)


def test_scan_and_unrolled_stacks_agree():
  x = _randn(1, (2, 5, 16))
  mask = jnp.tril(jnp.ones((5, 5), bool))[None, None]
  unrolled = _stack(False)
  p_unrolled = _unboxed_init(unrolled, x, mask)
  assert set(p_unrolled) == {'layers_0', 'layers_1', 'layers_2'}
  p_scan = layers.stack_layer_params(p_unrolled, 3)
  scanned = _stack(True)
  ref_shapes = jax.tree.map(jnp.shape, _unboxed_init(scanned, x, mask))
  assert jax.tree.map(jnp.shape, p_scan) == ref_shapes, 'scan layout differs from stacked layers'
  a = _apply(unrolled)(p_unrolled, x, mask)
  b = _apply(scanned)(p_scan, x, mask)
  np.testing.assert_allclose(a, b, atol=1e-5, err_msg='scanned stack differs from unrolled stack')


def test_scanned_params_carry_layers_axis_name():
  x = jnp.zeros((1, 5, 16))
  boxed = jax.eval_shape(_stack(True).init, jax.random.key(0), x,
                         jnp.ones((1, 1, 1, 5), bool))['params']
  specs = nn.get_partition_spec(boxed)
  q = specs['layers']['query']['kernel']
  assert tuple(q) == ('layers', 'embed', 'heads', 'kv'), f'scanned query kernel spec {q}'


@pytest.fixture(scope='module')
def remat_case():
  x = _randn(1, (2, 5, 16))
  mask = jnp.ones((2, 1, 1, 5), bool)
  p = _perturb(_unboxed_init(_stack(True), x, mask), 2, 0.02)

  def grads(m):
    return jax.jit(jax.grad(lambda p: jnp.sum(m.apply({'params': p}, x, mask) ** 2)))(p)

  return grads, grads(_stack(True))


@pytest.mark.parametrize('policy', ['full', 'dots_saveable'])
def test_remat_gives_same_gradients(remat_case, policy):
  grads, g0 = remat_case
  x, mask = jnp.zeros((2, 5, 16)), jnp.ones((2, 1, 1, 5), bool)
  p0 = jax.tree.map(jnp.zeros_like, g0)
  jaxpr = lambda m: str(jax.make_jaxpr(lambda p: m.apply({'params': p}, x, mask))(p0))
  assert 'checkpoint' in jaxpr(_stack(True, policy)) or 'remat' in jaxpr(_stack(True, policy)), (
      f'remat_policy={policy} did not wrap the blocks in jax.checkpoint')
  assert 'checkpoint' not in jaxpr(_stack(True)), "remat_policy='none' still rematerialises"
  g1 = grads(_stack(True, policy))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, atol=1e-5, rtol=1e-5, err_msg=f'remat policy {policy} changes gradients'), g0, g1)


def test_remat_policy_names():
  assert layers.maybe_remat(layers.ResBlock, 'none') is layers.ResBlock
  assert layers.remat_policy('full') is None
  assert layers.remat_policy('dots_saveable') is jax.checkpoint_policies.dots_saveable
  with pytest.raises(ValueError, match='unknown remat policy'):
    layers.remat_policy('sometimes')
