"""Imagen's Efficient U-Net for the super-resolution stages (Saharia et al. 2022, App. B.1).

Compared with the ADM U-Net: more residual blocks at low resolution (a per-level
`num_res_blocks`), one long skip connection per level (from a down block's output into the
up block of the same resolution, as in the paper's DBlock/UBlock figures) scaled by
1/sqrt(2), the down block downsamples
*before* its convolutions and the up block upsamples *after* them (the convolutions of the
high-resolution levels then run on fewer channels and there are no resampling ResBlocks), and
attention only where a level asks for it: self-attention (`self_attention` per level, off at
1024 px) and cross-attention to the text tokens (`cross_attention` per level).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

from diffusion_jax.models import layers
from diffusion_jax.models.unet import ConditionedUNetBase


class EfficientUNet(ConditionedUNetBase):
  self_attention: tuple[bool, ...] = (False, False, False, True)
  cross_attention: tuple[bool, ...] = (False, False, False, True)
  ff_mult: int = 2
  skip_scale: float = 1.0 / math.sqrt(2.0)
  use_scale_shift_norm: bool = True

  @nn.compact
  def __call__(self, x_BHWC, t_B, cond, train: bool = False):
    kw = self._kw()
    B = x_BHWC.shape[0]
    L = len(self.channel_mult)
    self.check_input(x_BHWC, cond)
    if len(self.self_attention) != L or len(self.cross_attention) != L:
      raise ValueError('self_attention and cross_attention need one entry per level')
    det = not train
    emb, ctx, ctx_mask = self.conditioning(t_B, cond, B, det)
    res_block = layers.maybe_remat(layers.ResBlock, self.remat_policy)
    attn_block = layers.maybe_remat(layers.ImageAttention, self.remat_policy)
    cross_block = layers.maybe_remat(layers.CrossAttention, self.remat_policy)
    rb_kw = dict(dropout=self.dropout, use_scale_shift_norm=self.use_scale_shift_norm,
                 norm_groups=self.norm_groups, deterministic=det, **kw)
    at_kw = dict(num_heads=self.num_heads, head_channels=self.head_channels,
                 norm_groups=self.norm_groups, **kw)
    nblocks = self.blocks_per_level()
    chans = [m * self.model_channels for m in self.channel_mult]

    def cross(h, level, tag):
      if ctx is not None and self.cross_attention[level]:
        h = cross_block(**at_kw, name=f'{tag}_cross')(h, ctx, ctx_mask)
      return h

    def self_attend(h, level, tag):
      if self.self_attention[level]:
        h = attn_block(**at_kw, query_chunk=self.attention_query_chunk,
                       name=f'{tag}_attn')(h)
        h = layers.FeedForward2d(self.ff_mult, self.norm_groups, name=f'{tag}_ff', **kw)(h)
      return h

    h = layers.conv(chans[0], 3, name='in_conv', **kw)(self.prepare_input(x_BHWC, cond))
    skips = []
    for level in range(L):
      if level:  # downsample first: the convolutions below run at the lower resolution
        h = layers.Downsample(chans[level], name=f'down{level}_downsample', **kw)(h)
      for i in range(nblocks[level]):
        h = res_block(chans[level], **rb_kw, name=f'down{level}_res{i}')(h, emb)
        h = cross(h, level, f'down{level}_{i}')
      h = self_attend(h, level, f'down{level}')
      skips.append(h)

    h = res_block(chans[-1], **rb_kw, name='mid_res0')(h, emb)
    h = self_attend(h, L - 1, 'mid')
    h = cross(h, L - 1, 'mid')
    h = res_block(chans[-1], **rb_kw, name='mid_res1')(h, emb)

    for level in reversed(range(L)):
      skip = skips.pop() * jnp.asarray(self.skip_scale, h.dtype)
      h = jnp.concatenate([h, skip.astype(h.dtype)], axis=-1)
      for i in range(nblocks[level]):
        h = res_block(chans[level], **rb_kw, name=f'up{level}_res{i}')(h, emb)
        h = cross(h, level, f'up{level}_{i}')
      h = self_attend(h, level, f'up{level}')
      if level:  # upsample last: the convolutions above ran at the lower resolution
        h = layers.Upsample(chans[level - 1], name=f'up{level}_upsample', **kw)(h)
    assert not skips, 'skip connections left over'
    return self.output(h)
