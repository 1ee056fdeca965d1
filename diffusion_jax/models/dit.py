"""Diffusion Transformer (Peebles & Xie 2023, DiT) and PixArt-alpha's text-conditioned form.

The image (latents or pixels) is cut into patch x patch tokens by a strided conv, given a fixed
2-D sin-cos position embedding, and run through `depth` transformer blocks whose LayerNorms
(no affine) are modulated by the conditioning (adaLN):

  adaln='zero' (DiT): c = time MLP(sin(t)) + class embedding (an extra "null" class row for
    classifier-free guidance); every block maps silu(c) to its own 6 * hidden shift / scale /
    gate (zero-initialised, so every block starts as the identity: adaLN-Zero).
  adaln='single' (PixArt-alpha): one shared map silu(c) -> 6 * hidden, plus a learned
    [6, hidden] `scale_shift_table` per block; the text (frozen T5 tokens, projected by a
    two-layer GELU MLP) enters through a cross-attention layer in every block.

Then a modulated final LayerNorm, a linear map to patch * patch * channels, and unpatchify.
Called as `module.apply({'params': p}, x_BHWC, t_B, cond, train=False)`; the output is float32
with `out_channels` channels (twice that with `learned_variance`).

cond keys: 'class_labels' [B] int (num_classes > 0) with 'drop_class' [B] bool (the null
class); 'text_tokens' [B, L, text_dim], 'text_mask' [B, L] and 'drop_text' [B] bool
(text_source='tokens'), as the U-Net reads them.

Options that express diffusers' layouts: `block_condition_embed` (each block owns its time and
class embedders, as `DiTTransformer2DModel` stores them; the final layer reads block 0's),
`time_freq_shift` (its sinusoid divides by half - 1), `mlp_norm_eps`.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models import layers

Dtype = Any

ADALN_KINDS = ('zero', 'single')
TEXT_SOURCES = ('none', 'tokens')


def timestep_sinusoid(steps_B, dim: int, freq_shift: float = 0.0, max_period: float = 10000.0):
  """[cos, sin] of steps * exp(-log(max_period) i / (half - freq_shift)), i < half."""
  half = dim // 2
  freqs_F = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
                    / (half - freq_shift))
  args_BF = steps_B.astype(jnp.float32)[:, None] * freqs_F[None, :]
  emb_BD = jnp.concatenate([jnp.cos(args_BF), jnp.sin(args_BF)], axis=-1)
  return jnp.pad(emb_BD, ((0, 0), (0, dim % 2)))


def sincos_2d(dim: int, grid_h: int, grid_w: int, base_size: int, interpolation_scale: float):
  """Fixed [grid_h * grid_w, dim] position embedding: the first half encodes a token's column,
  the second its row, each as [sin, cos] of positions scaled to a base_size grid."""
  if dim % 4:
    raise ValueError(f'DiT: hidden_size {dim} must be a multiple of 4 (2-D sin-cos positions)')

  def one_axis(pos_M):
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    out = np.outer(pos_M, omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  rows = np.arange(grid_h, dtype=np.float32) / (grid_h / base_size) / interpolation_scale
  cols = np.arange(grid_w, dtype=np.float32) / (grid_w / base_size) / interpolation_scale
  col_HW, row_HW = np.meshgrid(cols, rows)
  emb = np.concatenate([one_axis(col_HW.reshape(-1)), one_axis(row_HW.reshape(-1))], axis=1)
  return emb.astype(np.float32)


def patchify(x_BHWC, patch: int):
  """[B, H, W, C] -> [B, H/p * W/p, p * p * C] (row-major patches, (p, q, c) inside)."""
  B, H, W, C = x_BHWC.shape
  x = x_BHWC.reshape(B, H // patch, patch, W // patch, patch, C).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(B, (H // patch) * (W // patch), patch * patch * C)


def unpatchify(tokens_BNP, patch: int, grid_h: int, grid_w: int):
  """The inverse of `patchify`: [B, h * w, p * p * C] -> [B, h p, w p, C]."""
  B, _, P = tokens_BNP.shape
  C = P // (patch * patch)
  x = tokens_BNP.reshape(B, grid_h, grid_w, patch, patch, C).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(B, grid_h * patch, grid_w * patch, C)


def _modulate(x_BLD, shift_BD, scale_BD):
  return x_BLD * (1 + scale_BD[:, None]) + shift_BD[:, None]


def _plain_norm(x, eps: float, dtype):
  """LayerNorm without scale or bias (adaLN supplies both)."""
  return nn.LayerNorm(epsilon=eps, use_scale=False, use_bias=False, dtype=dtype)(x)


class ConditionEmbed(nn.Module):
  """c = MLP(sin(scale t + shift)) (+ the class embedding, when num_classes > 0)."""
  hidden_size: int
  num_classes: int = 0
  freq_dim: int = 256
  freq_shift: float = 0.0
  time_embed_scale: float = 1000.0
  time_embed_shift: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t_B, labels_B):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    steps_B = self.time_embed_scale * t_B.astype(jnp.float32) + self.time_embed_shift
    h = timestep_sinusoid(steps_B, self.freq_dim, self.freq_shift).astype(self.dtype)
    h = layers.dense(self.hidden_size, ('kv', 'embed'), name='time_Dense_0', **kw)(h)
    c = layers.dense(self.hidden_size, ('mlp', 'embed'), name='time_Dense_1', **kw)(nn.silu(h))
    if self.num_classes:
      table = layers.learned(self, 'class_embedding', (self.num_classes + 1, self.hidden_size),
                             ('vocab', 'embed'), param_dtype=self.param_dtype)
      c = c + jnp.take(table, labels_B, axis=0).astype(c.dtype)
    return c


class DiTBlock(nn.Module):
  """One adaLN block: modulated self-attention, [cross-attention], modulated GELU MLP, each
  residual scaled by its gate. Returns (x, None) for `nn.scan`."""
  hidden_size: int
  num_heads: int
  mlp_ratio: float = 4.0
  adaln: str = 'zero'
  cross_attention: bool = False
  norm_eps: float = 1e-6
  mlp_norm_eps: float = 1e-6
  exact_gelu: bool = False
  attention_impl: str = 'jax'
  attention_query_chunk: int = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BLD, c_BD, ctx_BSD, ctx_mask_BS):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    D, N = self.hidden_size, self.num_heads
    B = x_BLD.shape[0]
    x_BLD = layers.constrain(x_BLD, layers.SEQ_AXES)
    if self.adaln == 'zero':  # c is the block's condition embedding
      mod_BE = layers.dense(6 * D, ('embed', 'mlp'), zero_init=True, name='adaln', **kw)(
          nn.silu(c_BD))
      mod_6BD = mod_BE.reshape(B, 6, D).swapaxes(0, 1)
    else:  # c is the shared 6 * D modulation
      table = layers.learned(self, 'scale_shift_table', (6, D), (None, 'embed'),
                             init=nn.initializers.normal(1.0 / math.sqrt(D)),
                             param_dtype=self.param_dtype)
      mod_6BD = (c_BD.reshape(B, 6, D) + table[None].astype(c_BD.dtype)).swapaxes(0, 1)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod_6BD
    proj = lambda name: layers.dense_general((N, D // N), ('embed', 'heads', 'kv'), name=name,
                                             **kw)
    out = lambda name: layers.dense_general(D, ('heads', 'kv', 'embed'), axis=(-2, -1),
                                            name=name, **kw)

    h = _modulate(_plain_norm(x_BLD, self.norm_eps, self.dtype), shift_msa, scale_msa)
    q, k, v = (layers.constrain(proj(n)(h), layers.HEAD_AXES) for n in ('query', 'key', 'value'))
    h = layers.attention(q, k, v, None, self.attention_query_chunk, self.attention_impl)
    x_BLD = x_BLD + gate_msa[:, None] * out('out')(h)

    if self.cross_attention:
      h = x_BLD if self.adaln == 'single' else _plain_norm(x_BLD, self.mlp_norm_eps, self.dtype)
      q = layers.constrain(proj('cross_query')(h), layers.HEAD_AXES)
      k, v = proj('cross_key')(ctx_BSD), proj('cross_value')(ctx_BSD)
      h = layers.attention(q, k, v, layers.key_mask(ctx_mask_BS), impl=self.attention_impl)
      x_BLD = x_BLD + out('cross_out')(h)

    h = _modulate(_plain_norm(x_BLD, self.mlp_norm_eps, self.dtype), shift_mlp, scale_mlp)
    h = layers.dense(int(self.mlp_ratio * D), ('embed', 'mlp'), name='mlp_in', **kw)(h)
    h = nn.gelu(layers.constrain(h, layers.MLP_AXES), approximate=not self.exact_gelu)
    h = layers.dense(D, ('mlp', 'embed'), name='mlp_out', **kw)(h)
    x_BLD = x_BLD + gate_mlp[:, None] * h
    return layers.constrain(x_BLD, layers.SEQ_AXES), None


class DiT(nn.Module):
  image_size: int = 32             # the trained size (sets the position embedding's base grid)
  in_channels: int = 4
  out_channels: int = 4
  learned_variance: bool = False   # twice out_channels: the prediction and the variance
  patch_size: int = 2
  hidden_size: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  adaln: str = 'zero'              # 'zero' (DiT) | 'single' (PixArt-alpha)
  num_classes: int = 0             # > 0: cond['class_labels'] (row num_classes is the null class)
  text_source: str = 'none'        # 'none' | 'tokens': cross-attention to cond['text_tokens']
  text_len: int = 0
  text_dim: int = 0                # width of cond['text_tokens'] (T5: 4096)
  # True: a dropped caption reads a learned [text_len, text_dim] null caption (PixArt-alpha's
  # y_embedding); False: cond['null_text_tokens' / 'null_text_mask'] (the empty prompt's).
  learned_null_text: bool = True
  # The time embedding embeds time_embed_scale * t + time_embed_shift: 1000 t by default;
  # diffusers' transformers embed the integer step k = T t - 1 (scale T, shift -1).
  time_embed_scale: float = 1000.0
  time_embed_shift: float = 0.0
  time_freq_shift: float = 0.0     # the sinusoid's frequencies divide by half - this
  block_condition_embed: bool = False  # each block owns its time / class embedders
  interpolation_scale: float = 1.0  # position embedding's grid is divided by this
  norm_eps: float = 1e-6           # the attention half's (and PixArt's every) LayerNorm
  mlp_norm_eps: float = 0.0        # the MLP half's LayerNorm; 0: norm_eps
  exact_gelu: bool = False         # erf GELU instead of the tanh approximation
  zero_init: bool = True           # adaLN-Zero: block modulations and final layer start at 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat_policy: str = 'none'
  scan_layers: bool = True
  cpu_kernels: bool = False        # the kernels XLA's CPU backend runs fastest (layers)

  @property
  def output_channels(self) -> int:
    return self.out_channels * (2 if self.learned_variance else 1)

  def _check(self):
    if self.adaln not in ADALN_KINDS:
      raise ValueError(f'DiT: adaln={self.adaln!r}; use one of {ADALN_KINDS}')
    if self.text_source not in TEXT_SOURCES:
      raise ValueError(f'DiT: text_source={self.text_source!r}; use one of {TEXT_SOURCES}')
    if self.hidden_size % self.num_heads:
      raise ValueError(f'DiT: hidden_size {self.hidden_size} is not a multiple of num_heads '
                       f'{self.num_heads}')
    if self.block_condition_embed and self.adaln != 'zero':
      raise ValueError("DiT: block_condition_embed needs adaln='zero'")

  def _text_context(self, cond, batch: int):
    """(context [B, L, hidden], mask [B, L]): the projected caption, a dropped one replaced."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    tokens = layers.require(cond, 'text_tokens', 'DiT').astype(jnp.float32)
    mask = layers.require(cond, 'text_mask', 'DiT').astype(bool)
    drop = layers.drop_flag(cond, 'drop_text', batch)
    if self.learned_null_text:
      L = tokens.shape[1]
      if L > self.text_len:
        raise ValueError(f'DiT: {L} text tokens, but the learned null caption has '
                         f'text_len={self.text_len}; raise model.text_len')
      null_LT = layers.learned(self, 'null_text_tokens', (self.text_len, self.text_dim),
                               (None, 'embed'), param_dtype=self.param_dtype,
                               init=nn.initializers.normal(1.0 / math.sqrt(self.text_dim)))
      tokens = jnp.where(drop[:, None, None], null_LT[None, :L].astype(jnp.float32), tokens)
      mask = mask | drop[:, None]
    elif 'drop_text' in cond:
      null_tokens = layers.require(cond, 'null_text_tokens', 'DiT').astype(jnp.float32)
      null_mask = layers.require(cond, 'null_text_mask', 'DiT').astype(bool)
      tokens = jnp.where(drop[:, None, None], null_tokens, tokens)
      mask = jnp.where(drop[:, None], null_mask, mask)
    h = layers.dense(self.hidden_size, ('kv', 'embed'), name='caption_in', **kw)(
        tokens.astype(self.dtype))
    h = nn.gelu(h, approximate=True)
    ctx = layers.dense(self.hidden_size, ('mlp', 'embed'), name='caption_out', **kw)(h)
    return layers.constrain(ctx, layers.SEQ_AXES), mask

  @nn.compact
  def __call__(self, x_BHWC, t_B, cond, train: bool = False):
    self._check()
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    B, H, W, C = x_BHWC.shape
    p, D = self.patch_size, self.hidden_size
    if C != self.in_channels or H % p or W % p:
      raise ValueError(f'DiT expects [B, H, W, {self.in_channels}] with H and W multiples of '
                       f'patch_size {p}, got {x_BHWC.shape}')
    gh, gw = H // p, W // p
    x = layers.conv(D, p, p, padding='VALID', name='patch_embed', **kw)(
        x_BHWC.astype(self.dtype))
    pos_LD = sincos_2d(D, gh, gw, self.image_size // p, self.interpolation_scale)
    x_BLD = x.reshape(B, gh * gw, D) + jnp.asarray(pos_LD, self.dtype)[None]
    x_BLD = layers.constrain(x_BLD, layers.SEQ_AXES)

    labels_B = None
    if self.num_classes:
      labels_B = jnp.asarray(layers.require(cond, 'class_labels', 'DiT'))
      labels_B = labels_B.astype(jnp.int32).reshape(B)
      labels_B = jnp.where(layers.drop_flag(cond, 'drop_class', B), self.num_classes, labels_B)
    embed_kw = dict(hidden_size=D, num_classes=self.num_classes, freq_shift=self.time_freq_shift,
                    time_embed_scale=self.time_embed_scale,
                    time_embed_shift=self.time_embed_shift, **kw)
    t_B = jnp.asarray(t_B, jnp.float32).reshape(B)
    if self.block_condition_embed:  # [depth, B, D]: one embedding per block
      embed = nn.vmap(ConditionEmbed, variable_axes={'params': 0}, split_rngs={'params': True},
                      in_axes=(None, None), axis_size=self.depth,
                      metadata_params={nn.PARTITION_NAME: 'layers'})
      c_KBD = embed(**embed_kw, name='cond_embed')(t_B, labels_B)
      c_BD = c_KBD[0]
      block_c = c_KBD
    else:
      c_BD = ConditionEmbed(**embed_kw, name='cond_embed')(t_B, labels_B)
      block_c = c_BD
      if self.adaln == 'single':
        block_c = layers.dense(6 * D, ('embed', 'mlp'), name='adaln_single', **kw)(nn.silu(c_BD))

    ctx, ctx_mask = None, None
    if self.text_source == 'tokens':
      ctx, ctx_mask = self._text_context(cond, B)

    k = layers.kernels(self.cpu_kernels)
    block_kw = dict(hidden_size=D, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                    adaln=self.adaln, cross_attention=self.text_source == 'tokens',
                    norm_eps=self.norm_eps, mlp_norm_eps=self.mlp_norm_eps or self.norm_eps,
                    exact_gelu=self.exact_gelu, attention_impl=k['attention_impl'],
                    attention_query_chunk=k['attention_query_chunk'], **kw)
    block = layers.maybe_remat(DiTBlock, self.remat_policy, prevent_cse=not self.scan_layers)
    per_block = self.block_condition_embed
    if self.scan_layers:
      stack = nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True},
                      in_axes=(0 if per_block else nn.broadcast, nn.broadcast, nn.broadcast),
                      length=self.depth, metadata_params={nn.PARTITION_NAME: 'layers'})
      x_BLD, _ = stack(**block_kw, name='blocks')(x_BLD, block_c, ctx, ctx_mask)
    else:
      for i in range(self.depth):
        x_BLD, _ = block(**block_kw, name=f'blocks_{i}')(
            x_BLD, block_c[i] if per_block else block_c, ctx, ctx_mask)

    final_init = dict(zero_init=self.zero_init)
    if self.adaln == 'zero':
      mod = layers.dense(2 * D, ('embed', 'mlp'), name='final_adaln', **final_init, **kw)(
          nn.silu(c_BD))
      shift_BD, scale_BD = mod[:, :D], mod[:, D:]
    else:
      table = layers.learned(self, 'final_scale_shift_table', (2, D), (None, 'embed'),
                             init=nn.initializers.normal(1.0 / math.sqrt(D)),
                             param_dtype=self.param_dtype)
      shift_BD = table[0][None].astype(c_BD.dtype) + c_BD
      scale_BD = table[1][None].astype(c_BD.dtype) + c_BD
    h = _modulate(_plain_norm(x_BLD, 1e-6, self.dtype), shift_BD, scale_BD)
    out = layers.dense(p * p * self.output_channels, ('embed', 'mlp'), name='final_proj',
                       **final_init, **kw)(h)
    out_BHWC = unpatchify(out.astype(jnp.float32), p, gh, gw)
    return layers.constrain(out_BHWC, layers.IMAGE_AXES)


def example_inputs(model_cfg, batch_size: int):
  """Zero `(x, t_B, cond)`: the U-Net's image inputs, plus class labels when num_classes > 0."""
  get = lambda k, d=0: model_cfg.get(k, d) if hasattr(model_cfg, 'get') else getattr(
      model_cfg, k, d)
  if get('text_source', 'none') not in TEXT_SOURCES:
    raise ValueError(f"DiT: text_source={get('text_source')!r}; use one of {TEXT_SOURCES}")
  view = {'image_size': get('image_size', DiT.image_size),
          'in_channels': get('in_channels', DiT.in_channels),
          'text_source': get('text_source', 'none'), 'text_len': get('text_len', 0),
          'text_dim': get('text_dim', 0), 'learned_null_text': get('learned_null_text', True)}
  from diffusion_jax.models import _image_example_inputs  # the package imports this module
  x, t, cond = _image_example_inputs(view, batch_size)
  if get('num_classes', 0):
    cond['class_labels'] = jnp.zeros((batch_size,), jnp.int32)
    cond['drop_class'] = jnp.zeros((batch_size,), bool)
  return x, t, cond
