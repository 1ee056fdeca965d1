"""ADM U-Net (Dhariwal & Nichol 2021) with the text/image conditioning of the three cascades.

One module serves GLIDE's base and upsampler (jointly trained text transformer, its tokens
concatenated to every attention layer's keys/values), the unCLIP decoder and upsamplers (CLIP
image embedding added to the time embedding and projected into 4 extra context tokens), and
Imagen's 64 px base model (frozen T5 tokens as extra attention keys/values, or through a
separate cross-attention layer with `text_attention='cross'`; attention-pooled text added to
the time embedding). Which pathways exist is decided by the config alone.

Called as `module.apply({'params': p}, x_BHWC, t_B, cond, train=False, rngs=...)` (see
docs/ARCHITECTURE.md); the output is float32 with `out_channels` (twice that for a learned
variance) channels.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import layers
from diffusion_jax.models.text_transformer import TextTransformer

Dtype = Any


def upsample_low_res(low_BHWC, height: int, width: int, method: str):
  """An SR network's low-res input at x's size (`UNet.low_res_resize`); one already there is
  returned as it is."""
  if low_BHWC.shape[1:3] == (height, width):
    return low_BHWC
  if method in ('bilinear', 'bicubic'):
    return jax.image.resize(low_BHWC, low_BHWC.shape[:1] + (height, width) + low_BHWC.shape[3:],
                            method)
  if method == 'bilinear_align_corners':
    return layers.resize_align_corners(low_BHWC, height, width)
  raise ValueError(f"low_res_resize={method!r}: use 'bilinear', 'bicubic' or "
                   "'bilinear_align_corners'")


class ConditionedUNetBase(nn.Module):
  """Fields and the conditioning pathway shared by `UNet` and `EfficientUNet`."""
  image_size: int = 64
  in_channels: int = 3
  out_channels: int = 3
  learned_variance: bool = False
  model_channels: int = 128
  channel_mult: tuple[int, ...] = (1, 2, 3, 4)
  num_res_blocks: Any = 2
  num_heads: int = 4
  head_channels: int = -1
  dropout: float = 0.0
  norm_groups: int = 32
  time_embed_dim: int = 0            # 0: 4 * model_channels
  # conditioning
  low_res_size: int = 0              # > 0: cond['low_res'] is upsampled and concatenated
  aug_cond: bool = False             # cond['aug_t'] embedded and added to the time embedding
  inpaint: bool = False              # cond['inpaint_image'] * mask and the mask concatenated
  # With inpaint: cond['inpaint_image'] is taken as given (already masked, e.g. the latents of
  # the masked image) and the channels are [x, mask, inpaint_image], as SD's inpainting U-Net.
  inpaint_premasked: bool = False
  # Two input channels holding each pixel's y and x in [-1, 1] (CoordConv, Liu et al. 2018),
  # so that the layers know where a pixel is without reading it off the zero padding.
  coord_channels: bool = False
  text_source: str = 'none'          # 'none' | 'tokens' (frozen encoder) | 'transformer' (owned)
  text_len: int = 0
  text_dim: int = 0                  # width of cond['text_tokens']
  text_pool: str = 'none'            # 'none' | 'attention' (pool the tokens) | 'embed' (read
                                     # cond['text_embed'])
  text_embed_dim: int = 0            # width of cond['text_embed'] for text_pool='embed'
  text_attention: str = 'concat_kv'  # 'concat_kv' (GLIDE) | 'cross' (self- then cross-attention)
  # A learned embedding per token position added to the projected frozen-encoder tokens. A
  # randomly initialised T5 attends almost uniformly, so its outputs carry the words but not
  # their order, and the context is a bag of words in which "a red circle left of a blue
  # square" and "a blue circle left of a red square" are the same; a pretrained T5's tokens
  # carry their context and need none.
  text_position_embed: bool = False  # initialised at the tokens' scale (std 1)
  context_dim: int = 0               # width of the attention context; 0: the text width
  # False: the frozen encoder's tokens are the context as they are (Stable Diffusion), no
  # learned `text_proj`; the context width is then the text width.
  project_text: bool = True
  image_embed_dim: int = 0           # > 0: cond['image_embed'] (unCLIP decoder)
  image_embed_tokens: int = 4
  # GLIDE text transformer (text_source='transformer')
  vocab_size: int = 0
  xf_width: int = 0
  xf_layers: int = 0
  xf_heads: int = 0
  xf_padding: bool = True            # padding positions carry a learned embedding
  xf_final_ln: bool = True
  xf_exact_gelu: bool = False        # erf GELU (glide-text2im) instead of the tanh approximation
  # False: padding text tokens stay visible to every attention (glide-text2im's released
  # models, which mask nothing); True: they are masked out.
  text_mask_keys: bool = True
  # The time embedding embeds time_embed_scale * t + time_embed_shift: 1000 t by default;
  # glide-text2im's networks embed the integer step k = T t - 1 (scale T, shift -1).
  time_embed_scale: float = 1000.0
  time_embed_shift: float = 0.0
  # Options that released diffusers U-Nets (DeepFloyd IF, Karlo) use; off by default.
  act: str = 'silu'                  # nonlinearity of the res blocks, time MLPs and output
  emb_act: str = 'none'              # applied to the summed embedding before the blocks
  res_skip_time_act: bool = False    # res blocks project the embedding without `act` first
  res_output_scale: float = 1.0      # res blocks divide skip + residual by this
  mid_output_scale: float = 1.0      # ... the middle block's two res blocks by this
  context_norm_groups: int = 0       # > 0: attention layers group-norm the context first
  # How cond['low_res'] is upsampled: 'bilinear' (half-pixel centres) | 'bicubic' (Keys
  # a=-0.5, as torch's antialiased bicubic) | 'bilinear_align_corners' (torch's
  # align_corners=True).
  low_res_resize: str = 'bilinear'
  # True: cond['low_res'] arrives at x's size, upsampled (with `low_res_resize`) and noised
  # there by the conditioner, as DeepFloyd IF stage II's pipeline does.
  low_res_upsampled: bool = False
  text_pool_heads: int = 0           # heads of text_pool='attention_query_key'; 0: num_heads
  text_proj_norm: bool = False       # the projected frozen-encoder tokens are layer-normed
  # False: no learned null text; a dropped caption reads the frozen encoder's output for the
  # empty prompt, cond['null_text_tokens' / 'null_text_mask' / 'null_text_embed'] (written by
  # the conditioner), as DeepFloyd IF's and Karlo's pipelines guide.
  learned_null_text: bool = True
  # With learned_null_text: a dropped caption's frozen-encoder tokens become learned null
  # tokens, all visible (as DiT/PixArt here), instead of being masked out; for attention with
  # no learned null key of its own (attention_block='transformer') or unmasked keys.
  learned_null_tokens: bool = False
  # numerics and memory
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat_policy: str = 'none'
  scan_layers: bool = True
  cpu_kernels: bool = False          # the kernels XLA's CPU backend runs fastest (layers)

  @property
  def attention_impl(self) -> str:
    return layers.kernels(self.cpu_kernels)['attention_impl']

  @property
  def attention_query_chunk(self) -> int:
    return layers.kernels(self.cpu_kernels)['attention_query_chunk']

  @property
  def matmul_weight_grad_max_kernel(self) -> int:
    return layers.kernels(self.cpu_kernels)['matmul_weight_grad_max_kernel']

  @property
  def emb_dim(self) -> int:
    return self.time_embed_dim or 4 * self.model_channels

  @property
  def ctx_dim(self) -> int:
    if self.context_dim:
      return self.context_dim
    return self.xf_width if self.text_source == 'transformer' else self.text_dim

  def _kw(self):
    return dict(dtype=self.dtype, param_dtype=self.param_dtype)

  def _conv_kw(self):
    return dict(self._kw(), matmul_weight_grad_max_kernel=self.matmul_weight_grad_max_kernel)

  def check_input(self, x_BHWC, cond):
    """Inputs are image_size squares; an SR stage also takes its training crops
    (input.train_crop_size: Imagen's and unCLIP's last upsamplers train on crops), any sides
    that the levels halve evenly, with the low-res window of the same region."""
    name = type(self).__name__
    _, H, W, C = x_BHWC.shape
    unit = 2 ** (len(self.channel_mult) - 1)
    whole = H == W == self.image_size
    if C != self.in_channels or not (whole or (self.low_res_size and H % unit == W % unit == 0)):
      raise ValueError(f'{name} expects [B, {self.image_size}, {self.image_size}, '
                       f'{self.in_channels}] inputs (an SR stage also takes training crops '
                       f'with sides multiples of {unit}), got {x_BHWC.shape}')
    if self.coord_channels and not whole:
      raise ValueError(f'{name}: coord_channels place a pixel on the whole {self.image_size} px '
                       f'image, not on a {H}x{W} crop; train it on whole images '
                       '(input.train_crop_size=None)')
    if self.low_res_size and 'low_res' in cond:
      low_side = cond['low_res'].shape[1]
      if self.low_res_upsampled and low_side != H:
        raise ValueError(f'{name}: a {H}x{W} input needs its low-res input upsampled to {H} px '
                         f'(low_res_upsampled), got {low_side} px')
      if not self.low_res_upsampled and low_side * self.image_size != H * self.low_res_size:
        want = H * self.low_res_size // self.image_size
        raise ValueError(f'{name}: a {H}x{W} input needs a {want} px low-res input '
                         f'({self.low_res_size} -> {self.image_size} px), got {low_side} px')

  def prepare_input(self, x_BHWC, cond):
    """Concatenates the upsampled low-res image and the inpainting channels to x."""
    name = type(self).__name__
    B, H, W, _ = x_BHWC.shape
    parts = [x_BHWC]
    if self.low_res_size:
      low = layers.require(cond, 'low_res', name).astype(jnp.float32)
      parts.append(upsample_low_res(low, H, W, self.low_res_resize))
    if self.inpaint:
      mask = layers.require(cond, 'inpaint_mask', name).astype(jnp.float32)
      image = layers.require(cond, 'inpaint_image', name).astype(jnp.float32)
      parts.extend([mask, image] if self.inpaint_premasked else [image * mask, mask])
    if self.coord_channels:
      y_H, x_W = jnp.linspace(-1, 1, H), jnp.linspace(-1, 1, W)
      parts.append(jnp.broadcast_to(y_H[None, :, None, None], (B, H, W, 1)))
      parts.append(jnp.broadcast_to(x_W[None, None, :, None], (B, H, W, 1)))
    x = jnp.concatenate([p.astype(jnp.float32) for p in parts], axis=-1)
    return layers.constrain(x.astype(self.dtype), layers.IMAGE_AXES)

  def conditioning(self, t_B, cond, batch: int, deterministic: bool):
    """Returns (emb_BE, context_BLD or None, context_mask_BL or None)."""
    name, kw, E = type(self).__name__, self._kw(), self.emb_dim
    p_dtype = self.param_dtype
    emb = layers.TimeEmbedding(E, self.model_channels, self.time_embed_scale,
                               self.time_embed_shift, act=self.act, name='time_embed', **kw)(t_B)
    if self.aug_cond:  # the augmentation level, on the time's scale
      aug_t = layers.require(cond, 'aug_t', name)
      emb = emb + layers.TimeEmbedding(E, self.model_channels, self.time_embed_scale,
                                       self.time_embed_shift, act=self.act, name='aug_embed',
                                       **kw)(jnp.asarray(aug_t, jnp.float32).reshape(batch))
    drop_text = layers.drop_flag(cond, 'drop_text', batch)
    ctx, ctx_mask = None, None

    tokens = None
    if self.text_source == 'tokens':
      tokens = layers.require(cond, 'text_tokens', name)
      if self.learned_null_text and self.learned_null_tokens:
        L, D = tokens.shape[1:]
        null_LD = layers.learned(self, 'null_text_tokens', (self.text_len, D), (None, 'embed'),
                                 param_dtype=p_dtype, init=nn.initializers.normal(D ** -0.5))
        tokens = jnp.where(drop_text[:, None, None], null_LD[None, :L].astype(tokens.dtype),
                           tokens)
        mask = layers.require(cond, 'text_mask', name).astype(bool) | drop_text[:, None]
      elif self.learned_null_text:  # a dropped caption's tokens are all masked out
        if not self.text_mask_keys:
          raise ValueError(f'{name}: learned_null_text masks a dropped caption\'s tokens out, '
                           'but text_mask_keys=False keeps every token visible; set '
                           'learned_null_tokens=True (or learned_null_text=False)')
        mask = layers.require(cond, 'text_mask', name).astype(bool) & ~drop_text[:, None]
      elif 'drop_text' not in cond:
        mask = layers.require(cond, 'text_mask', name).astype(bool)
      else:  # ... or are the empty prompt's
        tokens = jnp.where(drop_text[:, None, None], layers.require(cond, 'null_text_tokens', name),
                           tokens)
        mask = jnp.where(drop_text[:, None], layers.require(cond, 'null_text_mask', name),
                         layers.require(cond, 'text_mask', name)).astype(bool)
      if self.project_text:
        ctx = layers.dense(self.ctx_dim, ('embed', 'mlp'), name='text_proj', **kw)(
            tokens.astype(self.dtype))
      elif tokens.shape[-1] != self.ctx_dim:
        raise ValueError(f'{name}: project_text=False takes the text tokens as the context, '
                         f'but they are {tokens.shape[-1]} wide and context_dim is '
                         f'{self.ctx_dim}; set context_dim to the text width')
      else:
        ctx = tokens.astype(self.dtype)
      if self.text_proj_norm:
        ctx = layers.layer_norm(name='text_proj_norm', **kw)(ctx)
      if self.text_position_embed:
        L = tokens.shape[1]
        if L > self.text_len:
          raise ValueError(f'{name}: {L} text tokens, but text_position_embed has '
                           f'text_len={self.text_len} positions; raise model.text_len')
        pos_LD = layers.learned(self, 'text_position_embed', (self.text_len, self.ctx_dim),
                                (None, 'embed'), param_dtype=p_dtype,
                                init=nn.initializers.normal(1.0))
        ctx = ctx + pos_LD[None, :L].astype(ctx.dtype)
      ctx_mask = mask
    elif self.text_source == 'transformer':
      ids = layers.require(cond, 'text_ids', name)
      # A dropped caption becomes the empty caption (all padding), GLIDE's null text.
      mask = layers.require(cond, 'text_mask', name).astype(bool) & ~drop_text[:, None]
      xf, final = TextTransformer(
          vocab_size=self.vocab_size, text_len=self.text_len, width=self.xf_width,
          num_layers=self.xf_layers, num_heads=self.xf_heads, dropout=0.0,
          mask_padding_keys=self.text_mask_keys, padding_embedding=self.xf_padding,
          final_ln=self.xf_final_ln, exact_gelu=self.xf_exact_gelu,
          deterministic=deterministic, scan_layers=self.scan_layers,
          remat_policy=self.remat_policy, name='text_transformer', **kw)(ids, mask)
      emb = emb + layers.dense(E, ('embed', 'mlp'), name='text_final_proj', **kw)(final)
      ctx = xf if self.ctx_dim == self.xf_width else layers.dense(
          self.ctx_dim, ('embed', 'mlp'), name='text_proj', **kw)(xf)
      ctx_mask = mask
    elif self.text_source != 'none':
      raise ValueError(f'text_source={self.text_source!r}: use none, tokens or transformer')

    if self.text_pool == 'attention':
      if ctx is None:
        raise ValueError("text_pool='attention' needs text_source='tokens' or 'transformer'")
      heads = layers.num_heads_for(self.ctx_dim, self.num_heads, -1)
      emb = emb + layers.AttentionPool(E, heads, name='text_pool', **kw)(ctx, ctx_mask)
    elif self.text_pool == 'attention_query_key':
      # DeepFloyd IF's pooling of the frozen encoder's own tokens (before text_proj): the
      # query is the mean token plus a learned offset and is itself the first key; no output
      # projection; layer norms before and after.
      if tokens is None:
        raise ValueError("text_pool='attention_query_key' needs text_source='tokens'")
      heads = layers.num_heads_for(tokens.shape[-1], self.text_pool_heads or self.num_heads, -1)
      pool_mask = ctx_mask if self.text_mask_keys else jnp.ones(tokens.shape[:2], bool)
      emb = emb + layers.AttentionPool(
          E, heads, query_as_key=True, out_proj=False, final_norm=True,
          query_init_std=tokens.shape[-1] ** -0.5, name='text_pool', **kw)(
              tokens.astype(self.dtype), pool_mask)
    elif self.text_pool == 'embed':
      text_embed = layers.require(cond, 'text_embed', name).astype(jnp.float32)
      if self.learned_null_text:
        null = layers.learned(self, 'null_text_embed', (self.text_embed_dim,), ('embed',),
                              param_dtype=p_dtype)[None]
      elif 'drop_text' in cond:
        null = layers.require(cond, 'null_text_embed', name)
      else:
        null = text_embed
      text_embed = jnp.where(drop_text[:, None], null.astype(jnp.float32), text_embed)
      emb = emb + layers.dense(E, ('embed', 'mlp'), name='text_embed_proj', **kw)(
          text_embed.astype(self.dtype))
    elif self.text_pool != 'none':
      raise ValueError(f'text_pool={self.text_pool!r}: use none, attention, '
                       'attention_query_key or embed')

    if self.image_embed_dim:
      image_embed = layers.require(cond, 'image_embed', name).astype(jnp.float32)
      drop_image = layers.drop_flag(cond, 'drop_image', batch)
      null = layers.learned(self, 'null_image_embed', (self.image_embed_dim,), ('embed',),
                            param_dtype=p_dtype)
      image_embed = jnp.where(drop_image[:, None], null[None].astype(jnp.float32),
                              image_embed).astype(self.dtype)
      emb = emb + layers.dense(E, ('embed', 'mlp'), name='image_embed_proj', **kw)(image_embed)
      n, D = self.image_embed_tokens, self.ctx_dim
      img_tokens = layers.dense(n * D, ('embed', 'mlp'), name='image_tokens_proj', **kw)(
          image_embed).reshape(batch, n, D)
      img_mask = jnp.ones((batch, n), bool)
      if ctx is None:
        ctx, ctx_mask = img_tokens, img_mask
      else:
        ctx = jnp.concatenate([ctx.astype(img_tokens.dtype), img_tokens], axis=1)
        ctx_mask = jnp.concatenate([ctx_mask, img_mask], axis=1)

    if ctx is not None:
      ctx = layers.constrain(ctx, layers.SEQ_AXES)
      if not self.text_mask_keys:
        ctx_mask = jnp.ones(ctx.shape[:2], bool)
    if self.emb_act != 'none':
      emb = layers.activation(self.emb_act)(emb)
    return emb, ctx, ctx_mask

  def output(self, h_BHWC, inference: bool = False):
    kw = self._kw()
    h = layers.activation(self.act)(layers.group_norm(
        h_BHWC.shape[-1], self.norm_groups, inference=inference, name='out_norm', **kw)(h_BHWC))
    out_ch = self.out_channels * (2 if self.learned_variance else 1)
    h = layers.conv(out_ch, 3, zero_init=True, name='out_conv', **kw)(h)
    return h.astype(jnp.float32)

  def blocks_per_level(self) -> tuple[int, ...]:
    n = self.num_res_blocks
    if isinstance(n, int):
      return (n,) * len(self.channel_mult)
    n = tuple(n)
    if len(n) != len(self.channel_mult):
      raise ValueError(f'num_res_blocks {n} must have one entry per channel_mult level')
    return n


class UNet(ConditionedUNetBase):
  """The ADM U-Net."""
  attention_resolutions: tuple[int, ...] = (32, 16, 8)
  mid_attention: bool = True
  use_scale_shift_norm: bool = True
  resblock_updown: bool = True
  ff_mult: int = 0                   # > 0: channel MLP after each attention ('cross' mode)
  # 'block': attention after every residual block at an attention resolution (ADM, GLIDE);
  # 'level': once per level, after its last residual block (imagen-pytorch's layer_attns).
  attention_per: str = 'block'
  # text_attention='cross': attention resolutions whose layers attend to the text only, with
  # no self-attention over the pixels (in the CPU demo's base, self-attention over 16x16
  # pixels with 8-channel heads was 30% of the train step).
  text_only_resolutions: tuple[int, ...] = ()
  # text_attention='concat_kv': attention resolutions (and the middle block) whose layers take
  # their keys/values from the context only (diffusers' only_cross_attention).
  context_only_resolutions: tuple[int, ...] = ()
  mid_context_only: bool = False
  # Non-empty: each level's attention head width (over head_channels) on the way down and on
  # the way up, indexed by level; the middle block takes the deepest down entry (diffusers'
  # per-level attention_head_dim, which its up blocks read in the reversed order).
  down_head_channels: tuple[int, ...] = ()
  up_head_channels: tuple[int, ...] = ()
  # 'adm': the attention layers above; 'transformer': Stable Diffusion's
  # (`layers.SpatialTransformer`: self-attention, cross-attention to the context as it is,
  # GEGLU MLP), which needs a context and ignores text_attention and ff_mult.
  attention_block: str = 'adm'
  transformer_depth: Any = 1         # blocks per transformer layer: one, or one per level
  linear_projection: bool = False    # the transformer projects in and out with Dense (SD 2.x)
  attention_upcast: bool = False     # the transformer attends in float32 (SD 2.x)

  def transformer_depth_of(self, level: int) -> int:
    depth = self.transformer_depth
    if isinstance(depth, int):
      return depth
    if len(depth) != len(self.channel_mult):
      raise ValueError(f'transformer_depth {tuple(depth)} must have one entry per level')
    return int(depth[level])

  @nn.compact
  def __call__(self, x_BHWC, t_B, cond, train: bool = False):
    kw = self._kw()
    B = x_BHWC.shape[0]
    self.check_input(x_BHWC, cond)
    if self.attention_per not in ('block', 'level'):
      raise ValueError(f"attention_per={self.attention_per!r}: use 'block' or 'level'")
    if self.text_only_resolutions and self.text_attention != 'cross':
      raise ValueError("text_only_resolutions needs text_attention='cross'")
    stray = sorted(set(self.text_only_resolutions) - set(self.attention_resolutions))
    if stray:
      raise ValueError(f'text_only_resolutions {stray} are not attention_resolutions '
                       f'{tuple(self.attention_resolutions)}')
    det = not train
    emb, ctx, ctx_mask = self.conditioning(t_B, cond, B, det)
    res_block = layers.maybe_remat(layers.ResBlock, self.remat_policy)
    attn_block = layers.maybe_remat(layers.ImageAttention, self.remat_policy)
    cross_block = layers.maybe_remat(layers.CrossAttention, self.remat_policy)
    transformer_block = layers.maybe_remat(layers.SpatialTransformer, self.remat_policy)
    if self.attention_block not in ('adm', 'transformer'):
      raise ValueError(f"attention_block={self.attention_block!r}: use 'adm' or 'transformer'")
    if self.attention_block == 'transformer' and ctx is None and (
        self.attention_resolutions or self.mid_attention):
      raise ValueError("attention_block='transformer' cross-attends to a context: set "
                       "text_source (or image_embed_dim)")
    if (self.attention_block == 'transformer' and self.text_source == 'tokens'
        and self.learned_null_text and not self.learned_null_tokens):
      raise ValueError("attention_block='transformer' has no learned null key to stand for a "
                       "dropped caption: set learned_null_tokens=True (or "
                       "learned_null_text=False)")
    if (self.context_only_resolutions or self.mid_context_only) and (
        self.text_attention != 'concat_kv' or ctx is None):
      raise ValueError("context_only_resolutions and mid_context_only need "
                       "text_attention='concat_kv' and a context")
    rb_kw = dict(dropout=self.dropout, use_scale_shift_norm=self.use_scale_shift_norm,
                 norm_groups=self.norm_groups, deterministic=det, act=self.act,
                 skip_time_act=self.res_skip_time_act, output_scale=self.res_output_scale,
                 **self._conv_kw())
    mid_kw = dict(rb_kw, output_scale=self.mid_output_scale)
    at_kw = dict(num_heads=self.num_heads, head_channels=self.head_channels,
                 norm_groups=self.norm_groups, attention_impl=self.attention_impl,
                 inference=det, **kw)
    self_at_kw = dict(at_kw, context_norm_groups=self.context_norm_groups)
    for field in ('down_head_channels', 'up_head_channels'):
      if getattr(self, field) and len(getattr(self, field)) != len(self.channel_mult):
        raise ValueError(f'{field} {getattr(self, field)} must have one entry per level')

    def attend(h, tag, level, up=False):
      widths = self.up_head_channels if up else self.down_head_channels
      width = dict(head_channels=widths[level]) if widths else {}  # this level's head width
      if self.attention_block == 'transformer':
        return transformer_block(
            **{**at_kw, **width}, depth=self.transformer_depth_of(level),
            linear_projection=self.linear_projection, upcast=self.attention_upcast,
            query_chunk=self.attention_query_chunk, name=f'{tag}_attn')(h, ctx, ctx_mask)
      if self.text_attention == 'cross' or ctx is None:
        if ctx is None or res not in self.text_only_resolutions:
          h = attn_block(**{**at_kw, **width}, query_chunk=self.attention_query_chunk,
                         name=f'{tag}_attn')(h)
        if ctx is not None:
          h = cross_block(**{**at_kw, **width}, name=f'{tag}_cross')(h, ctx, ctx_mask)
      else:
        context_only = (self.mid_context_only if tag == 'mid'
                        else res in self.context_only_resolutions)
        extra = dict(self_kv=False) if context_only else {}
        h = attn_block(**{**self_at_kw, **width}, **extra, query_chunk=self.attention_query_chunk,
                       name=f'{tag}_attn')(h, ctx, ctx_mask)
      if self.ff_mult:
        h = layers.FeedForward2d(self.ff_mult, self.norm_groups, inference=det,
                                 name=f'{tag}_ff', **kw)(h)
      return h

    def attends_after(i, n):
      return res in self.attention_resolutions and (self.attention_per == 'block' or i == n - 1)

    h = layers.conv(self.channel_mult[0] * self.model_channels, 3, name='in_conv', **kw)(
        self.prepare_input(x_BHWC, cond))
    hs, res = [h], self.image_size
    nblocks = self.blocks_per_level()
    for level, mult in enumerate(self.channel_mult):
      for i in range(nblocks[level]):
        h = res_block(mult * self.model_channels, **rb_kw, name=f'down{level}_res{i}')(h, emb)
        if attends_after(i, nblocks[level]):
          h = attend(h, f'down{level}_{i}', level)
        hs.append(h)
      if level != len(self.channel_mult) - 1:
        ch = mult * self.model_channels
        if self.resblock_updown:
          h = res_block(ch, **rb_kw, down=True, name=f'down{level}_downsample')(h, emb)
        else:
          h = layers.Downsample(ch, pad_both_sides=True, name=f'down{level}_downsample',
                                **self._conv_kw())(h)
        hs.append(h)
        res //= 2

    ch = self.channel_mult[-1] * self.model_channels
    h = res_block(ch, **mid_kw, name='mid_res0')(h, emb)
    if self.mid_attention:
      h = attend(h, 'mid', len(self.channel_mult) - 1)
    h = res_block(ch, **mid_kw, name='mid_res1')(h, emb)

    for level in reversed(range(len(self.channel_mult))):
      ch = self.channel_mult[level] * self.model_channels
      for i in range(nblocks[level] + 1):
        h = jnp.concatenate([h, hs.pop()], axis=-1)
        h = res_block(ch, **rb_kw, name=f'up{level}_res{i}')(h, emb)
        if attends_after(i, nblocks[level] + 1):
          h = attend(h, f'up{level}_{i}', level, up=True)
      if level:
        if self.resblock_updown:
          h = res_block(ch, **rb_kw, up=True, name=f'up{level}_upsample')(h, emb)
        else:
          h = layers.Upsample(ch, name=f'up{level}_upsample', **self._conv_kw())(h)
        res *= 2
    assert not hs, 'skip connections left over'
    return self.output(h, inference=det)


# Size presets: the architecture fields of each cascade's U-Nets, at paper size (as published)
# and at the test size; a stage config adds what the stage reads (image size, conditioning).
PRESETS = {
    'imagen_base64_tiny': dict(model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                               attention_resolutions=(8,), num_heads=2, head_channels=-1,
                               context_dim=32),
    # ADM-style base (Imagen App. F); T5 tokens join every attention layer's keys/values.
    'imagen_base64_paper': dict(model_channels=512, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
                                attention_resolutions=(32, 16, 8), num_heads=8,
                                head_channels=64, context_dim=512),
    'glide_tiny': dict(model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                       attention_resolutions=(8,), num_heads=2, head_channels=-1, dropout=0.0),
    # ADM at 64 px (GLIDE Sec. 4).
    'glide_base_paper': dict(model_channels=512, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
                             attention_resolutions=(32, 16, 8), num_heads=1, head_channels=64,
                             dropout=0.1),
    # Upsampler 64->256: ADM's 256 px layout, sized to the published 1.5B.
    'glide_up_paper': dict(model_channels=320, channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=3,
                           attention_resolutions=(32, 16, 8), num_heads=1, head_channels=64,
                           dropout=0.1),
    # unCLIP decoder (Table 3): 512 channels, depth 3, mults 1-2-3-4, 64-channel heads.
    'unclip_decoder_paper': dict(model_channels=512, channel_mult=(1, 2, 3, 4),
                                 num_res_blocks=3, attention_resolutions=(32, 16, 8),
                                 num_heads=1, head_channels=64, dropout=0.1),
    # unCLIP upsamplers: convolutions only (no attention, no text).
    'unclip_up_tiny': dict(model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                           dropout=0.0),
    'unclip_up256_paper': dict(model_channels=320, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
                               dropout=0.1),  # Table 3
    'unclip_up1024_paper': dict(model_channels=192, channel_mult=(1, 1, 2, 2, 4, 4),
                                num_res_blocks=2, dropout=0.0),  # Table 3
}
PRESETS['unclip_decoder_tiny'] = PRESETS['glide_tiny']
