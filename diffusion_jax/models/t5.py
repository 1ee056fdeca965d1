"""T5 encoder stack (v1.0 ReLU FFN and v1.1 / Flan gated-GELU FFN), numerically matching
transformers' `T5EncoderModel`.

Imagen conditions on the frozen T5-XXL v1.1 encoder. The layers run under `nn.scan`, so the
per-layer parameters carry a leading `layers` axis; every parameter has logical axis names
(`vocab`, `embed`, `heads`, `kv`, `mlp`) so that the 4.8B-parameter XXL encoder shards
FSDP / tensor-parallel through the config's logical rules.

    module, params = convert.load_t5('/path/to/t5-v1_1-xxl')   # config.json + *.safetensors
    hidden_BLD = module.apply({'params': params}, ids_BL, mask_BL)
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# Shapes of the published checkpoints; 'tiny' and 'small' are for tests and the CPU demo.
PRESETS: dict[str, dict[str, Any]] = {
    'tiny': dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, d_kv=8, d_ff=64),
    'small': dict(vocab_size=128, d_model=64, num_layers=4, num_heads=4, d_kv=16, d_ff=256),
    # google/t5-v1_1-small / base / large / xl / xxl (encoder only).
    't5_v1_1_small': dict(d_model=512, num_layers=8, num_heads=6, d_kv=64, d_ff=1024),
    't5_v1_1_base': dict(d_model=768, num_layers=12, num_heads=12, d_kv=64, d_ff=2048),
    't5_v1_1_large': dict(d_model=1024, num_layers=24, num_heads=16, d_kv=64, d_ff=2816),
    't5_v1_1_xl': dict(d_model=2048, num_layers=24, num_heads=32, d_kv=64, d_ff=5120),
    'xxl': dict(vocab_size=32128, d_model=4096, num_layers=24, num_heads=64, d_kv=64, d_ff=10240,
                feed_forward_proj='gated-gelu'),
}


def _activation(name: str):
  # Names as in transformers' ACT2FN; T5 v1.1's "gated-gelu" means the tanh approximation.
  table = {
      'relu': jax.nn.relu,
      'gelu': lambda x: jax.nn.gelu(x, approximate=False),
      'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),
      'gelu_pytorch_tanh': lambda x: jax.nn.gelu(x, approximate=True),
      'silu': jax.nn.silu,
      'swish': jax.nn.silu,
  }
  if name not in table:
    raise ValueError(f'T5: unsupported activation {name!r}; known: {", ".join(sorted(table))}')
  return table[name]


def parse_ffn(feed_forward_proj: str, dense_act_fn: str | None = None) -> tuple[bool, str]:
  """(gated, activation name) from transformers' `feed_forward_proj` ('relu', 'gated-gelu')."""
  parts = feed_forward_proj.split('-')
  gated = len(parts) > 1 and parts[0] == 'gated'
  if len(parts) > 2 or (len(parts) == 2 and not gated):
    raise ValueError(f'T5: feed_forward_proj={feed_forward_proj!r} must be "ACT" or "gated-ACT"')
  act = dense_act_fn or ('gelu_new' if feed_forward_proj == 'gated-gelu' else parts[-1])
  _activation(act)
  return gated, act


def relative_position_bucket(relative_position, num_buckets: int = 32, max_distance: int = 128):
  """Bidirectional bucketing of (key - query) offsets, as in Mesh TensorFlow / transformers."""
  num_buckets //= 2
  buckets = (relative_position > 0).astype(jnp.int32) * num_buckets
  n = jnp.abs(relative_position)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  # float32 log as the reference does; max(n, 1) only avoids log(0) in the unused branch.
  large = max_exact + (
      jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact)
      / math.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return buckets + jnp.where(is_small, n, large)


class RMSNorm(nn.Module):
  """T5 layer norm: no mean subtraction, no bias; statistics in float32."""
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('norm',)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(var + self.epsilon)
    return (y * scale.astype(jnp.float32).reshape((1,) * (y.ndim - 1) + (-1,))).astype(self.dtype)


def _dense(features, axis, names, dtype, param_dtype, name, std):
  features = (features,) if isinstance(features, int) else tuple(features)
  n_in = 1 if isinstance(axis, int) else len(axis)
  return Dense(features, names, n_in, std, False, dtype, param_dtype, name=name)


