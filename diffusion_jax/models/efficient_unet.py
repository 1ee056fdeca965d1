"""Imagen's Efficient U-Net for the super-resolution stages (Saharia et al. 2022, App. B.1).

Compared with the ADM U-Net: more residual blocks at low resolution (a per-level
`num_res_blocks`), one long skip connection per level (from a down block's output into the
up block of the same resolution, as in the paper's DBlock/UBlock figures) scaled by
1/sqrt(2), the down block downsamples
*before* its convolutions and the up block upsamples *after* them (the convolutions of the
high-resolution levels then run on fewer channels and there are no resampling ResBlocks), and
attention only where a level asks for it: self-attention (`self_attention` per level, off at
1024 px) and cross-attention to the text tokens (`cross_attention` per level).

`scan_blocks=True` runs a level's identical residual blocks (each with its cross-attention)
under `nn.scan`, so the compiled program holds one copy of each level's block instead of up
to eight: parameters `down{l}_blocks/...` and `up{l}_blocks/...` carry a leading 'layers'
axis (the up path's first block, which reads the skip connection, stays `up{l}_res0`).
`stack_block_params` converts an unrolled parameter tree to that layout.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import layers
from diffusion_jax.models.unet import ConditionedUNetBase


class _BlockStep(nn.Module):
  """One residual block and its optional cross-attention: the body of a scanned level."""
  channels: int
  cross: bool
  num_heads: int
  head_channels: int
  dropout: float
  use_scale_shift_norm: bool
  norm_groups: int
  deterministic: bool
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  matmul_weight_grad_max_kernel: int = 0
  attention_impl: str = 'jax'

  @nn.compact
  def __call__(self, h_BHWC, emb_BE, ctx_BLD, ctx_mask_BL):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h_BHWC = layers.ResBlock(self.channels, dropout=self.dropout,
                             use_scale_shift_norm=self.use_scale_shift_norm,
                             norm_groups=self.norm_groups, deterministic=self.deterministic,
                             matmul_weight_grad_max_kernel=self.matmul_weight_grad_max_kernel,
                             name='res', **kw)(h_BHWC, emb_BE)
    if self.cross:
      h_BHWC = layers.CrossAttention(self.num_heads, self.head_channels, self.norm_groups,
                                     attention_impl=self.attention_impl,
                                     inference=self.deterministic, name='cross', **kw)(
                                         h_BHWC, ctx_BLD, ctx_mask_BL)
    return h_BHWC, None


def stack_block_params(params, num_res_blocks) -> dict:
  """An unrolled EfficientUNet's params (`down{l}_res{i}`, `down{l}_{i}_cross`, ...) in the
  `scan_blocks=True` layout (`down{l}_blocks/{res,cross}` stacked on a leading axis)."""
  params = dict(params)
  for level, n in enumerate(num_res_blocks):
    for path, first in (('down', 0), ('up', 1)):
      steps = []
      for i in range(first, n):
        step = {'res': params.pop(f'{path}{level}_res{i}')}
        if f'{path}{level}_{i}_cross' in params:
          step['cross'] = params.pop(f'{path}{level}_{i}_cross')
        steps.append(step)
      if steps:
        params[f'{path}{level}_blocks'] = jax.tree.map(lambda *xs: jnp.stack(xs), *steps)
  return params


class EfficientUNet(ConditionedUNetBase):
  self_attention: tuple[bool, ...] = (False, False, False, True)
  cross_attention: tuple[bool, ...] = (False, False, False, True)
  ff_mult: int = 2
  skip_scale: float = 1.0 / math.sqrt(2.0)
  use_scale_shift_norm: bool = True
  scan_blocks: bool = False

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
                 norm_groups=self.norm_groups, deterministic=det, **self._conv_kw())
    at_kw = dict(num_heads=self.num_heads, head_channels=self.head_channels,
                 norm_groups=self.norm_groups, attention_impl=self.attention_impl,
                 inference=det, **kw)
    nblocks = self.blocks_per_level()
    chans = [m * self.model_channels for m in self.channel_mult]

    def cross(h, level, tag):
      if ctx is not None and self.cross_attention[level]:
        h = cross_block(**at_kw, name=f'{tag}_cross')(h, ctx, ctx_mask)
      return h

    def blocks(h, level, path, first):
      """Blocks `first`..n-1 of a level: unrolled, or one scanned block (`scan_blocks`)."""
      if not self.scan_blocks:
        for i in range(first, nblocks[level]):
          h = res_block(chans[level], **rb_kw, name=f'{path}{level}_res{i}')(h, emb)
          h = cross(h, level, f'{path}{level}_{i}')
        return h
      n = nblocks[level] - first
      if n <= 0:
        return h
      step = layers.maybe_remat(_BlockStep, self.remat_policy, prevent_cse=False)
      stack = nn.scan(step, variable_axes={'params': 0},
                      split_rngs={'params': True, 'dropout': True},
                      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=n,
                      metadata_params={nn.PARTITION_NAME: 'layers'})
      has_cross = ctx is not None and self.cross_attention[level]
      h, _ = stack(chans[level], has_cross, self.num_heads, self.head_channels,
                   attention_impl=self.attention_impl, name=f'{path}{level}_blocks',
                   **rb_kw)(h, emb, ctx, ctx_mask)
      return h

    def self_attend(h, level, tag):
      if self.self_attention[level]:
        h = attn_block(**at_kw, query_chunk=self.attention_query_chunk,
                       name=f'{tag}_attn')(h)
        h = layers.FeedForward2d(self.ff_mult, self.norm_groups, inference=det,
                                 name=f'{tag}_ff', **kw)(h)
      return h

    h = layers.conv(chans[0], 3, name='in_conv', **kw)(self.prepare_input(x_BHWC, cond))
    skips = []
    for level in range(L):
      if level:  # downsample first: the convolutions below run at the lower resolution
        h = layers.Downsample(chans[level], name=f'down{level}_downsample',
                                  **self._conv_kw())(h)
      h = blocks(h, level, 'down', 0)
      h = self_attend(h, level, f'down{level}')
      skips.append(h)

    h = res_block(chans[-1], **rb_kw, name='mid_res0')(h, emb)
    h = self_attend(h, L - 1, 'mid')
    h = cross(h, L - 1, 'mid')
    h = res_block(chans[-1], **rb_kw, name='mid_res1')(h, emb)

    for level in reversed(range(L)):
      skip = skips.pop() * jnp.asarray(self.skip_scale, h.dtype)
      h = jnp.concatenate([h, skip.astype(h.dtype)], axis=-1)
      if nblocks[level]:  # the first block reads the skip connection: its own parameters
        h = res_block(chans[level], **rb_kw, name=f'up{level}_res0')(h, emb)
        h = cross(h, level, f'up{level}_0')
      h = blocks(h, level, 'up', 1)
      h = self_attend(h, level, f'up{level}')
      if level:  # upsample last: the convolutions above ran at the lower resolution
        h = layers.Upsample(chans[level - 1], name=f'up{level}_upsample',
                                **self._conv_kw())(h)
    assert not skips, 'skip connections left over'
    return self.output(h, inference=det)


# Size presets of Imagen's super-resolution stages (a stage config adds image and text sizes).
PRESETS = {
    'imagen_sr256_tiny': dict(model_channels=16, channel_mult=(1, 2), num_res_blocks=(1, 2),
                              self_attention=(False, True), cross_attention=(False, True),
                              num_heads=2, head_channels=-1, context_dim=32, ff_mult=2),
    # Efficient U-Net 64->256 (Imagen App. B.1, imagen-pytorch's SRUnet256).
    'imagen_sr256_paper': dict(model_channels=128, channel_mult=(1, 2, 4, 8),
                               num_res_blocks=(2, 4, 8, 8),
                               self_attention=(False, False, False, True),
                               cross_attention=(False, False, False, True), num_heads=8,
                               head_channels=-1, context_dim=1024, ff_mult=2),
    # 256->1024: no self-attention; the lowest level 768 wide for the published 400M.
    'imagen_sr1024_paper': dict(model_channels=128, channel_mult=(1, 2, 4, 6),
                                num_res_blocks=(2, 4, 8, 8),
                                self_attention=(False, False, False, False),
                                cross_attention=(False, False, False, True), num_heads=8,
                                head_channels=-1, context_dim=1024, ff_mult=2),
}
PRESETS['imagen_sr1024_tiny'] = dict(PRESETS['imagen_sr256_tiny'], self_attention=(False, False))
