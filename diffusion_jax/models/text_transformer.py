"""GLIDE's text encoder, trained jointly with the U-Net that owns it.

Token + position embeddings, a pre-LN transformer over the caption, a final LayerNorm. As in
glide-text2im, padding positions carry a learned padding embedding; unlike it, padding keys
are also masked out of attention (`mask_padding_keys=False` attends to them, as the released
models do; `padding_embedding`, `final_ln` and `exact_gelu` give its other options). The "final token" embedding (projected into the U-Net's time
embedding) is the state at the last position, which for a padded caption is a padding query
that attends to every real token: a learned summary of the caption. An empty caption (all
padding, the classifier-free-guidance null) thus maps to a learned, caption-independent state.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from diffusion_jax.models import layers

Dtype = Any


class TextTransformer(nn.Module):
  vocab_size: int
  text_len: int
  width: int
  num_layers: int
  num_heads: int
  mlp_ratio: int = 4
  dropout: float = 0.0
  mask_padding_keys: bool = True
  padding_embedding: bool = True  # False: padding positions keep their token embeddings
  final_ln: bool = True
  exact_gelu: bool = False
  deterministic: bool = True
  scan_layers: bool = True
  remat_policy: str = 'none'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, ids_BL, mask_BL):
    """Returns (token states [B, L, W], final-token embedding [B, W])."""
    B, L = ids_BL.shape
    if L != self.text_len:
      raise ValueError(f'text_ids have length {L}, the text transformer expects {self.text_len}')
    emb = nn.Embed(self.vocab_size, self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                   embedding_init=layers.boxed(nn.initializers.normal(0.02), ('vocab', 'embed')),
                   name='token_embedding')(ids_BL)
    pos = layers.learned(self, 'positional_embedding', (L, self.width), (None, 'embed'),
                         param_dtype=self.param_dtype)
    mask_BL = mask_BL.astype(bool)
    x = emb + pos[None].astype(emb.dtype)
    if self.padding_embedding:
      pad = layers.learned(self, 'padding_embedding', (L, self.width), (None, 'embed'),
                           param_dtype=self.param_dtype)
      x = jnp.where(mask_BL[:, :, None], x, pad[None].astype(emb.dtype))
    x = layers.constrain(x.astype(self.dtype), layers.SEQ_AXES)
    x = layers.TransformerStack(
        num_layers=self.num_layers, width=self.width, num_heads=self.num_heads,
        mlp_ratio=self.mlp_ratio, dropout=self.dropout, exact_gelu=self.exact_gelu,
        deterministic=self.deterministic, scan_layers=self.scan_layers,
        remat_policy=self.remat_policy, dtype=self.dtype, param_dtype=self.param_dtype,
        name='transformer')(x, layers.key_mask(mask_BL) if self.mask_padding_keys else None)
    if self.final_ln:
      x = layers.layer_norm(dtype=self.dtype, param_dtype=self.param_dtype, name='final_ln')(x)
    return x, x[:, -1]