class Dense(nn.Module):
  """y = x . W contracting the last `n_in` dims of x; W has shape x.shape[-n_in:] + features.

  Used instead of `nn.DenseGeneral`, whose initializer builds a flat 2-d kernel and so
  cannot carry 3-d logical names under a mesh context (`jax.set_mesh`).
  """
  features: tuple[int, ...]
  names: tuple[Any, ...]
  n_in: int = 1
  std: float = 0.02
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    features = tuple(self.features)
    in_shape = x.shape[x.ndim - self.n_in:]
    kernel = self.param('kernel', nn.with_logical_partitioning(
        nn.initializers.normal(self.std), self.names), in_shape + features, self.param_dtype)
    contract = (tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in)))
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))
    if self.use_bias:
      bias = self.param('bias', nn.with_logical_partitioning(
          nn.initializers.zeros, self.names[self.n_in:]), features, self.param_dtype)
      y = y + bias.astype(self.dtype).reshape((1,) * (y.ndim - len(features)) + features)
    return y


class T5Attention(nn.Module):
  num_heads: int
  d_kv: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BLD, bias_1HLL, mask_BL):
    d = x_BLD.shape[-1]
    hk = (self.num_heads, self.d_kv)
    # T5 folds the 1/sqrt(d_kv) attention scale into the query initialisation.
    proj = lambda name, std: _dense(hk, -1, ('embed', 'heads', 'kv'), self.dtype,
                                    self.param_dtype, name, std)(x_BLD)
    q, k, v = proj('q', (d * self.d_kv) ** -0.5), proj('k', d ** -0.5), proj('v', d ** -0.5)
    logits = jnp.einsum('bqhk,bshk->bhqs', q, k).astype(jnp.float32) + bias_1HLL
    logits = jnp.where(mask_BL[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum('bhqs,bshk->bqhk', weights, v)
    return _dense(d, (-2, -1), ('heads', 'kv', 'embed'), self.dtype, self.param_dtype, 'o',
                  (self.num_heads * self.d_kv) ** -0.5)(out)


class T5FeedForward(nn.Module):
  d_ff: int
  gated: bool
  activation: str
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BLD):
    d = x_BLD.shape[-1]
    act = _activation(self.activation)
    mk = lambda f, names, name, std: _dense(f, -1, names, self.dtype, self.param_dtype, name, std)
    if self.gated:
      h = act(mk(self.d_ff, ('embed', 'mlp'), 'wi_0', d ** -0.5)(x_BLD))
      h = h * mk(self.d_ff, ('embed', 'mlp'), 'wi_1', d ** -0.5)(x_BLD)
    else:
      h = act(mk(self.d_ff, ('embed', 'mlp'), 'wi', d ** -0.5)(x_BLD))
    h = nn.with_logical_constraint(h, ('act_batch', 'act_len', 'act_mlp'))
    return mk(d, ('mlp', 'embed'), 'wo', self.d_ff ** -0.5)(h)


class T5Layer(nn.Module):
  num_heads: int
  d_kv: int
  d_ff: int
  gated: bool
  activation: str
  epsilon: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BLD, bias_1HLL, mask_BL):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = RMSNorm(self.epsilon, name='attn_norm', **kw)(x_BLD)
    x_BLD = x_BLD + T5Attention(self.num_heads, self.d_kv, name='attn', **kw)(h, bias_1HLL, mask_BL)
    h = RMSNorm(self.epsilon, name='ffn_norm', **kw)(x_BLD)
    x_BLD = x_BLD + T5FeedForward(self.d_ff, self.gated, self.activation, name='ffn', **kw)(h)
    x_BLD = nn.with_logical_constraint(x_BLD, ('act_batch', 'act_len', 'act_embed'))
    return x_BLD, None


