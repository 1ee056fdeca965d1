"""unCLIP's diffusion prior (Ramesh et al. 2022, Sec. 2.1).

A decoder-only transformer with a causal mask over the sequence
    [text tokens (L), CLIP text embedding, time embedding, noised image embedding, query]
whose output at the query position is the predicted clean CLIP image embedding. Padding text
tokens are masked out as keys; a dropped caption (classifier-free guidance) masks every text
token and replaces the text embedding by a learned null embedding.

Options (defaults give the network above) express diffusers' `PriorTransformer` (Karlo):
erf GELU, a layer norm on the sequence before the blocks (`norm_in`) and on the text
embedding (`text_embed_norm`), the time embedded as the integer step (`time_embed_scale` T,
`time_embed_shift` -1), an output width other than the input's (`out_dim`), and no learned
null embedding (`learned_null_text=False`: the unconditional branch is the encoding of the
empty caption, as in diffusers' pipeline, given in cond as null_text_*).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from diffusion_jax.models import layers

Dtype = Any

NUM_EXTRA_TOKENS = 4  # text embedding, time, noised image embedding, query


class Prior(nn.Module):
  embed_dim: int = 768          # CLIP image embedding (x) width
  text_len: int = 77
  text_dim: int = 768           # width of cond['text_tokens']
  text_embed_dim: int = 768     # width of cond['text_embed']
  width: int = 2048
  num_layers: int = 20
  num_heads: int = 32
  mlp_ratio: int = 4
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat_policy: str = 'none'
  scan_layers: bool = True
  exact_gelu: bool = False        # erf GELU (torch's nn.GELU) instead of the tanh approximation
  norm_in: bool = False           # layer norm on the whole sequence before the blocks
  text_embed_norm: bool = False   # layer norm on the text embedding before its projection
  # The time embedding embeds time_embed_scale * t + time_embed_shift: 1000 t by default;
  # diffusers' prior embeds the integer step k = T t - 1 of a T-step schedule (scale T, shift -1).
  time_embed_scale: float = 1000.0
  time_embed_shift: float = 0.0
  out_dim: int = 0                # width of the prediction; 0: embed_dim
  # False: no learned null text embedding; a dropped caption reads the empty caption's
  # encoding from cond['null_text_tokens' / 'null_text_mask' / 'null_text_embed'] when given
  # (as diffusers' pipeline does), else masks every text token and zeroes the text embedding.
  learned_null_text: bool = True

  @nn.compact
  def __call__(self, x_BD, t_B, cond, train: bool = False, return_sequence: bool = False):
    """Predicted clean image embedding [B, D] (float32); the whole [B, S, W] sequence of
    final states with `return_sequence=True` (for inspecting the causal structure)."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    B, D = x_BD.shape
    if D != self.embed_dim:
      raise ValueError(f'Prior expects [B, {self.embed_dim}] inputs, got {x_BD.shape}')
    W, L = self.width, self.text_len
    tokens = layers.require(cond, 'text_tokens', 'Prior')
    mask = layers.require(cond, 'text_mask', 'Prior').astype(bool)
    text_embed = layers.require(cond, 'text_embed', 'Prior').astype(jnp.float32)
    drop = layers.drop_flag(cond, 'drop_text', B)
    mask = mask & ~drop[:, None]
    if self.learned_null_text:
      null = layers.learned(self, 'null_text_embed', (self.text_embed_dim,), ('embed',),
                            param_dtype=self.param_dtype)
      text_embed = jnp.where(drop[:, None], null[None].astype(jnp.float32), text_embed)
    elif 'null_text_tokens' in cond:
      # Dropped rows read the empty caption's encoding (diffusers' unconditional branch).
      null_mask = layers.require(cond, 'null_text_mask', 'Prior').astype(bool)
      null_embed = layers.require(cond, 'null_text_embed', 'Prior').astype(jnp.float32)
      tokens = jnp.where(drop[:, None, None], cond['null_text_tokens'], tokens)
      mask = jnp.where(drop[:, None], null_mask, mask)
      text_embed = jnp.where(drop[:, None], null_embed, text_embed)
    else:
      text_embed = jnp.where(drop[:, None], 0.0, text_embed)
    if self.text_embed_norm:
      text_embed = layers.layer_norm(name='text_embed_norm', **kw)(text_embed.astype(self.dtype))

    tok = layers.dense(W, ('kv', 'embed'), name='text_tokens_proj', **kw)(
        tokens.astype(self.dtype))
    txt = layers.dense(W, ('kv', 'embed'), name='text_embed_proj', **kw)(
        text_embed.astype(self.dtype))
    tim = layers.TimeEmbedding(W, W, self.time_embed_scale, self.time_embed_shift,
                               name='time_embed', **kw)(t_B)
    img = layers.dense(W, ('kv', 'embed'), name='image_embed_proj', **kw)(
        x_BD.astype(self.dtype))
    query = layers.learned(self, 'query', (W,), ('embed',), param_dtype=self.param_dtype)
    query = jnp.broadcast_to(query.astype(self.dtype)[None], (B, W))
    extra = jnp.stack([txt, tim.astype(self.dtype), img, query], axis=1)
    seq = jnp.concatenate([tok.astype(self.dtype), extra], axis=1)
    S = L + NUM_EXTRA_TOKENS
    pos = layers.learned(self, 'positional_embedding', (S, W), (None, 'embed'),
                         param_dtype=self.param_dtype)
    seq = layers.constrain(seq + pos[None].astype(self.dtype), layers.SEQ_AXES)
    if self.norm_in:
      seq = layers.layer_norm(name='norm_in', **kw)(seq)

    causal_SS = jnp.tril(jnp.ones((S, S), bool))
    valid_BS = jnp.concatenate([mask, jnp.ones((B, NUM_EXTRA_TOKENS), bool)], axis=1)
    attn_mask = causal_SS[None, None] & valid_BS[:, None, None, :]
    # A query position whose keys are all masked (a padding/dropped first token) still sees
    # itself, so no softmax row is empty.
    attn_mask = attn_mask | jnp.eye(S, dtype=bool)[None, None]
    h = layers.TransformerStack(
        num_layers=self.num_layers, width=W, num_heads=self.num_heads,
        mlp_ratio=self.mlp_ratio, dropout=self.dropout, exact_gelu=self.exact_gelu,
        deterministic=not train,
        scan_layers=self.scan_layers, remat_policy=self.remat_policy, name='transformer',
        **kw)(seq, attn_mask)
    h = layers.layer_norm(name='final_ln', **kw)(h)
    if return_sequence:
      return h.astype(jnp.float32)
    out = layers.dense(self.out_dim or self.embed_dim, ('embed', 'kv'), name='out_proj', **kw)(
        h[:, -1])
    return out.astype(jnp.float32)


# Size presets; at paper size Table 3's 1B parameters, as Karlo's open 1B reproduction lays
# them out.
PRESETS = {
    'unclip_prior_tiny': dict(width=32, num_layers=2, num_heads=2),
    'unclip_prior_paper': dict(width=2048, num_layers=20, num_heads=32),
}
