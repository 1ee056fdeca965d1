"""Released diffusers U-Nets (DeepFloyd IF stages I and II, Karlo's unCLIP decoder and
upsampler, Stable Diffusion 1.x/2.x and its inpainting U-Net) on our `models.unet.UNet`, and
ours back to the diffusers layout.

Stable Diffusion's `UNet2DConditionModel` (`CrossAttnDownBlock2D` / `DownBlock2D` levels,
`UNetMidBlock2DCrossAttn`, diffusers' default middle) is the same skeleton with conv
resampling (`resblock_updown=False`) and `attention_block='transformer'`
(`layers.SpatialTransformer`, diffusers' Transformer2DModel); see `_sd_unet_kwargs`.

diffusers' `UNet2DConditionModel` built from `ResnetDownsampleBlock2D` /
`SimpleCrossAttnDownBlock2D` levels is the ADM U-Net that `UNet` already is: BigGAN res blocks
resample, and every attention layer takes the (projected) text tokens as extra keys and values
ahead of the pixels' own. The options that differ are fields of `UNet` (`act`, `emb_act`,
`res_skip_time_act`, `res_output_scale`, `mid_output_scale`, `context_norm_groups`,
`context_only_resolutions`, `text_pool='attention_query_key'`, `low_res_resize`,
`text_proj_norm`, `learned_null_text`). A `UNet2DModel` of res-block levels (Karlo's
upsampler) is the same U-Net without text or attention; its low-res input is upsampled
bicubically as unCLIP's pipeline does. Karlo's decoder takes its conditioning from a separate
`UnCLIPTextProjModel`; here that model is our UNet's own conditioning (`image_embed_dim`,
`text_pool='embed'`, projected and layer-normed text tokens), and its tensors join the
decoder's in one parameter tree.

Time: diffusers embeds the integer step k of its 1000; ours embeds `time_embed_scale * t +
time_embed_shift` with scale 1000 and shift -1, so that our discrete time t = (k + 1) / 1000
(the samplers' and `Stage.model_output`'s convention) embeds k, and an SR stage's noise
level k (`class_labels`) is cond['aug_t'] = (k + 1) / 1000, the time its noise is drawn at.
The low-res image of stage II is cond['low_res'], upsampled as the IF pipeline does
(bilinear, align_corners=True; one already upsampled, and noised at that size as the pipeline
does, is taken as it is); the T5 tokens are cond['text_tokens'] with cond['text_mask'], all
visible (`text_mask_keys=False`) as the IF pipeline passes no mask.

`unet_kwargs` maps a config.json onto our fields (refusing, one line each, what it cannot
express), `convert_unet` a state dict onto our parameter tree (every parameter filled, every
tensor used, or the missing and unused names are listed), `export_unet` goes back.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from flax import traverse_util

from diffusion_jax import convert, errors, io_util, models
from diffusion_jax.models import layers
from diffusion_jax.models.unet import UNet

CONFIG_NAME = 'config.json'
WEIGHTS_NAME = 'diffusion_pytorch_model.safetensors'
WEIGHTS_INDEX_NAME = 'diffusion_pytorch_model.safetensors.index.json'
FP16_WEIGHTS_NAME = 'diffusion_pytorch_model.fp16.safetensors'
FP16_WEIGHTS_INDEX_NAME = 'diffusion_pytorch_model.safetensors.index.fp16.json'
# Level types: does the level attend?
DOWN_TYPES = {'ResnetDownsampleBlock2D': False, 'SimpleCrossAttnDownBlock2D': True}
UP_TYPES = {'ResnetUpsampleBlock2D': False, 'SimpleCrossAttnUpBlock2D': True}
MID_TYPE = 'UNetMidBlock2DSimpleCrossAttn'
# Stable Diffusion's levels: plain res blocks and conv resampling, attention as a transformer
# (Transformer2DModel) cross-attending to the raw text encoding.
SD_DOWN_TYPES = {'DownBlock2D': False, 'CrossAttnDownBlock2D': True}
SD_UP_TYPES = {'UpBlock2D': False, 'CrossAttnUpBlock2D': True}
SD_MID_TYPE = 'UNetMidBlock2DCrossAttn'  # diffusers' default mid_block_type
# Fields a Stable Diffusion U-Net must leave at these values (beyond REQUIRED).
SD_REQUIRED = {'class_embed_type': None, 'addition_embed_type': None, 'encoder_hid_dim': None,
               'encoder_hid_dim_type': None, 'only_cross_attention': False,
               'downsample_padding': 1}
# UNet2DModel (no text; Karlo's upsamplers): res-block levels and a middle without attention.
PLAIN_DOWN_TYPES = {'ResnetDownsampleBlock2D': False}
PLAIN_MID_TYPE = 'UNetMidBlock2D'
PLAIN_FIELDS = ('center_input_sample', 'flip_sin_to_cos', 'freq_shift', 'time_embedding_type',
                'num_class_embeds')
# Fields that must hold these values (diffusers' defaults or the only ones we express).
REQUIRED = {
    'center_input_sample': False, 'flip_sin_to_cos': True, 'freq_shift': 0,
    'time_embedding_type': 'positional', 'conv_in_kernel': 3, 'conv_out_kernel': 3,
    'dual_cross_attention': False, 'class_embeddings_concat': False, 'num_class_embeds': None,
    'time_cond_proj_dim': None, 'timestep_post_act': None,
    'projection_class_embeddings_input_dim': None, 'addition_time_embed_dim': None,
    'attention_type': 'default', 'reverse_transformer_layers_per_block': None,
    'num_attention_heads': None,
}
# Where a pooled text position embedding lives; diffusers stores it as [1, D].
_POOL_QUERY = 'add_embedding.pool.positional_embedding'


def _refuse(where: str, field: str, value, what_to_do: str):
  raise errors.InputError(f'{where}: {field} {value!r} is not supported; {what_to_do}')


def _one_value(where: str, field: str, value):
  """An int, or a list of equal ints (one per level), as one int."""
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      _refuse(where, field, list(value), 'use one value for every level')
    value = value[0]
  return value


def _activations(config: Mapping[str, Any], where: str) -> tuple[str, str, str]:
  """(act_fn, time_embedding_act_fn or 'none', resnet_time_scale_shift), each one we have."""
  act = config.get('act_fn', 'silu')
  if act not in layers.ACTIVATIONS:
    _refuse(where, 'act_fn', act, f'use one of {", ".join(layers.ACTIVATIONS)}')
  emb_act = config.get('time_embedding_act_fn') or 'none'
  if emb_act not in layers.ACTIVATIONS and emb_act != 'none':
    _refuse(where, 'time_embedding_act_fn', emb_act,
            f'use null or one of {", ".join(layers.ACTIVATIONS)}')
  shift = config.get('resnet_time_scale_shift', 'default')
  if shift not in ('default', 'scale_shift'):
    _refuse(where, 'resnet_time_scale_shift', shift, "use 'default' or 'scale_shift'")
  return act, emb_act, shift


def _check_required(config: Mapping[str, Any], where: str, required: Mapping[str, Any]):
  """Refuses a config field off the value we express (a false-like value for a False one),
  and any norm_eps but 1e-5."""
  for field, want in required.items():
    value = config.get(field, want)
    if value != want and not (isinstance(want, bool) and not value and not want):
      _refuse(where, field, value, f'use {want!r}')
  if abs(float(config.get('norm_eps', 1e-5)) - 1e-5) > 1e-12:
    _refuse(where, 'norm_eps', config.get('norm_eps'), 'use 1e-05')


def unet_kwargs(config: Mapping[str, Any], *, where: str = 'unet/config.json',
                image_size: int | None = None, image_channels: int | None = None,
                low_res_size: int | None = None, text_mask_keys: bool | None = None,
                text_proj_config: Mapping[str, Any] | None = None, **extra) -> dict[str, Any]:
  """Our `UNet` fields for a diffusers `UNet2DConditionModel` config (IF stage I or II) or a
  `UNet2DModel` one (Karlo's upsamplers).

  `image_channels`: the channels of x_t (default 3; the rest of `in_channels` is the upsampled
  low-res image, `low_res_size` px, default image_size / 4); `extra` overrides any field.

  Stable Diffusion's U-Net (`mid_block_type` 'UNetMidBlock2DCrossAttn', diffusers' default;
  `_sd_unet_kwargs`) reads its latents' channels (default: `out_channels`) from the config.

  unCLIP's decoder (`class_embed_type='identity'`) takes the config of its `text_proj`
  (`UnCLIPTextProjModel`) too: our UNet then reads cond['image_embed'] (CLIP image
  embedding), cond['text_embed'] (pooled CLIP text embedding) and cond['text_tokens'] /
  cond['text_mask'] (CLIP text hidden states; padding masked, the image tokens visible).
  """
  cls = config.get('_class_name', 'UNet2DConditionModel')
  if cls not in ('UNet2DConditionModel', 'UNet2DModel'):
    _refuse(where, '_class_name', cls, 'use a UNet2DConditionModel or UNet2DModel config')
  plain = cls == 'UNet2DModel'
  if not plain and config.get('mid_block_type', SD_MID_TYPE) == SD_MID_TYPE:
    if low_res_size or text_proj_config is not None:
      _refuse(where, 'mid_block_type', SD_MID_TYPE, 'a Stable Diffusion U-Net takes neither '
              'low_res_size nor text_proj_config')
    return _sd_unet_kwargs(config, where, image_size, image_channels, text_mask_keys, extra)
  image_channels = 3 if image_channels is None else image_channels
  required = {k: REQUIRED[k] for k in PLAIN_FIELDS} if plain else REQUIRED
  _check_required(config, where, required)
  down = list(config.get('down_block_types', ()))
  up = list(config.get('up_block_types', ()))
  down_types = PLAIN_DOWN_TYPES if plain else DOWN_TYPES
  up_types = {t: a for t, a in UP_TYPES.items() if not a} if plain else UP_TYPES
  for field, types, allowed in (('down_block_types', down, down_types),
                                ('up_block_types', up, up_types)):
    for t in types:
      if t not in allowed:
        _refuse(where, field, t, f'use {" or ".join(allowed)}')
  attends = [DOWN_TYPES[t] for t in down]
  if [UP_TYPES[t] for t in up] != attends[::-1]:
    _refuse(where, 'up_block_types', up, 'use the mirror image of down_block_types')
  mid_type = PLAIN_MID_TYPE if plain else MID_TYPE
  mid = config.get('mid_block_type', mid_type)
  if mid != mid_type:
    _refuse(where, 'mid_block_type', mid, f'use {mid_type}')
  if plain and config.get('add_attention', True):
    _refuse(where, 'add_attention', config.get('add_attention', True),
            'use false (a middle block without attention)')
  if plain and isinstance(config.get('layers_per_block'), (list, tuple)):
    _refuse(where, 'layers_per_block', config['layers_per_block'], 'use one number')
  boc = [int(c) for c in config['block_out_channels']]
  if len(boc) != len(down):
    _refuse(where, 'block_out_channels', boc, 'give one entry per down block')
  if any(c % boc[0] for c in boc):
    _refuse(where, 'block_out_channels', boc, 'use multiples of the first entry')
  size = int(image_size or config.get('sample_size') or 64)
  if isinstance(config.get('sample_size'), (list, tuple)):
    _refuse(where, 'sample_size', config['sample_size'], 'use one side (square images)')
  act, emb_act, shift = _activations(config, where)
  if plain and act != 'silu':
    _refuse(where, 'act_fn', act, "use 'silu' (UNet2DModel's time embedding and output do)")
  in_ch, out_ch = int(config.get('in_channels', 4)), int(config.get('out_channels', 4))
  if out_ch not in (image_channels, 2 * image_channels):
    _refuse(where, 'out_channels', out_ch, f'use {image_channels} (eps) or '
            f'{2 * image_channels} (eps and variance) for {image_channels}-channel images')
  if in_ch not in (image_channels, 2 * image_channels):
    _refuse(where, 'in_channels', in_ch, f'use {image_channels}, or {2 * image_channels} with '
            'the upsampled low-res image')
  layers_per_block = config.get('layers_per_block', 2)
  num_res_blocks = (tuple(int(n) for n in layers_per_block)
                    if isinstance(layers_per_block, (list, tuple)) else int(layers_per_block))
  kw: dict[str, Any] = dict(
      image_size=size, in_channels=image_channels, out_channels=image_channels,
      learned_variance=out_ch == 2 * image_channels, model_channels=boc[0],
      channel_mult=tuple(c // boc[0] for c in boc), num_res_blocks=num_res_blocks,
      norm_groups=int(config.get('norm_num_groups', 32)),
      dropout=float(config.get('dropout', 0.0)),
      time_embed_dim=int(config.get('time_embedding_dim') or 4 * boc[0]),
      attention_resolutions=tuple(size // 2 ** i for i, a in enumerate(attends) if a),
      mid_attention=not plain, use_scale_shift_norm=shift == 'scale_shift',
      resblock_updown=True, attention_per='block', text_attention='concat_kv',
      time_embed_scale=1000.0, time_embed_shift=-1.0, act=act, emb_act=emb_act,
      res_skip_time_act=bool(config.get('resnet_skip_time_act', False)),
      res_output_scale=float(config.get('resnet_out_scale_factor', 1.0)),
      mid_output_scale=float(config.get('mid_block_scale_factor', 1.0)),
      text_mask_keys=text_mask_keys)
  if in_ch == 2 * image_channels:
    # The low-res image as the pipelines upsample it: IF's bilinear with aligned corners,
    # unCLIP's antialiased bicubic.
    kw.update(low_res_size=int(low_res_size or size // 4),
              low_res_resize='bicubic' if plain else 'bilinear_align_corners')
  class_type = config.get('class_embed_type')
  if class_type not in (None, 'timestep', 'identity') or (plain and class_type == 'identity'):
    _refuse(where, 'class_embed_type', class_type,
            "use null, 'timestep' or (unCLIP's decoder) 'identity'")
  unclip = class_type == 'identity'
  if unclip and text_proj_config is None:
    _refuse(where, 'class_embed_type', class_type,
            "an unCLIP decoder needs its text_proj config (text_proj_config=...)")
  if not plain:
    head_dims = config.get('attention_head_dim', 8)
    if isinstance(head_dims, (list, tuple)):
      if len(head_dims) != len(boc) or not all(isinstance(d, int) and d > 0 for d in head_dims):
        _refuse(where, 'attention_head_dim', list(head_dims), 'give one width per level')
      head_dims = [int(d) for d in head_dims]
    else:
      head_dims = [int(head_dims)] * len(boc)
    # diffusers' up blocks read the list in down-block order: level l going up takes entry
    # n - 1 - l; the middle takes the last entry.
    up_dims = head_dims[::-1]
    if any(c % d for c, a, d in zip(boc, attends, head_dims) if a) or any(
        c % d for c, a, d in zip(boc, attends, up_dims) if a) or boc[-1] % head_dims[-1]:
      _refuse(where, 'attention_head_dim', config.get('attention_head_dim', 8),
              'use a divisor of the attending widths')
    kw.update(num_heads=1, head_channels=head_dims[-1])
    if len(set(head_dims)) > 1:
      kw.update(down_head_channels=tuple(head_dims), up_head_channels=tuple(up_dims))
    ctx_dim = config.get('cross_attention_dim', 1280)
    if isinstance(ctx_dim, (list, tuple)):
      _refuse(where, 'cross_attention_dim', list(ctx_dim), 'use one width for every level')
    hid_type = config.get('encoder_hid_dim_type')
    hid_dim = config.get('encoder_hid_dim')
    if hid_type is None and hid_dim is not None:
      hid_type = 'text_proj'
    if unclip:
      if hid_type is not None:
        _refuse(where, 'encoder_hid_dim_type', hid_type, 'use null: text_proj projects the text')
      kw.update(_unclip_text_proj_kwargs(text_proj_config, int(ctx_dim), kw['time_embed_dim']))
    elif hid_type != 'text_proj':
      _refuse(where, 'encoder_hid_dim_type', hid_type, "use 'text_proj' with encoder_hid_dim")
    else:
      # IF guides with the encoded empty prompt: no learned null text
      kw.update(text_source='tokens', text_dim=int(hid_dim), context_dim=int(ctx_dim),
                learned_null_text=False)
    norm = config.get('cross_attention_norm')
    if norm not in (None, 'group_norm'):
      _refuse(where, 'cross_attention_norm', norm, "use null or 'group_norm'")
    kw['context_norm_groups'] = 32 if norm == 'group_norm' else 0
    only = config.get('only_cross_attention', False)
    mid_only = config.get('mid_block_only_cross_attention')
    if isinstance(only, bool):
      mid_only = only if mid_only is None else mid_only
      only = [only] * len(down)
    kw['context_only_resolutions'] = tuple(
        size // 2 ** i for i, (a, o) in enumerate(zip(attends, only)) if a and o)
    kw['mid_context_only'] = bool(mid_only)
  add = config.get('addition_embed_type')
  if add not in (None, 'text'):
    _refuse(where, 'addition_embed_type', add, "use null or 'text'")
  if add == 'text':
    if kw.get('text_source') != 'tokens':
      _refuse(where, 'addition_embed_type', add, 'it needs text tokens (attention blocks)')
    pool_heads = int(config.get('addition_embed_type_num_heads', 64))
    if kw['text_dim'] % pool_heads:  # diffusers' pooling splits the text width into the heads
      _refuse(where, 'addition_embed_type_num_heads', pool_heads,
              f"use a divisor of encoder_hid_dim {kw['text_dim']}")
    kw.update(text_pool='attention_query_key', text_pool_heads=pool_heads)
  kw['aug_cond'] = class_type == 'timestep'
  kw['text_mask_keys'] = unclip if text_mask_keys is None else text_mask_keys
  kw.update(extra)
  return kw


def _unclip_text_proj_kwargs(tp: Mapping[str, Any], ctx_dim: int, emb_dim: int) -> dict:
  """Our fields for diffusers' UnCLIPTextProjModel in front of an unCLIP decoder."""
  where = 'text_proj/config.json'
  if tp.get('_class_name', 'UnCLIPTextProjModel') != 'UnCLIPTextProjModel':
    _refuse(where, '_class_name', tp.get('_class_name'), 'use an UnCLIPTextProjModel config')
  if int(tp['cross_attention_dim']) != ctx_dim:
    _refuse(where, 'cross_attention_dim', tp['cross_attention_dim'],
            f"use the decoder's cross_attention_dim {ctx_dim}")
  if int(tp['time_embed_dim']) != emb_dim:
    _refuse(where, 'time_embed_dim', tp['time_embed_dim'],
            f"use the decoder's time embedding width {emb_dim}")
  clip_dim = int(tp.get('clip_embeddings_dim', 768))
  return dict(text_source='tokens', text_dim=clip_dim, context_dim=ctx_dim, text_proj_norm=True,
              text_pool='embed', text_embed_dim=clip_dim, learned_null_text=False,
              image_embed_dim=clip_dim,
              image_embed_tokens=int(tp.get('clip_extra_context_tokens', 4)))