class T5Encoder(nn.Module):
  """T5 encoder: `apply({'params': p}, input_ids_BL, attention_mask_BL) -> hidden_BLD`.

  `feed_forward_proj` follows transformers: 'relu' (T5 v1.0) or 'gated-gelu' (v1.1 / Flan);
  `dense_act_fn` overrides the activation name when a config.json gives one. The relative
  position bias is computed once (from the first layer's table in the reference) and shared
  by all layers.
  """
  vocab_size: int = 32128
  d_model: int = 512
  num_layers: int = 8
  num_heads: int = 6
  d_kv: int = 64
  d_ff: int = 1024
  feed_forward_proj: str = 'gated-gelu'
  dense_act_fn: str | None = None
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, input_ids_BL, attention_mask_BL=None):
    gated, act = parse_ffn(self.feed_forward_proj, self.dense_act_fn)
    if attention_mask_BL is None:
      attention_mask_BL = jnp.ones(input_ids_BL.shape, bool)
    mask_BL = attention_mask_BL.astype(bool)
    embed = nn.Embed(
        self.vocab_size, self.d_model, dtype=self.dtype, param_dtype=self.param_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                    ('vocab', 'embed')),
        name='shared')
    x_BLD = embed(input_ids_BL)
    x_BLD = nn.with_logical_constraint(x_BLD, ('act_batch', 'act_len', 'act_embed'))

    length = input_ids_BL.shape[1]
    pos = jnp.arange(length)
    buckets_LL = relative_position_bucket(pos[None, :] - pos[:, None],
                                          self.relative_attention_num_buckets,
                                          self.relative_attention_max_distance)
    rel = nn.Embed(
        self.relative_attention_num_buckets, self.num_heads, param_dtype=self.param_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(self.d_model ** -0.5),
                                                    (None, 'heads')),
        name='relative_attention_bias')
    bias_1HLL = jnp.transpose(rel(buckets_LL), (2, 0, 1))[None].astype(jnp.float32)

    layer = T5Layer
    if self.remat:
      layer = nn.remat(layer, prevent_cse=False)
    stack = nn.scan(
        layer, variable_axes={'params': 0}, split_rngs={'params': True, 'dropout': True},
        in_axes=(nn.broadcast, nn.broadcast), length=self.num_layers,
        metadata_params={nn.PARTITION_NAME: 'layers'})
    x_BLD, _ = stack(self.num_heads, self.d_kv, self.d_ff, gated, act, self.layer_norm_epsilon,
                     dtype=self.dtype, param_dtype=self.param_dtype,
                     name='layers')(x_BLD, bias_1HLL, mask_BL)
    return RMSNorm(self.layer_norm_epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                   name='final_norm')(x_BLD)


def make(preset: str = 'tiny', **overrides) -> T5Encoder:
  """A `T5Encoder` of a named shape (`PRESETS`), with field overrides."""
  if preset not in PRESETS:
    raise ValueError(f'unknown T5 preset {preset!r}; known: {", ".join(PRESETS)}')
  return T5Encoder(**{**PRESETS[preset], **overrides})


def config_from_hf(cfg: dict) -> dict[str, Any]:
  """`T5Encoder` fields from a transformers config.json dict."""
  model_type = cfg.get('model_type', 't5')
  if model_type not in ('t5', 'mt5'):
    raise ValueError(f'config.json has model_type={model_type!r}; this loader reads T5 and mT5 '
                     'encoders (umT5 has per-layer position biases and is not supported)')
  ffn = cfg.get('feed_forward_proj', 'relu')
  return dict(
      vocab_size=cfg.get('vocab_size', 32128), d_model=cfg.get('d_model', 512),
      num_layers=cfg.get('num_layers', 6), num_heads=cfg.get('num_heads', 8),
      d_kv=cfg.get('d_kv', 64), d_ff=cfg.get('d_ff', 2048), feed_forward_proj=ffn,
      dense_act_fn=cfg.get('dense_act_fn') if ffn != 'gated-gelu' else 'gelu_new',
      relative_attention_num_buckets=cfg.get('relative_attention_num_buckets', 32),
      relative_attention_max_distance=cfg.get('relative_attention_max_distance', 128),
      layer_norm_epsilon=cfg.get('layer_norm_epsilon', 1e-6))


def abstract_params(module: T5Encoder, length: int = 8, boxed: bool = False):
  """Parameter shapes (`jax.ShapeDtypeStruct`s) without allocating; boxed keeps logical names."""
  ids = jnp.zeros((1, length), jnp.int32)
  tree = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), ids, ids > -1))['params']
  return tree if boxed else nn.meta.unbox(tree)
