"""Networks on a (data=2, fsdp=2, tensor=2) mesh of the 8 simulated CPU devices: parameters
initialised directly into their shardings, the forward pass equal to the single-device one,
and the partition specs of representative parameters pinned."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import common
from diffusion_jax import models, parallel
from net_fixtures import config, random_inputs, random_params

B = 8  # divisible by data * fsdp


@pytest.fixture(scope='module')
def mesh(num_devices):
  return parallel.create_mesh(common.mesh_config(data=2, fsdp=2, tensor=2))


_CACHE: dict = {}


def _sharded(family, stage, mesh, materialize=True):
  key = (family, stage, materialize)
  if key not in _CACHE:
    _CACHE[key] = _build(family, stage, mesh, materialize)
  return _CACHE[key]


def _build(family, stage, mesh, materialize):
  cfg = config(family, stage)
  rules = parallel.logical_rules(cfg.mesh)
  module = models.build(cfg.model)
  x0, t0, c0 = models.example_inputs(cfg.model, B)
  init = lambda key: module.init(key, x0, t0, c0)['params']
  abstract = jax.eval_shape(init, jax.random.key(0))
  shardings = parallel.logical_shardings(abstract, mesh, rules)
  if not materialize:
    return cfg, module, rules, abstract, shardings, None
  params = jax.jit(lambda k: nn.meta.unbox(init(k)), out_shardings=shardings)(jax.random.key(0))
  return cfg, module, rules, abstract, shardings, params


def test_init_directly_into_shardings(mesh):
  _, _, _, _, shardings, params = _sharded('unclip', 'prior', mesh)
  jax.tree_util.tree_map_with_path(
      lambda path, p, s: None if p.sharding.is_equivalent_to(s, p.ndim) else pytest.fail(
          f'{jax.tree_util.keystr(path)} initialised as {p.sharding}, wanted {s}'),
      params, shardings)
  n_sharded = sum(1 for p in jax.tree.leaves(params) if not p.sharding.is_fully_replicated)
  assert n_sharded > len(jax.tree.leaves(params)) // 2, 'most parameters are replicated'


@pytest.mark.parametrize('family,stage', [('glide', 'base64'), ('imagen', 'sr256'),
                                          ('unclip', 'prior')])
def test_sharded_forward_equals_single_device(family, stage, mesh):
  cfg, module, rules, _, shardings, _ = _sharded(family, stage, mesh, materialize=False)
  # Random non-zero params (zero-initialised output layers would make the comparison trivial).
  host_params = random_params(module, cfg.model)
  params = jax.device_put(host_params, shardings)
  x, t, cond = random_inputs(cfg.model)
  x, t, cond = jax.tree.map(lambda a: jnp.concatenate([a] * (B // a.shape[0])), (x, t, cond))

  single = jax.jit(lambda p, x, t, c: module.apply({'params': p}, x, t, c))(
      jax.device_put(host_params, jax.devices()[0]), x, t, cond)

  batch = parallel.shard_batch(jax.device_get((x, t, cond)), mesh)
  fwd = jax.jit(lambda p, x, t, c: module.apply({'params': p}, x, t, c),
                out_shardings=parallel.batch_sharding(mesh, single.ndim))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    out = fwd(params, *batch)
    jaxpr = str(jax.make_jaxpr(lambda p, *b: module.apply({'params': p}, *b))(params, *batch))
  assert 'sharding_constraint' in jaxpr, 'activation logical constraints were not applied'
  assert float(jnp.abs(single).max()) > 1e-3, 'degenerate output'
  np.testing.assert_allclose(np.asarray(out), np.asarray(single), atol=1e-5, rtol=1e-5,
                             err_msg=f'{family}/{stage}: sharded forward != single device')


def test_pinned_partition_specs(mesh):
  _, _, _, abstract, shardings, _ = _sharded('glide', 'base64', mesh, materialize=False)
  logical = nn.get_partition_spec(abstract)
  want = {
      # first conv: 3 input channels cannot be split over fsdp=2 -> fsdp joins the outputs
      ('in_conv', 'kernel'): ((None, None, 'conv_in', 'conv_out'),
                              P(None, None, None, ('tensor', 'fsdp'))),
      ('down0_res0', 'Conv_0', 'kernel'): ((None, None, 'conv_in', 'conv_out'),
                                           P(None, None, 'fsdp', 'tensor')),
      ('down0_res0', 'Dense_0', 'kernel'): (('embed', 'conv_out'), P('fsdp', 'tensor')),
      ('down1_0_attn', 'query', 'kernel'): (('embed', 'heads', 'kv'), P('fsdp', 'tensor', None)),
      ('down1_0_attn', 'out', 'kernel'): (('heads', 'kv', 'embed'), P('tensor', None, 'fsdp')),
      ('down1_0_attn', 'context_key', 'kernel'): (('embed', 'heads', 'kv'),
                                                  P('fsdp', 'tensor', None)),
      ('text_transformer', 'token_embedding', 'embedding'): (('vocab', 'embed'),
                                                             P('tensor', 'fsdp')),
      ('text_transformer', 'transformer', 'layers', 'Dense_0', 'kernel'): (
          ('layers', 'embed', 'mlp'), P(None, 'fsdp', 'tensor')),
      ('text_transformer', 'transformer', 'layers', 'query', 'kernel'): (
          ('layers', 'embed', 'heads', 'kv'), P(None, 'fsdp', 'tensor', None)),
      ('out_norm', 'scale'): (('norm',), P(None)),
  }
  for path, (names, spec) in want.items():
    node_l, node_s = logical, shardings
    for k in path:
      node_l, node_s = node_l[k], node_s[k]
    assert tuple(node_l) == names, f'{"/".join(path)}: logical names {tuple(node_l)} != {names}'
    assert node_s.spec == spec, f'{"/".join(path)}: mesh spec {node_s.spec} != {spec}'


def test_every_parameter_has_logical_names():
  for family, stage in [('imagen', 'base64'), ('imagen', 'sr256'), ('glide', 'up256'),
                        ('unclip', 'decoder64'), ('unclip', 'prior')]:
    cfg = config(family, stage)
    module = models.build(cfg.model)
    x, t, c = models.example_inputs(cfg.model, 1)
    boxed = jax.eval_shape(module.init, jax.random.key(0), x, t, c)['params']
    leaves = jax.tree_util.tree_leaves_with_path(
        boxed, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
    bare = [jax.tree_util.keystr(p) for p, v in leaves
            if not isinstance(v, nn.LogicallyPartitioned)]
    assert not bare, f'{family}/{stage}: parameters without logical axis names: {bare[:5]}'
    wrong = [jax.tree_util.keystr(p) for p, v in leaves if len(v.names) != v.value.ndim]
    assert not wrong, f'{family}/{stage}: names do not match ranks: {wrong[:5]}'


@pytest.mark.parametrize('shape, logical, sizes, want', [
    # a decoder ResBlock's first conv on fsdp=128: 2240 concatenated inputs, 1280 outputs
    ((3, 3, 2240, 1280), (None, None, 'conv_in', 'conv_out'), (1, 128, 1),
     P(None, None, None, ('tensor', 'fsdp'))),
    # neither 2240 nor 960 divides by 128: replicated over fsdp, as nothing else fits
    ((3, 3, 2240, 960), (None, None, 'conv_in', 'conv_out'), (1, 128, 1),
     P(None, None, None, 'tensor')),
    ((3, 3, 2240, 960), (None, None, 'conv_in', 'conv_out'), (2, 64, 1),
     P(None, None, 'fsdp', 'tensor')),
    # tensor=2 cannot split 3 heads: it joins fsdp on the embedding dimension
    ((64, 3, 16), ('embed', 'heads', 'kv'), (1, 4, 2), P(('fsdp', 'tensor'), None, None)),
    # the largest dimension the rules shard takes the axis; 'layers' and 'kv' never do
    ((24, 6, 32, 48), ('layers', 'embed', 'mlp', 'kv'), (1, 4, 1),
     P(None, None, ('tensor', 'fsdp'), None)),
    ((5,), ('norm',), (1, 4, 2), P(None)),
])
def test_axes_that_do_not_divide_move_to_another_dimension(shape, logical, sizes, want):
  mesh = jax.sharding.AbstractMesh(sizes, parallel.MESH_AXES)
  rules = parallel.logical_rules(common.mesh_config())
  got = parallel.spec_for_shape(shape, P(*logical), mesh, rules)
  assert got == want, f'{shape} {logical} on {sizes}: {got} != {want}'
