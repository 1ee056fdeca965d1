"""T5 encoder: parity with transformers (v1.0 and v1.1), sharded checkpoints, paper size."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

import hf_fixtures
from diffusion_jax.parallel import DEFAULT_LOGICAL_RULES
from diffusion_jax import convert, parallel
from diffusion_jax.models import t5


def _reference(model, ids, mask):
  import torch
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()


@pytest.mark.parametrize('ffn', ['relu', 'gated-gelu'])
def test_parity_with_transformers(ffn):
  model, path = hf_fixtures.t5_model(ffn)
  module, params = convert.load_t5(path)
  assert module.feed_forward_proj == ffn and module.relative_attention_num_buckets == 8
  ids, mask = hf_fixtures.t5_batch()
  ref = _reference(model, ids, mask)
  out = np.asarray(jax.jit(module.apply)({'params': params}, ids, mask))
  assert out.shape == ref.shape == (3, 40, 32)
  err = np.abs(out - ref).max()
  assert err < 1e-4, f'T5 ({ffn}) hidden states differ from transformers by {err}'
  # Valid tokens must not see padding: changing pad ids leaves them unchanged.
  ids2 = np.where(mask == 1, ids, 7)
  out2 = np.asarray(module.apply({'params': params}, ids2, mask))
  assert np.abs((out2 - out)[mask == 1]).max() < 1e-5, 'T5 attends to padded positions'


def test_wrong_activation_breaks_parity():
  # The v1.1 checkpoint run with the v1.0 FFN must not match: the test can tell them apart.
  model, path = hf_fixtures.t5_model('gated-gelu')
  module, params = convert.load_t5(path)
  ids, mask = hf_fixtures.t5_batch()
  wrong = module.clone(dense_act_fn='gelu')  # exact GELU instead of the tanh approximation
  err = np.abs(np.asarray(wrong.apply({'params': params}, ids, mask)) - _reference(model, ids, mask)).max()
  assert err > 1e-4, 'parity check is insensitive to the gated-GELU approximation'


def test_sharded_safetensors_loads_identically():
  sharded = hf_fixtures.t5_sharded_dir('gated-gelu')
  import os
  assert os.path.exists(os.path.join(sharded, 'model.safetensors.index.json')), 'fixture did not shard'
  _, single = hf_fixtures.t5_model('gated-gelu')
  _, p_single = convert.load_t5(single)
  _, p_sharded = convert.load_t5(sharded)
  a, b = traverse_util.flatten_dict(p_single), traverse_util.flatten_dict(p_sharded)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=f'sharded load differs at {k}')


def test_relative_position_buckets_match_reference():
  torch = pytest.importorskip('torch')
  from transformers.models.t5.modeling_t5 import T5Attention
  rel = np.arange(-200, 201)[None, :]
  for nb, md in ((32, 128), (8, 20)):
    ref = T5Attention._relative_position_bucket(torch.tensor(rel), True, nb, md).numpy()
    ours = np.asarray(t5.relative_position_bucket(jnp.asarray(rel), nb, md))
    np.testing.assert_array_equal(ours, ref, err_msg=f'buckets differ (num_buckets={nb})')


def test_logical_names_shard_params():
  module = t5.make('tiny')
  abstract = t5.abstract_params(module, boxed=True)
  mesh = parallel.create_mesh(dict(data=1, fsdp=2, tensor=4))
  shardings = parallel.logical_shardings(abstract, mesh, DEFAULT_LOGICAL_RULES)
  flat = traverse_util.flatten_dict(shardings)
  assert flat[('layers', 'attn', 'q', 'kernel')].spec == P(None, 'fsdp', 'tensor', None)
  assert flat[('layers', 'ffn', 'wo', 'kernel')].spec == P(None, 'tensor', 'fsdp')
  assert flat[('shared', 'embedding')].spec == P('tensor', 'fsdp')
  # Scanned layers: one stacked leaf per parameter, leading axis = num_layers.
  shapes = traverse_util.flatten_dict(t5.abstract_params(module))
  assert shapes[('layers', 'attn', 'q', 'kernel')].shape == (2, 32, 4, 8)


def test_init_and_apply_under_mesh_context():
  # The trainer traces under jax.set_mesh + logical rules; boxed 3-d kernels must still init.
  import flax.linen as nn
  module = t5.make('tiny')
  mesh = parallel.create_mesh(dict(data=2, fsdp=2, tensor=2))
  shardings = parallel.logical_shardings(t5.abstract_params(module, boxed=True), mesh,
                                         DEFAULT_LOGICAL_RULES)
  ids = jnp.ones((4, 8), jnp.int32)
  with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_LOGICAL_RULES):
    params = jax.jit(lambda k: nn.meta.unbox(module.init(k, ids)['params']),
                     out_shardings=shardings)(jax.random.PRNGKey(0))
    out = jax.jit(module.apply)({'params': params}, ids, ids > 0)
  ref = module.apply({'params': jax.device_get(params)}, ids, ids > 0)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


def test_xxl_param_count():
  module = t5.make('xxl')
  shapes = t5.abstract_params(module, length=4)
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  assert abs(n - 4.76e9) / 4.76e9 < 0.02, f'T5-XXL encoder has {n / 1e9:.3f}B params, expected ~4.76B'
  assert module.feed_forward_proj == 'gated-gelu' and module.num_layers == 24


def test_xxl_compiles_fsdp_sharded():
  # Paper size without allocating: abstract params placed by their logical names on an
  # 8-way FSDP mesh; each device must hold about 1/8 of the 19 GB of float32 weights.
  import flax.linen as nn
  from jax.sharding import NamedSharding
  module = t5.make('xxl')
  boxed = t5.abstract_params(module, boxed=True)
  mesh = parallel.create_mesh(dict(data=1, fsdp=8, tensor=1))
  shardings = parallel.logical_shardings(boxed, mesh, DEFAULT_LOGICAL_RULES)
  args = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      nn.meta.unbox(boxed), shardings)
  batch = NamedSharding(mesh, P(parallel.BATCH_AXES, None))
  ids = jax.ShapeDtypeStruct((8, 128), jnp.int32, sharding=batch)
  mask = jax.ShapeDtypeStruct((8, 128), bool, sharding=batch)
  with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_LOGICAL_RULES):
    compiled = jax.jit(lambda p, i, m: module.apply({'params': p}, i, m)).lower(args, ids, mask).compile()
  per_device = compiled.memory_analysis().argument_size_in_bytes
  total = 4 * sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(boxed)))
  assert per_device < 1.05 * total / 8, f'{per_device / 1e9:.2f} GB per device of {total / 1e9:.1f} GB: not FSDP-sharded'