def _plain_config(m: UNet, where: str) -> dict[str, Any]:
  """The `UNet2DModel` config of a UNet without text or attention."""
  fixed = dict(act='silu', emb_act='none', res_skip_time_act=False, res_output_scale=1.0,
               attention_resolutions=(), mid_attention=False, image_embed_dim=0)
  for field, want in fixed.items():
    if tuple(getattr(m, field)) != want if field == 'attention_resolutions' else (
        getattr(m, field) != want):
      _refuse(where, field, getattr(m, field), f'a U-Net without text needs {want!r}')
  if m.low_res_size and m.low_res_resize != 'bicubic':
    _refuse(where, 'low_res_resize', m.low_res_resize, "use 'bicubic' (unCLIP's upsampling)")
  nblocks = set(m.blocks_per_level())
  if len(nblocks) != 1:
    _refuse(where, 'num_res_blocks', m.num_res_blocks, 'use one depth for every level')
  n = len(m.channel_mult)
  return {
      '_class_name': 'UNet2DModel', 'sample_size': m.image_size,
      'in_channels': m.in_channels * (2 if m.low_res_size else 1),
      'out_channels': m.out_channels * (2 if m.learned_variance else 1),
      'down_block_types': ['ResnetDownsampleBlock2D'] * n,
      'up_block_types': ['ResnetUpsampleBlock2D'] * n,
      'mid_block_type': PLAIN_MID_TYPE, 'add_attention': False, 'attention_head_dim': None,
      'block_out_channels': [c * m.model_channels for c in m.channel_mult],
      'layers_per_block': nblocks.pop(), 'norm_num_groups': m.norm_groups, 'norm_eps': 1e-5,
      'dropout': m.dropout, 'act_fn': 'silu',
      'time_embedding_dim': None if m.emb_dim == 4 * m.model_channels else m.emb_dim,
      'flip_sin_to_cos': True, 'freq_shift': 0,
      'resnet_time_scale_shift': 'scale_shift' if m.use_scale_shift_norm else 'default',
      'mid_block_scale_factor': m.mid_output_scale,
      'class_embed_type': 'timestep' if m.aug_cond else None,
  }


