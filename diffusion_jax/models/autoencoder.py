"""The KL autoencoder of latent diffusion (Rombach et al. 2022; diffusers' `AutoencoderKL`).

    module = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2)
    mean_BhwC, logvar_BhwC = module.apply({'params': p}, x_BHWC, method='encode')
    z_BhwC = sample_posterior(mean_BhwC, logvar_BhwC, rng)
    x_BHWC = module.apply({'params': p}, z_BhwC, method='decode')

The encoder halves the image at every level but the last (ResNet blocks, then a stride-2 conv
after padding the bottom and right by one pixel), a middle block (ResNet, single-head
self-attention, ResNet), then group norm, SiLU and a conv to the mean and log-variance of a
diagonal Gaussian posterior (a 1x1 `quant_conv` after it when `use_quant_conv`). The decoder
mirrors it (a 1x1 `post_quant_conv` first when `use_post_quant_conv`; `layers_per_block + 1`
ResNet blocks per level, nearest 2x upsampling and a conv). No block reads a time embedding,
and every group norm uses eps 1e-6.

`scaling_factor` and `shift_factor` (and the per-channel `latents_mean` / `latents_std` some
releases give) describe the latent space a diffusion model is trained on, z' = (z - shift) *
scale; they are stored here for the latent family and the network never applies them.

Images are [-1, 1] NHWC; outputs (means, log-variances, images) are float32 whatever `dtype`.
`train=True` selects flax's group norm, which differentiates faster on CPU (layers.GroupNorm).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import layers

Dtype = Any

NORM_EPS = 1e-6  # every group norm of the autoencoder
LOGVAR_RANGE = (-30.0, 20.0)  # the posterior's log-variance is clipped to this range


def _group_norm(groups: int, train: bool, dtype, param_dtype, name: str | None = None):
  """Group norm with eps 1e-6 (layers.group_norm fixes 1e-5); `scale`/`bias` either way."""
  if not train:
    return layers.GroupNorm(num_groups=groups, epsilon=NORM_EPS, dtype=dtype,
                            param_dtype=param_dtype, name=name)
  return nn.GroupNorm(num_groups=groups, epsilon=NORM_EPS, dtype=dtype, param_dtype=param_dtype,
                      scale_init=layers.boxed(layers.ones, ('norm',)),
                      bias_init=layers.boxed(layers.zeros, ('norm',)), name=name)


class VAEResBlock(nn.Module):
  """GN-SiLU-conv, GN-SiLU-conv plus the input (a 1x1 conv on it when channels change)."""
  out_channels: int
  norm_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  matmul_weight_grad_max_kernel: int = 0  # see layers.conv_nhwc

  @nn.compact
  def __call__(self, x_BHWC, train: bool = False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    conv_kw = dict(kw, matmul_weight_grad_max_kernel=self.matmul_weight_grad_max_kernel)
    C = self.out_channels
    h = nn.silu(_group_norm(self.norm_groups, train, name='GroupNorm_0', **kw)(x_BHWC))
    h = layers.conv(C, 3, name='Conv_0', **conv_kw)(h)
    h = nn.silu(_group_norm(self.norm_groups, train, name='GroupNorm_1', **kw)(h))
    h = layers.conv(C, 3, name='Conv_1', **conv_kw)(h)
    skip = x_BHWC if x_BHWC.shape[-1] == C else layers.conv(C, 1, name='Conv_2', **conv_kw)(
        x_BHWC)
    return layers.constrain(skip.astype(h.dtype) + h, layers.IMAGE_AXES)


class VAEAttention(nn.Module):
  """Single-head self-attention over the pixels after a group norm, added to the input."""
  norm_groups: int = 32
  query_chunk: int = 0  # layers.attention's
  attention_impl: str = 'jax'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC, train: bool = False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    B, H, W, C = x_BHWC.shape
    h_BLC = _group_norm(self.norm_groups, train, name='GroupNorm_0', **kw)(x_BHWC).reshape(
        B, H * W, C)
    proj = lambda name: layers.dense_general((1, C), ('embed', 'heads', 'kv'), name=name, **kw)
    q, k, v = (layers.constrain(proj(n)(h_BLC), layers.HEAD_AXES)
               for n in ('query', 'key', 'value'))
    out_BL1C = layers.attention(q, k, v, None, self.query_chunk, self.attention_impl)
    out_BLC = layers.dense_general(C, ('heads', 'kv', 'embed'), axis=(-2, -1), name='out',
                                   **kw)(out_BL1C)
    return layers.constrain(x_BHWC + out_BLC.reshape(B, H, W, C).astype(x_BHWC.dtype),
                            layers.IMAGE_AXES)


class _Body(nn.Module):
  """Fields and the middle block shared by the encoder and the decoder."""
  block_out_channels: tuple[int, ...] = (64,)
  layers_per_block: int = 1
  out_channels: int = 3
  norm_num_groups: int = 32
  mid_block_add_attention: bool = True
  cpu_kernels: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _kw(self):
    return dict(dtype=self.dtype, param_dtype=self.param_dtype)

  def _conv_kw(self):
    return dict(self._kw(), matmul_weight_grad_max_kernel=layers.kernels(self.cpu_kernels)[
        'matmul_weight_grad_max_kernel'])

  def _res(self, h, channels: int, name: str, train: bool):
    return VAEResBlock(channels, self.norm_num_groups, name=name, **self._conv_kw())(h, train)

  def _mid(self, h, train: bool):
    C = self.block_out_channels[-1]
    h = self._res(h, C, 'mid_res0', train)
    if self.mid_block_add_attention:
      k = layers.kernels(self.cpu_kernels)
      h = VAEAttention(self.norm_num_groups, k['attention_query_chunk'], k['attention_impl'],
                       name='mid_attn', **self._kw())(h, train)
    return self._res(h, C, 'mid_res1', train)

  def _out(self, h, channels: int, train: bool):
    h = nn.silu(_group_norm(self.norm_num_groups, train, name='norm_out', **self._kw())(h))
    return layers.conv(channels, 3, name='conv_out', **self._conv_kw())(h)


class Encoder(_Body):
  """x_BHWC -> [B, H / 2^(L-1), W / 2^(L-1), out_channels] (L levels)."""

  @nn.compact
  def __call__(self, x_BHWC, train: bool = False):
    boc = self.block_out_channels
    h = layers.conv(boc[0], 3, name='conv_in', **self._conv_kw())(x_BHWC.astype(self.dtype))
    for level, channels in enumerate(boc):
      for j in range(self.layers_per_block):
        h = self._res(h, channels, f'down{level}_res{j}', train)
      if level < len(boc) - 1:
        # Pad the bottom and right by one pixel, then a stride-2 3x3 conv without padding.
        h = layers.conv(channels, 3, 2, padding=((0, 1), (0, 1)), name=f'down{level}_downsample',
                        **self._conv_kw())(h)
    return self._out(self._mid(h, train), self.out_channels, train)


class Decoder(_Body):
  """z_BhwC -> [B, h 2^(L-1), w 2^(L-1), out_channels]; level l (0 = full size) has
  `layers_per_block + 1` ResNet blocks (`up{l}_res{j}`), the deepest level first."""

  @nn.compact
  def __call__(self, z_BhwC, train: bool = False):
    boc = self.block_out_channels
    h = layers.conv(boc[-1], 3, name='conv_in', **self._conv_kw())(z_BhwC.astype(self.dtype))
    h = self._mid(h, train)
    for level in reversed(range(len(boc))):
      for j in range(self.layers_per_block + 1):
        h = self._res(h, boc[level], f'up{level}_res{j}', train)
      if level > 0:
        h = layers.Upsample(boc[level], name=f'up{level}_upsample', **self._conv_kw())(h)
    return self._out(h, self.out_channels, train)


class AutoencoderKL(nn.Module):
  """diffusers' AutoencoderKL: `encode` to a diagonal Gaussian posterior, `decode` from latents;
  called directly, x -> (reconstruction, mean, logvar), decoding a posterior sample when
  `rng` is given and the mean otherwise."""
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  # The latent space (the latent family's; the network never applies them): z' = (z - shift)
  # * scale, or with per-channel statistics, (z - mean) * scale / std.
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  latents_mean: tuple[float, ...] | None = None
  latents_std: tuple[float, ...] | None = None
  sample_size: int = 512  # the image side it was trained at (diffusers' tiling default)
  force_upcast: bool = True  # diffusers runs it in float32 under a float16 pipeline
  cpu_kernels: bool = False  # the kernels XLA's CPU backend runs fastest (layers)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  def setup(self):
    for c in tuple(self.block_out_channels):
      if c % self.norm_num_groups:
        raise ValueError(f'AutoencoderKL: block_out_channels {tuple(self.block_out_channels)} '
                         f'are not all multiples of norm_num_groups={self.norm_num_groups}')
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    body = dict(block_out_channels=tuple(self.block_out_channels),
                layers_per_block=self.layers_per_block, norm_num_groups=self.norm_num_groups,
                mid_block_add_attention=self.mid_block_add_attention,
                cpu_kernels=self.cpu_kernels, **kw)
    self.encoder = Encoder(out_channels=2 * self.latent_channels, **body)
    self.decoder = Decoder(out_channels=self.out_channels, **body)
    if self.use_quant_conv:
      self.quant_conv = layers.conv(2 * self.latent_channels, 1, **kw)
    if self.use_post_quant_conv:
      self.post_quant_conv = layers.conv(self.latent_channels, 1, **kw)

  def _check(self, a, channels: int, what: str):
    if a.ndim != 4 or a.shape[-1] != channels:
      raise ValueError(f'AutoencoderKL.{what} expects [B, H, W, {channels}] (NHWC), got '
                       f'{a.shape}')

  def encode(self, x_BHWC, train: bool = False):
    """(mean_BhwC, logvar_BhwC), float32; logvar clipped to [-30, 20]."""
    self._check(x_BHWC, self.in_channels, 'encode')
    moments_BhwM = self.encoder(x_BHWC, train)
    if self.use_quant_conv:
      moments_BhwM = self.quant_conv(moments_BhwM)
    mean_BhwC, logvar_BhwC = jnp.split(moments_BhwM.astype(jnp.float32), 2, axis=-1)
    return mean_BhwC, jnp.clip(logvar_BhwC, *LOGVAR_RANGE)

  def decode(self, z_BhwC, train: bool = False):
    """The image, float32 [B, h 2^(L-1), w 2^(L-1), out_channels]."""
    self._check(z_BhwC, self.latent_channels, 'decode')
    z_BhwC = z_BhwC.astype(self.dtype)
    if self.use_post_quant_conv:
      z_BhwC = self.post_quant_conv(z_BhwC)
    return self.decoder(z_BhwC, train).astype(jnp.float32)

  def __call__(self, x_BHWC, rng=None, train: bool = False):
    mean_BhwC, logvar_BhwC = self.encode(x_BHWC, train)
    z_BhwC = mean_BhwC if rng is None else sample_posterior(mean_BhwC, logvar_BhwC, rng)
    return self.decode(z_BhwC, train), mean_BhwC, logvar_BhwC


def posterior_sample(mean_BhwC, logvar_BhwC, noise_BhwC):
  """z = mean + exp(logvar / 2) * noise for a given standard-normal draw, float32."""
  return (mean_BhwC.astype(jnp.float32) + jnp.exp(0.5 * logvar_BhwC.astype(jnp.float32))
          * noise_BhwC.astype(jnp.float32))


def sample_posterior(mean_BhwC, logvar_BhwC, rng):
  """z = mean + exp(logvar / 2) * noise, noise ~ N(0, 1) drawn with `rng`."""
  noise = jax.random.normal(rng, mean_BhwC.shape, jnp.float32)
  return posterior_sample(mean_BhwC, logvar_BhwC, noise)


class AutoencoderNet(AutoencoderKL):
  """`AutoencoderKL` as the trainer calls its networks (model name 'autoencoder'): called with
  (x, t_B, cond, train), it returns (reconstruction, mean, logvar), decoding
  mean + exp(logvar / 2) * cond['posterior_noise'] (the mean without it). Its parameters are
  AutoencoderKL's, so a trained stage encodes and decodes like a released autoencoder."""
  image_size: int = 256  # the side it trains at

  def latent_shape(self, image_shape) -> tuple[int, ...]:
    """[B, H, W, C] images -> the shape of their latents."""
    B, H, W, _ = image_shape
    f = self.downsample_factor
    return (B, H // f, W // f, self.latent_channels)

  def __call__(self, x_BHWC, t_B=None, cond=None, train: bool = False):
    del t_B  # no time
    mean_BhwC, logvar_BhwC = self.encode(x_BHWC, train)
    noise = (cond or {}).get('posterior_noise')
    z_BhwC = mean_BhwC if noise is None else posterior_sample(mean_BhwC, logvar_BhwC, noise)
    return self.decode(z_BhwC, train), mean_BhwC, logvar_BhwC


def example_inputs(model_cfg, batch_size: int):
  """Zero `(x, t_B, cond)` of an AutoencoderNet: images and the posterior noise."""
  get = lambda k, d: model_cfg.get(k, d) if hasattr(model_cfg, 'get') else getattr(
      model_cfg, k, d)
  size = get('image_size', AutoencoderNet.image_size)
  factor = 2 ** (len(tuple(get('block_out_channels', AutoencoderNet.block_out_channels))) - 1)
  latent = get('latent_channels', AutoencoderNet.latent_channels)
  x = jnp.zeros((batch_size, size, size, get('in_channels', 3)), jnp.float32)
  noise = jnp.zeros((batch_size, size // factor, size // factor, latent), jnp.float32)
  return x, jnp.zeros((batch_size,), jnp.float32), {'posterior_noise': noise}