def _per_level(where: str, field: str, value, levels: int) -> list[int]:
  """An int, or a list of positive ints with one per level, as that list."""
  if isinstance(value, (list, tuple)):
    if len(value) != levels or not all(isinstance(v, int) and v > 0 for v in value):
      _refuse(where, field, list(value), f'give one positive number per level ({levels})')
    return [int(v) for v in value]
  if not isinstance(value, int) or value <= 0:
    _refuse(where, field, value, 'use a positive number, or one per level')
  return [int(value)] * levels


def _sd_unet_kwargs(config: Mapping[str, Any], where: str, image_size: int | None,
                    image_channels: int | None, text_mask_keys: bool | None,
                    extra: Mapping[str, Any]) -> dict[str, Any]:
  """Our `UNet` fields for Stable Diffusion's `UNet2DConditionModel` (DownBlock2D /
  CrossAttnDownBlock2D levels, UNetMidBlock2DCrossAttn): ADM's layout without resampling res
  blocks, attention as `layers.SpatialTransformer`.

  Its `attention_head_dim` is the number of heads of each level (diffusers reads it so when
  `num_attention_heads` is unset), up level l like down level l; the text encoding
  (cond['text_tokens'], `cross_attention_dim` wide) enters every cross-attention as it is, all
  tokens visible (`text_mask_keys=False`), as SD's pipelines pass no mask; a dropped caption
  reads the empty prompt's encoding. An inpainting U-Net (in_channels 2 C + 1) takes
  [x, mask, masked image latents] (`inpaint_premasked`). diffusers ignores
  resnet_skip_time_act, resnet_out_scale_factor, cross_attention_norm and
  mid_block_only_cross_attention here, and so do we.
  """
  _check_required(config, where, {**REQUIRED, **SD_REQUIRED})
  down = list(config.get('down_block_types', ()))
  up = list(config.get('up_block_types', ()))
  for field, types, allowed in (('down_block_types', down, SD_DOWN_TYPES),
                                ('up_block_types', up, SD_UP_TYPES)):
    for t in types:
      if t not in allowed:
        _refuse(where, field, t, f'a Stable Diffusion U-Net (mid_block_type {SD_MID_TYPE}) '
                f'takes {" or ".join(allowed)}')
  attends = [SD_DOWN_TYPES[t] for t in down]
  if [SD_UP_TYPES[t] for t in up] != attends[::-1]:
    _refuse(where, 'up_block_types', up, 'use the mirror image of down_block_types')
  boc = [int(c) for c in config['block_out_channels']]
  n = len(boc)
  if n != len(down) or any(c % boc[0] for c in boc):
    _refuse(where, 'block_out_channels', boc,
            'give one entry per down block, each a multiple of the first')
  if isinstance(config.get('sample_size'), (list, tuple)):
    _refuse(where, 'sample_size', config['sample_size'], 'use one side (square images)')
  size = int(image_size or config.get('sample_size') or 64)
  if size % 2 ** (n - 1):  # diffusers resizes odd levels' upsamples to their skips; we do not
    _refuse(where, 'sample_size', size, f'use a multiple of {2 ** (n - 1)} ({n} levels)')
  act, emb_act, shift = _activations(config, where)
  in_ch, out_ch = int(config.get('in_channels', 4)), int(config.get('out_channels', 4))
  C = out_ch if image_channels is None else int(image_channels)
  if out_ch not in (C, 2 * C):
    _refuse(where, 'out_channels', out_ch, f'use {C} (eps) or {2 * C} (eps and variance) for '
            f'{C}-channel latents')
  if in_ch not in (C, 2 * C + 1):
    _refuse(where, 'in_channels', in_ch, f'use {C}, or {2 * C + 1} for inpainting (latents, '
            'mask and masked image latents)')
  groups = int(config.get('norm_num_groups', 32))
  heads = _per_level(where, 'attention_head_dim', config.get('attention_head_dim', 8), n)
  if any(c % h for c, h in zip(boc, heads)):
    _refuse(where, 'attention_head_dim', config.get('attention_head_dim'),
            "it is each level's head count here: use divisors of block_out_channels")
  widths = tuple(c // h for c, h in zip(boc, heads))
  depth = config.get('transformer_layers_per_block', 1)
  if isinstance(depth, (list, tuple)) and any(isinstance(d, (list, tuple)) for d in depth):
    _refuse(where, 'transformer_layers_per_block', list(depth), 'give one depth per level')
  depths = _per_level(where, 'transformer_layers_per_block', depth, n)
  ctx_dim = config.get('cross_attention_dim', 1280)
  if isinstance(ctx_dim, (list, tuple)):
    ctx_dim = _one_value(where, 'cross_attention_dim', ctx_dim)
  layers_per_block = config.get('layers_per_block', 2)
  kw: dict[str, Any] = dict(
      image_size=size, in_channels=C, out_channels=C, learned_variance=out_ch == 2 * C,
      inpaint=in_ch == 2 * C + 1, inpaint_premasked=in_ch == 2 * C + 1,
      model_channels=boc[0], channel_mult=tuple(c // boc[0] for c in boc),
      num_res_blocks=(tuple(_per_level(where, 'layers_per_block', layers_per_block, n))
                      if isinstance(layers_per_block, (list, tuple)) else int(layers_per_block)),
      norm_groups=groups, dropout=float(config.get('dropout', 0.0)),
      time_embed_dim=int(config.get('time_embedding_dim') or 4 * boc[0]),
      attention_resolutions=tuple(size // 2 ** i for i, a in enumerate(attends) if a),
      mid_attention=True, use_scale_shift_norm=shift == 'scale_shift', resblock_updown=False,
      attention_per='block', attention_block='transformer',
      transformer_depth=depths[0] if len(set(depths)) == 1 else tuple(depths),
      linear_projection=bool(config.get('use_linear_projection', False)),
      attention_upcast=bool(config.get('upcast_attention', False)),
      num_heads=1, head_channels=widths[-1],
      time_embed_scale=1000.0, time_embed_shift=-1.0, act=act, emb_act=emb_act,
      mid_output_scale=float(config.get('mid_block_scale_factor', 1.0)),
      text_source='tokens', text_dim=int(ctx_dim), context_dim=int(ctx_dim), project_text=False,
      learned_null_text=False, text_mask_keys=bool(text_mask_keys))
  if len(set(widths)) > 1:
    kw.update(down_head_channels=widths, up_head_channels=widths)
  kw.update(extra)
  return kw


def _sd_config(m: UNet, where: str) -> dict[str, Any]:
  """The `UNet2DConditionModel` config of a UNet with transformer attention (Stable
  Diffusion's layout): `_sd_unet_kwargs`' inverse."""
  fixed = dict(resblock_updown=False, attention_per='block', text_source='tokens',
               project_text=False, text_pool='none', image_embed_dim=0, low_res_size=0,
               aug_cond=False, coord_channels=False, text_position_embed=False,
               text_proj_norm=False, res_output_scale=1.0, res_skip_time_act=False,
               mid_attention=True, time_embed_scale=1000.0, time_embed_shift=-1.0)
  for field, want in fixed.items():
    if getattr(m, field) != want:
      _refuse(where, field, getattr(m, field), f'a Stable Diffusion U-Net needs {want!r}')
  if m.inpaint and not m.inpaint_premasked:
    _refuse(where, 'inpaint_premasked', False, "SD's inpainting U-Net takes the masked image "
            'latents as they are: set it')
  n = len(m.channel_mult)
  boc = [c * m.model_channels for c in m.channel_mult]
  res = [m.image_size // 2 ** i for i in range(n)]
  attends = [r in m.attention_resolutions for r in res]
  widths = list(m.down_head_channels) or [m.head_channels] * n
  if m.up_head_channels and list(m.up_head_channels) != widths:
    _refuse(where, 'up_head_channels', m.up_head_channels,
            'diffusers gives each up level the heads of its down level: use down_head_channels')
  if any(w <= 0 or c % w for c, w in zip(boc, widths)) or m.head_channels != widths[-1]:
    _refuse(where, 'head_channels', m.head_channels, 'give head widths that divide every '
            "level's width, head_channels the deepest one")
  heads = [c // w for c, w in zip(boc, widths)]
  depths = [m.transformer_depth_of(level) for level in range(n)]
  nblocks = m.blocks_per_level()
  C = m.in_channels
  return {
      '_class_name': 'UNet2DConditionModel', 'sample_size': m.image_size,
      'in_channels': 2 * C + 1 if m.inpaint else C,
      'out_channels': C * (2 if m.learned_variance else 1),
      'down_block_types': ['CrossAttnDownBlock2D' if a else 'DownBlock2D' for a in attends],
      'up_block_types': ['CrossAttnUpBlock2D' if a else 'UpBlock2D' for a in attends[::-1]],
      'mid_block_type': SD_MID_TYPE, 'block_out_channels': boc,
      'layers_per_block': nblocks[0] if len(set(nblocks)) == 1 else list(nblocks),
      'norm_num_groups': m.norm_groups, 'norm_eps': 1e-5, 'dropout': m.dropout,
      'act_fn': m.act, 'time_embedding_act_fn': None if m.emb_act == 'none' else m.emb_act,
      'time_embedding_dim': None if m.emb_dim == 4 * m.model_channels else m.emb_dim,
      'flip_sin_to_cos': True, 'freq_shift': 0, 'center_input_sample': False,
      'downsample_padding': 1,
      'resnet_time_scale_shift': 'scale_shift' if m.use_scale_shift_norm else 'default',
      'mid_block_scale_factor': m.mid_output_scale,
      'attention_head_dim': heads[0] if len(set(heads)) == 1 else heads,
      'transformer_layers_per_block': depths[0] if len(set(depths)) == 1 else depths,
      'cross_attention_dim': m.ctx_dim, 'use_linear_projection': m.linear_projection,
      'upcast_attention': m.attention_upcast, 'only_cross_attention': False,
      'dual_cross_attention': False, 'class_embed_type': None, 'addition_embed_type': None,
  }


def diffusers_config(kw: Mapping[str, Any]) -> dict[str, Any]:
  """The diffusers config (`UNet2DConditionModel`, or `UNet2DModel` without text) of our UNet
  fields: `unet_kwargs`' inverse."""
  m = UNet(**kw)
  where = 'export_unet'
  if m.attention_block == 'transformer':
    return _sd_config(m, where)
  expressible = dict(resblock_updown=True, attention_per='block', text_attention='concat_kv',
                     time_embed_scale=1000.0, time_embed_shift=-1.0, ff_mult=0, inpaint=False,
                     coord_channels=False, text_position_embed=False, project_text=True)
  for field, want in expressible.items():
    if getattr(m, field) != want:
      _refuse(where, field, getattr(m, field), f'diffusers U-Nets need {want!r}')
  if m.text_source == 'none' and m.text_pool == 'none':
    return _plain_config(m, where)
  unclip = bool(m.image_embed_dim)
  if unclip and not (m.text_proj_norm and m.text_pool == 'embed' and not m.learned_null_text
                     and m.text_dim == m.text_embed_dim == m.image_embed_dim):
    _refuse(where, 'image_embed_dim', m.image_embed_dim,
            "an unCLIP decoder needs text_proj_norm, text_pool='embed', learned_null_text=False "
            'and one CLIP width for tokens, text and image embeddings')
  if m.text_source != 'tokens' or m.text_pool not in (
      ('embed',) if unclip else ('none', 'attention_query_key')):
    _refuse(where, 'text_source/text_pool', (m.text_source, m.text_pool),
            "use text_source='tokens' with text_pool 'none' or 'attention_query_key'")
  if m.head_channels <= 0:
    _refuse(where, 'head_channels', m.head_channels, 'give the head width (attention_head_dim)')
  if (m.down_head_channels or m.up_head_channels) and not (
      tuple(m.up_head_channels) == tuple(m.down_head_channels)[::-1]
      and m.head_channels == m.down_head_channels[-1]):
    _refuse(where, 'up_head_channels', m.up_head_channels,
            "diffusers' per-level attention_head_dim needs the reversed down_head_channels "
            'and head_channels equal to the last')
  if m.low_res_size and m.low_res_resize != 'bilinear_align_corners':
    _refuse(where, 'low_res_resize', m.low_res_resize, "use 'bilinear_align_corners'")
  n = len(m.channel_mult)
  boc = [c * m.model_channels for c in m.channel_mult]
  res = [m.image_size // 2 ** i for i in range(n)]
  attends = [r in m.attention_resolutions for r in res]
  nblocks = m.blocks_per_level()
  lpb = nblocks[0] if len(set(nblocks)) == 1 else list(nblocks)
  in_ch = m.in_channels * (2 if m.low_res_size else 1)
  # Non-attending levels ignore the flag: one bool when the attending levels agree.
  flags = [r in m.context_only_resolutions for r in res]
  attending_flags = {f for f, a in zip(flags, attends) if a}
  only_cross = attending_flags.pop() if len(attending_flags) == 1 else flags
  return {
      '_class_name': 'UNet2DConditionModel', 'sample_size': m.image_size,
      'in_channels': in_ch, 'out_channels': m.out_channels * (2 if m.learned_variance else 1),
      'down_block_types': ['SimpleCrossAttnDownBlock2D' if a else 'ResnetDownsampleBlock2D'
                           for a in attends],
      'up_block_types': ['SimpleCrossAttnUpBlock2D' if a else 'ResnetUpsampleBlock2D'
                         for a in attends[::-1]],
      'mid_block_type': MID_TYPE if m.mid_attention else None,
      'block_out_channels': boc, 'layers_per_block': lpb,
      'norm_num_groups': m.norm_groups, 'norm_eps': 1e-5, 'dropout': m.dropout,
      'act_fn': m.act, 'time_embedding_act_fn': None if m.emb_act == 'none' else m.emb_act,
      'time_embedding_dim': None if m.emb_dim == 4 * m.model_channels else m.emb_dim,
      'flip_sin_to_cos': True, 'freq_shift': 0,
      'resnet_time_scale_shift': 'scale_shift' if m.use_scale_shift_norm else 'default',
      'resnet_skip_time_act': m.res_skip_time_act, 'resnet_out_scale_factor': m.res_output_scale,
      'mid_block_scale_factor': m.mid_output_scale,
      'attention_head_dim': list(m.down_head_channels) or m.head_channels,
      'cross_attention_dim': m.ctx_dim, 'encoder_hid_dim': None if unclip else m.text_dim,
      'encoder_hid_dim_type': None if unclip else 'text_proj',
      'cross_attention_norm': 'group_norm' if m.context_norm_groups else None,
      'only_cross_attention': only_cross,
      'mid_block_only_cross_attention': m.mid_context_only,
      'addition_embed_type': 'text' if m.text_pool == 'attention_query_key' else None,
      'addition_embed_type_num_heads': m.text_pool_heads or m.num_heads,
      'class_embed_type': 'identity' if unclip else 'timestep' if m.aug_cond else None,
  }


def text_proj_config(kw: Mapping[str, Any]) -> dict[str, Any]:
  """The `UnCLIPTextProjModel` config of an unCLIP decoder's fields."""
  m = UNet(**kw)
  return {'_class_name': 'UnCLIPTextProjModel', 'clip_extra_context_tokens': m.image_embed_tokens,
          'clip_embeddings_dim': m.image_embed_dim, 'time_embed_dim': m.emb_dim,
          'cross_attention_dim': m.ctx_dim}


# ------------------------------------------------------------------------------------------
# parameter names

_RES = {'GroupNorm_0': 'norm1', 'Conv_0': 'conv1', 'Dense_0': 'time_emb_proj',
        'GroupNorm_1': 'norm2', 'Conv_1': 'conv2', 'Conv_2': 'conv_shortcut'}
_ATTN = {'GroupNorm_0': 'group_norm', 'query': 'to_q', 'key': 'to_k', 'value': 'to_v',
         'context_key': 'add_k_proj', 'context_value': 'add_v_proj', 'out': 'to_out.0',
         'context_norm': 'norm_cross'}
_POOL = {'LayerNorm_0': 'norm1', 'query_proj': 'pool.q_proj', 'key': 'pool.k_proj',
         'value': 'pool.v_proj', 'Dense_0': 'proj', 'LayerNorm_1': 'norm2'}
_TOP = {'in_conv': 'conv_in', 'out_norm': 'conv_norm_out', 'out_conv': 'conv_out',
        'text_proj': 'encoder_hid_proj'}
# unCLIP's text_proj model, its tensors prefixed with TEXT_PROJ_PREFIX in the merged state.
TEXT_PROJ_PREFIX = 'text_proj.'
_UNCLIP_TOP = {
    'text_proj': 'encoder_hidden_states_proj', 'text_proj_norm': 'text_encoder_hidden_states_norm',
    'text_embed_proj': 'embedding_proj',
    'image_embed_proj': 'clip_image_embeddings_project_to_time_embeddings',
    'image_tokens_proj': 'clip_extra_context_tokens_proj'}
_UNCLIP_NULL = TEXT_PROJ_PREFIX + 'learned_classifier_free_guidance_embeddings'
_UNCLIP_TOKENS = "clip_extra_context_tokens_proj."
# Stable Diffusion's Transformer2DModel (`layers.SpatialTransformer`); `block{i}` is
# transformer_blocks.{i}.
_SPATIAL = {'norm': 'norm', 'proj_in': 'proj_in', 'proj_out': 'proj_out',
            'self_attn_norm': 'norm1', 'self_attn': 'attn1', 'cross_attn_norm': 'norm2',
            'cross_attn': 'attn2', 'ff_norm': 'norm3', 'ff_in': 'ff.net.0.proj',
            'ff_out': 'ff.net.2', 'query': 'to_q', 'key': 'to_k', 'value': 'to_v',
            'out': 'to_out.0'}



def _module_name(path: tuple[str, ...], levels: int, unclip: bool,
                 conv_resample: bool = False) -> str:
  """The diffusers module of one of our parameter paths (without the leaf);
  `conv_resample`: the levels resample with a conv (Downsample2D / Upsample2D), not a res
  block."""
  head, rest = path[0], path[1:]
  if unclip and head in _UNCLIP_TOP:
    return TEXT_PROJ_PREFIX + _UNCLIP_TOP[head]
  if head in _TOP:
    return _TOP[head]
  if head in ('time_embed', 'aug_embed'):
    owner = 'time_embedding' if head == 'time_embed' else 'class_embedding'
    return f'{owner}.linear_{int(rest[0].split("_")[1]) + 1}'
  if head == 'text_pool':
    return f'add_embedding.{_POOL[rest[0]]}'
  parts = head.split('_')
  if head.startswith('mid_'):
    block = 'mid_block'
    inner = (f'resnets.{parts[1][3:]}' if parts[1].startswith('res') else 'attentions.0')
  else:
    side = 'down' if parts[0].startswith('down') else 'up'
    level = int(parts[0][len(side):])
    index = level if side == 'down' else levels - 1 - level
    block = f'{side}_blocks.{index}'
    if parts[1].startswith('res'):
      inner = f'resnets.{parts[1][3:]}'
    elif parts[1] in ('downsample', 'upsample'):
      inner = f'{side}samplers.0'
    else:
      inner = f'attentions.{parts[1]}'
  sub = rest[0]
  if inner.startswith('attentions') and sub not in _ATTN:  # a SpatialTransformer
    names = [f'transformer_blocks.{p[len("block"):]}' if p.startswith('block') else _SPATIAL[p]
             for p in rest]
    return f'{block}.{inner}.{".".join(names)}'
  if conv_resample and inner.endswith('samplers.0'):
    return f'{block}.{inner}.conv'
  table = _ATTN if inner.startswith('attentions') else _RES
  return f'{block}.{inner}.{table[sub]}'


def _rule(path: tuple[str, ...], shape: tuple[int, ...], levels: int, unclip: bool,
          conv_resample: bool = False) -> convert.Rule:
  if path == ('text_pool', 'query'):
    return convert.Rule(path, (_POOL_QUERY,), 'same')
  if path == ('null_image_embed',):
    return convert.Rule(path, (_UNCLIP_NULL,), 'same')
  name, leaf = _module_name(path[:-1], levels, unclip, conv_resample), path[-1]
  if leaf == 'kernel':
    if len(shape) == 4:
      return convert.Rule(path, (f'{name}.weight',), 'conv')
    n_in = 2 if (len(shape) == 3 and path[-2] == 'out') else 1
    return convert.Rule(path, (f'{name}.weight',), 'linear', n_in=n_in)
  if leaf == 'scale':
    return convert.Rule(path, (f'{name}.weight',), 'same')
  if leaf == 'bias':
    return convert.Rule(path, (f'{name}.bias',), 'flat' if len(shape) > 1 else 'same')
  raise AssertionError(f'no diffusers name for parameter {"/".join(path)}')


def abstract_params(kw: Mapping[str, Any]) -> dict:
  """The parameter tree of `UNet(**kw)` as shapes (nothing allocated)."""
  module = UNet(**kw)
  x, t, cond = models.example_inputs(
      ml_collections.ConfigDict(dict(kw, name='unet', text_len=kw.get('text_len') or 8)), 1)
  return jax.eval_shape(lambda: nn.meta.unbox(module.init(jax.random.key(0), x, t, cond)
                                              ['params']))


def param_count(kw: Mapping[str, Any]) -> int:
  return int(sum(np.prod(a.shape) for a in jax.tree.leaves(abstract_params(kw))))


def unet_rules(kw: Mapping[str, Any]) -> tuple[list[convert.Rule], dict]:
  template = traverse_util.flatten_dict(abstract_params(kw))
  levels = len(kw.get('channel_mult', UNet.channel_mult))
  unclip = bool(kw.get('image_embed_dim'))
  conv_resample = not UNet(**kw).resblock_updown
  return [_rule(p, tuple(a.shape), levels, unclip, conv_resample)
          for p, a in template.items()], template


def _tokens_minor_to_major(a: np.ndarray, tokens: int) -> np.ndarray:
  """unCLIP's extra-token projection outputs [width, tokens] (token minor: it reshapes to
  [B, D, n] and permutes); ours outputs [tokens, width]: reorders the output rows."""
  a = np.asarray(a)
  return a.reshape((-1, tokens) + a.shape[1:]).swapaxes(0, 1).reshape(a.shape)


def convert_unet(state_dict: Mapping[str, np.ndarray], kw: Mapping[str, Any], *,
                 text_proj_state: Mapping[str, np.ndarray] | None = None,
                 what: str = 'diffusers U-Net') -> dict:
  """Our parameter tree (numpy) from a diffusers state dict (and, for an unCLIP decoder, its
  text_proj's); every parameter must be filled and every tensor used, else the error names
  the missing and the unused ones."""
  rules, template = unet_rules(kw)
  tensors = dict(state_dict)
  if _POOL_QUERY in tensors:
    tensors[_POOL_QUERY] = np.asarray(tensors[_POOL_QUERY]).reshape(-1)
  for key, value in (text_proj_state or {}).items():
    if key.startswith(_UNCLIP_TOKENS):
      value = _tokens_minor_to_major(value, int(kw.get('image_embed_tokens', 4)))
    tensors[TEXT_PROJ_PREFIX + key] = value
  return convert.assemble(tensors, rules, template, what=what)


def export_unet(kw: Mapping[str, Any], params: Mapping) -> tuple[dict, dict[str, np.ndarray]]:
  """(diffusers config, state dict) of our UNet fields and parameters; an unCLIP decoder's
  text_proj tensors come under TEXT_PROJ_PREFIX (`split_text_proj`)."""
  config = diffusers_config(kw)
  rules, _ = unet_rules(kw)
  state = convert.disassemble(params, rules, what='UNet params')
  if _POOL_QUERY in state:
    state[_POOL_QUERY] = state[_POOL_QUERY].reshape(1, -1)
  tokens = int(kw.get('image_embed_tokens', 4))
  for key in state:
    if key.startswith(TEXT_PROJ_PREFIX + _UNCLIP_TOKENS):
      # The inverse reordering: [tokens, width] rows back to [width, tokens].
      state[key] = _tokens_minor_to_major(state[key], state[key].shape[0] // tokens)
  return config, {k: np.asarray(v, np.float32) for k, v in state.items()}


def split_text_proj(state: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
  """(decoder state, text_proj state) of an exported unCLIP decoder."""
  decoder = {k: v for k, v in state.items() if not k.startswith(TEXT_PROJ_PREFIX)}
  text_proj = {k[len(TEXT_PROJ_PREFIX):]: v for k, v in state.items()
               if k.startswith(TEXT_PROJ_PREFIX)}
  return decoder, text_proj


def load_unet(folder: str, text_proj_folder: str | None = None, **extra) -> tuple[UNet, dict]:
  """(module, params) from a diffusers U-Net folder (config.json and
  diffusion_pytorch_model.safetensors, or its shards), with an unCLIP decoder's text_proj
  folder merged into the same tree; `extra` as in `unet_kwargs`."""
  config = _read_json(os.path.join(folder, CONFIG_NAME))
  where = os.path.join(os.path.basename(os.path.normpath(folder)), CONFIG_NAME)
  if text_proj_folder is not None:
    extra['text_proj_config'] = _read_json(os.path.join(text_proj_folder, CONFIG_NAME))
  kw = unet_kwargs(config, where=where, **extra)
  text_proj_state = None
  if text_proj_folder is not None:
    text_proj_state = read_model_folder(text_proj_folder)
  params = convert_unet(read_model_folder(folder), kw, text_proj_state=text_proj_state,
                        what=os.path.join(folder, WEIGHTS_NAME))
  return UNet(**kw), params


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    raise errors.InputError(f'{path}: no such file; expected a diffusers model folder '
                            f'({CONFIG_NAME} and {WEIGHTS_NAME})')
  with open(path) as f:
    return json.load(f)


def read_model_folder(folder: str) -> dict[str, np.ndarray]:
  """The tensors of a diffusers model folder: the float32 safetensors file or its shards, else
  the fp16 variant (`save_pretrained(variant='fp16')`, as DeepFloyd IF publishes) or its
  shards, as float32."""
  if os.path.isfile(os.path.join(folder, WEIGHTS_INDEX_NAME)):
    return convert.read_weights(folder)
  for name in (WEIGHTS_NAME, FP16_WEIGHTS_NAME):
    if os.path.isfile(os.path.join(folder, name)):
      tensors = convert.read_safetensors(os.path.join(folder, name))
      return {k: np.asarray(v, np.float32) for k, v in tensors.items()}
  if os.path.isfile(os.path.join(folder, FP16_WEIGHTS_INDEX_NAME)):
    # Only the fp16 shards are left in the folder: read_weights reads them all.
    return {k: np.asarray(v, np.float32) for k, v in convert.read_weights(folder).items()}
  pickles = sorted(n for n in (os.listdir(folder) if os.path.isdir(folder) else ())
                   if n.lower().endswith(convert.PICKLE_SUFFIXES))
  if pickles:
    raise convert.WeightImportError(convert.pickle_refusal(os.path.join(folder, pickles[0])))
  raise errors.InputError(f'{folder}: no {WEIGHTS_NAME} or {FP16_WEIGHTS_NAME} (or their '
                          '.index.json shards); save the model with '
                          'save_pretrained(safe_serialization=True)')


def save_unet(folder: str, kw: Mapping[str, Any], params: Mapping,
              text_proj_folder: str | None = None) -> str:
  """Writes our UNet as a diffusers U-Net folder that `from_pretrained` loads (an unCLIP
  decoder's text_proj into `text_proj_folder`)."""
  config, state = export_unet(kw, params)
  state, text_proj = split_text_proj(state)
  if text_proj and text_proj_folder is None:
    raise errors.InputError('save_unet: an unCLIP decoder needs text_proj_folder= for its '
                            'text_proj model')
  for where, cfg, tensors in ((folder, config, state),
                              (text_proj_folder, text_proj_config(kw), text_proj)):
    if tensors:
      os.makedirs(where, exist_ok=True)
      convert.write_safetensors(tensors, os.path.join(where, WEIGHTS_NAME))
      io_util.write_json(os.path.join(where, CONFIG_NAME), cfg)
  return folder
