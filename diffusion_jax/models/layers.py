"""Building blocks shared by the denoising networks.

Every parameter is created through `nn.with_logical_partitioning` with the logical axis names
of `configs/common.py` (`embed`, `mlp`, `heads`, `kv`, `conv_in`, `conv_out`, `vocab`, `norm`),
and the main activations are constrained with `act_*` names, so that the config's rules alone
decide how a network is laid out on the ('data', 'fsdp', 'tensor') mesh. Outside a mesh and
rules context the constraints are no-ops.

Attention goes through `jax.nn.dot_product_attention` (or, where a config asks for it on
CPU, the same computation as two einsums) with boolean masks, in the layout
[batch, length, heads, head_dim].
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def require(cond: dict, key: str, who: str):
  """cond[key], or a KeyError naming the network that reads it."""
  if key not in cond:
    raise KeyError(f"{who} is configured to read cond[{key!r}], which is missing "
                   f"(cond has {sorted(cond)})")
  return cond[key]


def drop_flag(cond: dict, key: str, batch: int):
  """The CFG-dropout flag as a [B] bool (all False when absent)."""
  flag = cond.get(key)
  if flag is None:
    return jnp.zeros((batch,), bool)
  return jnp.asarray(flag).astype(bool).reshape(batch)


IMAGE_AXES = ('act_batch', 'act_height', 'act_width', 'act_channels')
SEQ_AXES = ('act_batch', 'act_len', 'act_embed')
HEAD_AXES = ('act_batch', 'act_len', 'act_heads', None)
MLP_AXES = ('act_batch', 'act_len', 'act_mlp')

_default_kernel_init = nn.initializers.lecun_normal()
zeros = nn.initializers.zeros
ones = nn.initializers.ones


def constrain(x, names):
  return nn.with_logical_constraint(x, names)


def boxed(init: Callable, names) -> Callable:
  return nn.with_logical_partitioning(init, tuple(names))


# ----------------------------------------------------------------------------------------
# remat policies

def remat_policy(name: str):
  """Maps a config name to a `jax.checkpoint` policy; 'full' saves nothing (recompute all)."""
  if name == 'full':
    return None
  policy = getattr(jax.checkpoint_policies, name, None)
  if policy is None:
    raise ValueError(f'unknown remat policy {name!r}: use none, full or a name in '
                     'jax.checkpoint_policies')
  return policy


def maybe_remat(module_cls, name: str | None, *, prevent_cse: bool = True):
  """Wraps a module class in `nn.remat` unless the policy name is 'none'."""
  if name in (None, '', 'none'):
    return module_cls
  return nn.remat(module_cls, policy=remat_policy(name), prevent_cse=prevent_cse)


# ----------------------------------------------------------------------------------------
# convolution with a per-tap matmul weight gradient

_NHWC_DIMS = ('NHWC', 'HWIO', 'NHWC')


def _conv_nhwc(x_BHWC, w_HWIO, strides, pads):
  return jax.lax.conv_general_dilated(x_BHWC, w_HWIO, strides, pads,
                                      dimension_numbers=_NHWC_DIMS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_tap_matmul_grad(x_BHWC, w_HWIO, strides, pads):
  return _conv_nhwc(x_BHWC, w_HWIO, strides, pads)


def _conv_tap_matmul_grad_fwd(x_BHWC, w_HWIO, strides, pads):
  return _conv_nhwc(x_BHWC, w_HWIO, strides, pads), (x_BHWC, w_HWIO)


def _conv_tap_matmul_grad_bwd(strides, pads, residuals, dy_BHWO):
  x_BHWC, w_HWIO = residuals
  # The conv is linear in x: its transpose gives XLA's input gradient without re-running the
  # forward pass (as jax.vjp would in the jaxpr that `flops` counts).
  (dx_BHWC,) = jax.linear_transpose(lambda x: _conv_nhwc(x, w_HWIO, strides, pads),
                                    x_BHWC)(dy_BHWO)
  kh, kw, C, O = w_HWIO.shape
  B, Ho, Wo, _ = dy_BHWO.shape
  (sh, sw), ((top, bottom), (left, right)) = strides, pads
  zero = jnp.zeros((), x_BHWC.dtype)
  x_pad = jax.lax.pad(x_BHWC, zero, ((0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0)))
  dy_NO = dy_BHWO.reshape(B * Ho * Wo, O)
  taps_OC = []
  for i in range(kh):
    for j in range(kw):
      # The input pixels that tap (i, j) multiplied, one row per output pixel.
      x_tap = jax.lax.slice(x_pad, (0, i, j, 0), (B, i + (Ho - 1) * sh + 1,
                                                   j + (Wo - 1) * sw + 1, C), (1, sh, sw, 1))
      taps_OC.append(jax.lax.dot_general(dy_NO, x_tap.reshape(B * Ho * Wo, C),
                                         (((0,), (0,)), ((), ())),
                                         preferred_element_type=jnp.float32))
  dw_HWIO = jnp.stack(taps_OC).reshape(kh, kw, O, C).transpose(0, 1, 3, 2)
  return dx_BHWC, dw_HWIO.astype(w_HWIO.dtype)


_conv_tap_matmul_grad.defvjp(_conv_tap_matmul_grad_fwd, _conv_tap_matmul_grad_bwd)


def conv_nhwc(x_BHWC, w_HWIO, strides=(1, 1), padding='VALID', *,
              matmul_weight_grad_max_kernel: int = 0):
  """An NHWC/HWIO convolution. A kernel no larger than `matmul_weight_grad_max_kernel` on
  each side takes its weight gradient as one matmul per kernel tap (the output gradient
  against the strided input pixels that tap read) instead of XLA's own weight-gradient
  convolution; the input gradient and the forward pass are XLA's either way.

  Why: XLA's CPU backend runs a weight gradient as a convolution whose contracted features
  are the batch, which for 1x1 and 2x2 kernels ran at a tenth of the machine's matmul speed
  (benchmarks/README.md); as matmuls over all batch and pixel positions they run near it.
  """
  pads = (jax.lax.padtype_to_pads(x_BHWC.shape[1:3], w_HWIO.shape[:2], strides, padding)
          if isinstance(padding, str) else padding)
  strides, pads = tuple(strides), tuple(tuple(p) for p in pads)
  if max(w_HWIO.shape[:2]) <= matmul_weight_grad_max_kernel:
    return _conv_tap_matmul_grad(x_BHWC, w_HWIO, strides, pads)
  return _conv_nhwc(x_BHWC, w_HWIO, strides, pads)


def _flax_conv_fn(matmul_weight_grad_max_kernel: int):
  """`nn.Conv(conv_general_dilated=...)` for `conv_nhwc` (plain convolutions only)."""

  def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                           rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                           batch_group_count=1, precision=None, preferred_element_type=None):
    plain = (all(d == 1 for d in (lhs_dilation or (1,))) and
             all(d == 1 for d in (rhs_dilation or (1,))) and feature_group_count == 1 and
             batch_group_count == 1 and precision is None and preferred_element_type is None and
             lhs.ndim == 4 and dimension_numbers == jax.lax.conv_dimension_numbers(
                 lhs.shape, rhs.shape, _NHWC_DIMS))
    if not plain:
      raise ValueError('matmul_weight_grad_max_kernel supports plain NHWC convolutions only '
                       '(no dilation, groups or precision): set it to 0')
    return conv_nhwc(lhs, rhs, window_strides, padding,
                     matmul_weight_grad_max_kernel=matmul_weight_grad_max_kernel)

  return conv_general_dilated


# ----------------------------------------------------------------------------------------
# parameterised primitives with logical names

def dense(features: int, axes=('embed', 'mlp'), *, zero_init: bool = False, use_bias: bool = True,
          dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, name: str | None = None):
  return nn.Dense(
      features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
      kernel_init=boxed(zeros if zero_init else _default_kernel_init, axes),
      bias_init=boxed(zeros, (axes[-1],)), name=name)


def dense_general(features, axes, *, axis=-1, zero_init: bool = False, use_bias: bool = True,
                  dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                  name: str | None = None):
  """A DenseGeneral whose kernel carries `axes` (inputs then outputs)."""
  n_in = len(axis) if isinstance(axis, tuple) else 1
  if isinstance(axis, tuple) and tuple(axis) != tuple(range(-n_in, 0)):
    raise ValueError(f'dense_general contracts trailing axes only, got axis={axis}')
  features = (features,) if isinstance(features, int) else tuple(features)
  return DenseND(features, tuple(axes), n_in, zero_init, dtype, param_dtype, use_bias, name=name)


class DenseND(nn.Module):
  """y = x . W contracting the last `n_in` axes of x; W has shape x.shape[-n_in:] + features.

  nn.DenseGeneral builds its kernel flat and reshapes the boxed value, which fails for 3-d
  logical names under a mesh context (`jax.set_mesh`); this builds the N-d kernel directly,
  initialised as DenseGeneral does (fans of the flattened kernel).
  """
  features: tuple[int, ...]
  axes: tuple[Any, ...]
  n_in: int = 1
  zero_init: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    in_shape = x.shape[x.ndim - self.n_in:]
    base = zeros if self.zero_init else _default_kernel_init

    def init(key, shape, dtype):
      flat = (math.prod(shape[:self.n_in]), math.prod(shape[self.n_in:]))
      return base(key, flat, dtype).reshape(shape)

    kernel = self.param('kernel', nn.with_logical_partitioning(init, self.axes),
                        in_shape + self.features, self.param_dtype)
    contract = (tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in)))
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))
    if not self.use_bias:
      return y
    bias = self.param('bias', nn.with_logical_partitioning(zeros, self.axes[self.n_in:]),
                      self.features, self.param_dtype).astype(self.dtype)
    return y + bias.reshape((1,) * (y.ndim - bias.ndim) + bias.shape)


def conv(features: int, kernel: int = 3, stride: int = 1, *, zero_init: bool = False,
         padding: Any = 'SAME', dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
         matmul_weight_grad_max_kernel: int = 0, name: str | None = None):
  """A conv (SAME by default) with logical names; see `conv_nhwc` for
  `matmul_weight_grad_max_kernel`."""
  extra = {}
  if kernel <= matmul_weight_grad_max_kernel:
    extra['conv_general_dilated'] = _flax_conv_fn(matmul_weight_grad_max_kernel)
  return nn.Conv(
      features, (kernel, kernel), strides=(stride, stride), padding=padding, dtype=dtype,
      param_dtype=param_dtype, **extra,
      kernel_init=boxed(zeros if zero_init else _default_kernel_init,
                        (None, None, 'conv_in', 'conv_out')),
      bias_init=boxed(zeros, ('conv_out',)), name=name)


class GroupNorm(nn.Module):
  """`nn.GroupNorm` over the channels (last axis) of [B, ..., C]: the same parameters
  (`scale`, `bias`, [C]), statistics (float32, E[x^2] - E[x]^2) and result.

  The sums are taken per channel first, then per group: reducing over all pixels with the
  channels contiguous vectorises on CPU, where reducing [B, pixels, G, C/G] groups of two or
  four channels (64-128 channels in 32 groups) ran several times slower: 9% off the matched
  U-Net's guided sampling call. Differentiated, XLA's CPU backend ran it slower than
  `nn.GroupNorm` (8% on the train step), so `group_norm` takes it for inference only (the
  networks called with `train=False`).
  """
  num_groups: int
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BXC):
    B, C, G = x_BXC.shape[0], x_BXC.shape[-1], self.num_groups
    if C % G:
      raise ValueError(f'GroupNorm: {C} channels are not a multiple of {G} groups')
    scale_C = self.param('scale', boxed(ones, ('norm',)), (C,), self.param_dtype)
    bias_C = self.param('bias', boxed(zeros, ('norm',)), (C,), self.param_dtype)
    x32 = x_BXC.astype(jnp.promote_types(x_BXC.dtype, jnp.float32))
    pixel_axes = tuple(range(1, x_BXC.ndim - 1))
    count = math.prod(x_BXC.shape[1:-1]) * (C // G)
    group_mean = lambda s_BC: jnp.sum(s_BC.reshape(B, G, C // G), -1) / count
    mean_BG = group_mean(jnp.sum(x32, pixel_axes))
    var_BG = jnp.maximum(group_mean(jnp.sum(x32 * x32, pixel_axes)) - mean_BG * mean_BG, 0.0)
    ones_X = (1,) * len(pixel_axes)
    per_channel = lambda v_BG: jnp.repeat(v_BG, C // G, axis=-1).reshape((B,) + ones_X + (C,))
    as_x = lambda p_C: p_C.astype(x32.dtype).reshape((1,) + ones_X + (C,))
    mult = per_channel(jax.lax.rsqrt(var_BG + self.epsilon)) * as_x(scale_C)
    y = (x32 - per_channel(mean_BG)) * mult + as_x(bias_C)
    return y.astype(self.dtype)


def group_norm(channels: int, groups: int = 32, *, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, inference: bool = False,
               epsilon: float = 1e-5, name: str | None = None):
  """nn.GroupNorm, or for `inference` (no gradients wanted) the same as `GroupNorm`; both
  auto-name as `GroupNorm_i` with the same parameters."""
  # gcd keeps tiny widths legal (e.g. 24 channels with 32 groups -> 8 groups).
  groups = math.gcd(groups, channels)
  if inference:
    return GroupNorm(num_groups=groups, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
                     name=name)
  return nn.GroupNorm(
      num_groups=groups, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
      scale_init=boxed(ones, ('norm',)), bias_init=boxed(zeros, ('norm',)), name=name)


def layer_norm(*, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               name: str | None = None):
  return nn.LayerNorm(epsilon=1e-5, dtype=dtype, param_dtype=param_dtype,
                      scale_init=boxed(ones, ('norm',)), bias_init=boxed(zeros, ('norm',)),
                      name=name)


def learned(module: nn.Module, name: str, shape, axes, init=None, param_dtype=jnp.float32):
  """A free parameter (null embeddings, queries, positions) with logical names."""
  init = nn.initializers.normal(0.02) if init is None else init
  return module.param(name, boxed(init, axes), tuple(shape), param_dtype)


# ----------------------------------------------------------------------------------------
# time / noise-level embedding

ACTIVATIONS = {'silu': nn.silu, 'gelu': functools.partial(nn.gelu, approximate=False)}


def activation(name: str) -> Callable:
  """A nonlinearity by name: 'silu' or 'gelu' (the exact, erf GELU)."""
  if name not in ACTIVATIONS:
    raise ValueError(f'activation {name!r}: use one of {", ".join(ACTIVATIONS)}')
  return ACTIVATIONS[name]


def sinusoidal_embedding(x_B: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """ADM's sinusoidal embedding ([cos, sin]) of a float vector, e.g. `1000 * t`."""
  half = dim // 2
  freqs_F = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args_BF = x_B.astype(jnp.float32)[:, None] * freqs_F[None, :]
  emb_BD = jnp.concatenate([jnp.cos(args_BF), jnp.sin(args_BF)], axis=-1)
  if dim % 2:
    emb_BD = jnp.pad(emb_BD, ((0, 0), (0, 1)))
  return emb_BD


class TimeEmbedding(nn.Module):
  """sin(1000 t) -> Dense -> SiLU -> Dense, as in ADM.

  `scale` and `shift` set the embedded number, scale * t + shift: glide-text2im's networks
  embed the integer step k = T t - 1 of a T-step schedule (scale T, shift -1).
  """
  features: int
  sin_dim: int
  scale: float = 1000.0
  shift: float = 0.0
  act: str = 'silu'  # the nonlinearity between the two Dense layers (`activation`)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t_B):
    steps_B = self.scale * t_B.astype(jnp.float32) + self.shift
    h = sinusoidal_embedding(steps_B, self.sin_dim).astype(self.dtype)
    h = dense(self.features, ('kv', 'embed'), dtype=self.dtype, param_dtype=self.param_dtype)(h)
    h = activation(self.act)(h)
    return dense(self.features, ('embed', 'mlp'), dtype=self.dtype,
                 param_dtype=self.param_dtype)(h)


# ----------------------------------------------------------------------------------------
# convolutional blocks

def _resample(x_BHWC, up: bool, down: bool):
  B, H, W, C = x_BHWC.shape
  if up:
    return jax.image.resize(x_BHWC, (B, 2 * H, 2 * W, C), 'nearest')
  if down:
    return nn.avg_pool(x_BHWC, (2, 2), strides=(2, 2))
  return x_BHWC


def resize_align_corners(x_BHWC, height: int, width: int):
  """Bilinear resize whose corner pixels stay on the corners (torch's align_corners=True)."""

  def along(x, axis, n_out):
    n_in = x.shape[axis]
    if n_in == 1 or n_out == 1:
      return jnp.take(x, jnp.zeros((n_out,), jnp.int32), axis=axis)
    pos = jnp.arange(n_out, dtype=jnp.float32) * ((n_in - 1) / (n_out - 1))
    lo = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, n_in - 2)
    frac = (pos - lo).reshape((1,) * axis + (-1,) + (1,) * (x.ndim - axis - 1))
    return jnp.take(x, lo, axis=axis) * (1 - frac) + jnp.take(x, lo + 1, axis=axis) * frac

  return along(along(x_BHWC, 1, height), 2, width)


class Downsample(nn.Module):
  """Halves the resolution: strided 3x3 conv (ADM) or average pooling.

  `pad_both_sides`: the conv pads one pixel on every side, as ADM (torch padding=1) does;
  SAME padding pads only the bottom and right of an even-sized input.
  """
  out_channels: int
  use_conv: bool = True
  pad_both_sides: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  matmul_weight_grad_max_kernel: int = 0  # see conv_nhwc

  @nn.compact
  def __call__(self, x_BHWC):
    if self.use_conv:
      padding = ((1, 1), (1, 1)) if self.pad_both_sides else 'SAME'
      return conv(self.out_channels, 3, 2, padding=padding, dtype=self.dtype,
                  param_dtype=self.param_dtype,
                  matmul_weight_grad_max_kernel=self.matmul_weight_grad_max_kernel)(x_BHWC)
    assert x_BHWC.shape[-1] == self.out_channels, 'pool downsampling cannot change channels'
    return nn.avg_pool(x_BHWC, (2, 2), strides=(2, 2))


# Nearest 2x upsampling then a 3x3 SAME conv, per output phase a (row or column parity): the
# two input taps each phase reads and which of the three kernel taps fall on each.
_PHASE_TAPS = (((1, 0, 0), (0, 1, 1)),
               ((1, 1, 0), (0, 0, 1)))


class UpsampledConv(nn.Module):
  """conv(nearest_upsample_2x(x)) computed at the input's resolution, with an ordinary conv's
  parameters (`kernel` [k, k, in, out], `bias`) and result.

  Upsampling copies each pixel to a 2x2 block, so every output pixel of a 3x3 conv reads only
  2x2 input pixels: one 2x2 conv with the four phases' kernels as outputs, interleaved
  (sub-pixel convolution), does 16 multiply-adds per input pixel where the conv on the
  upsampled map does 36. A 1x1 conv commutes with the upsampling (4x fewer).
  """
  features: int
  kernel_size: int = 3
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  matmul_weight_grad_max_kernel: int = 0  # see conv_nhwc: 2 takes in the 2x2 phase conv

  @nn.compact
  def __call__(self, x_BHWC):
    if self.kernel_size not in (1, 3):
      raise ValueError(f'UpsampledConv takes kernel_size 1 or 3, not {self.kernel_size}')
    B, H, W, C = x_BHWC.shape
    k, O = self.kernel_size, self.features
    kernel = self.param('kernel', boxed(_default_kernel_init, (None, None, 'conv_in', 'conv_out')),
                        (k, k, C, O), self.param_dtype).astype(self.dtype)
    bias = self.param('bias', boxed(zeros, ('conv_out',)), (O,), self.param_dtype)
    x_BHWC = x_BHWC.astype(self.dtype)
    grad_kw = dict(matmul_weight_grad_max_kernel=self.matmul_weight_grad_max_kernel)
    if k == 1:
      y_BHWO = conv_nhwc(x_BHWC, kernel, **grad_kw)
      y_BHWO = _resample(y_BHWO, up=True, down=False)
    else:
      taps_PTK = jnp.asarray(_PHASE_TAPS, self.dtype)
      # [2 (row tap), 2 (col tap), C, O, 2 (row phase), 2 (col phase)]: the phases minor,
      # so a conv_out sharding of O carries over to the merged output channels.
      phase_kernel = jnp.einsum('ayi,bxj,ijco->yxcoab', taps_PTK, taps_PTK, kernel)
      x_pad = jnp.pad(x_BHWC, ((0, 0), (1, 1), (1, 1), (0, 0)))
      out = conv_nhwc(x_pad, phase_kernel.reshape(2, 2, C, O * 4), **grad_kw)
      out = out.reshape(B, H + 1, W + 1, O, 2, 2)
      # Phase (a, b) of input pixel (i, j) is output pixel (2i + a, 2j + b); its window
      # starts a rows and b columns further into the padded input.
      rows = [jnp.stack([out[:, a:a + H, b:b + W, :, a, b] for b in (0, 1)], axis=3)
              for a in (0, 1)]
      y_BHWO = jnp.stack(rows, axis=2).reshape(B, 2 * H, 2 * W, O)
    return y_BHWO + bias.astype(self.dtype).reshape(1, 1, 1, O)


class Upsample(nn.Module):
  """Doubles the resolution: nearest neighbour, then a 3x3 conv (one `UpsampledConv`)."""
  out_channels: int
  use_conv: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  matmul_weight_grad_max_kernel: int = 0  # see conv_nhwc

  @nn.compact
  def __call__(self, x_BHWC):
    if self.use_conv:
      return UpsampledConv(self.out_channels, 3, dtype=self.dtype, param_dtype=self.param_dtype,
                           matmul_weight_grad_max_kernel=self.matmul_weight_grad_max_kernel,
                           name='Conv_0')(x_BHWC)
    return _resample(x_BHWC, up=True, down=False)


class ResBlock(nn.Module):
  """ADM residual block: GN-SiLU-conv, embedding as scale-shift (AdaGN), GN-SiLU-drop-conv.

  `up`/`down` make it a BigGAN resampling block (resample inside the block, on both paths).
  The last conv starts at zero, so a fresh block is the identity on its skip path.
  """
  out_channels: int
  dropout: float = 0.0
  use_scale_shift_norm: bool = True
  up: bool = False
  down: bool = False
  norm_groups: int = 32
  deterministic: bool = True
  act: str = 'silu'             # the block's nonlinearity (`activation`)
  skip_time_act: bool = False   # the embedding enters its projection without the nonlinearity
  output_scale: float = 1.0     # the sum of skip and residual is divided by this
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  matmul_weight_grad_max_kernel: int = 0  # see conv_nhwc

  @nn.compact
  def __call__(self, x_BHWC, emb_BE):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    conv_kw = dict(kw, matmul_weight_grad_max_kernel=self.matmul_weight_grad_max_kernel)
    C_in, C = x_BHWC.shape[-1], self.out_channels
    gn_kw = dict(kw, inference=self.deterministic)
    act = activation(self.act)
    h = act(group_norm(C_in, self.norm_groups, **gn_kw)(x_BHWC))
    # The convs are named as flax would number them (checkpoints, converted weights).
    if self.up:
      h = UpsampledConv(C, 3, name='Conv_0', **conv_kw)(h)
    else:
      h = conv(C, 3, name='Conv_0', **conv_kw)(_resample(h, False, self.down))
    emb = dense(2 * C if self.use_scale_shift_norm else C, ('embed', 'conv_out'), **kw)(
        emb_BE if self.skip_time_act else act(emb_BE))
    emb_B11X = emb.reshape(emb.shape[0], 1, 1, emb.shape[-1])
    if self.use_scale_shift_norm:
      scale, shift = jnp.split(emb_B11X, 2, axis=-1)
      h = group_norm(C, self.norm_groups, **gn_kw)(h) * (1 + scale) + shift
    else:
      h = group_norm(C, self.norm_groups, **gn_kw)(h + emb_B11X)
    h = nn.Dropout(self.dropout, deterministic=self.deterministic)(act(h))
    h = conv(C, 3, zero_init=True, name='Conv_1', **conv_kw)(h)
    if C_in == C:
      skip = _resample(x_BHWC, self.up, self.down)
    elif self.up:
      skip = UpsampledConv(C, 1, name='Conv_2', **conv_kw)(x_BHWC)
    else:
      skip = conv(C, 1, name='Conv_2', **conv_kw)(_resample(x_BHWC, False, self.down))
    out = skip + h
    if self.output_scale != 1.0:
      out = out / self.output_scale
    return constrain(out, IMAGE_AXES)


# ----------------------------------------------------------------------------------------
# attention

def num_heads_for(channels: int, num_heads: int, head_channels: int) -> int:
  if head_channels and head_channels > 0:
    if channels % head_channels:
      raise ValueError(f'{channels} channels are not a multiple of head_channels={head_channels}')
    return channels // head_channels
  if channels % num_heads:
    raise ValueError(f'{channels} channels are not a multiple of num_heads={num_heads}')
  return num_heads


ATTENTION_IMPLS = ('jax', 'einsum')


def _einsum_attention(q_BTNH, k_BSNH, v_BSNH, mask=None):
  """softmax(q k^T / sqrt(head_dim)) v as two einsums, float32 scores, masked keys as
  `jax.nn.dot_product_attention` masks them (a fully masked row averages every value)."""
  scale = 1.0 / math.sqrt(q_BTNH.shape[-1])
  logits_BNTS = jnp.einsum('btnh,bsnh->bnts', q_BTNH, k_BSNH,
                           preferred_element_type=jnp.float32) * scale
  if mask is not None:
    logits_BNTS = jnp.where(mask, logits_BNTS, -0.7 * jnp.finfo(jnp.float32).max)
  probs_BNTS = jax.nn.softmax(logits_BNTS, axis=-1).astype(v_BSNH.dtype)
  return jnp.einsum('bnts,bsnh->btnh', probs_BNTS, v_BSNH)


# The CPU kernels, behind one switch (a network's `cpu_kernels`): XLA's CPU backend runs
# attention as two einsums, self-attention over many pixels in query chunks, and the weight
# gradients of 1x1 and 2x2 convs as per-tap matmuls faster than its defaults
# (benchmarks/README.md); accelerators keep XLA's and the library's fused kernels.
CPU_KERNELS = {'attention_impl': 'einsum', 'attention_query_chunk': 256,
               'matmul_weight_grad_max_kernel': 2}
DEFAULT_KERNELS = {'attention_impl': 'jax', 'attention_query_chunk': 0,
                   'matmul_weight_grad_max_kernel': 0}


def kernels(cpu_kernels: bool) -> dict:
  return dict(CPU_KERNELS if cpu_kernels else DEFAULT_KERNELS)


def attention(q_BTNH, k_BSNH, v_BSNH, mask=None, query_chunk: int = 0, impl: str = 'jax'):
  """Scaled dot-product attention; `mask` is boolean, broadcastable to [B, N, T, S].

  `impl` 'jax': `jax.nn.dot_product_attention` (the fused kernels of accelerators); 'einsum':
  the same computation written out (`_einsum_attention`), which XLA's CPU backend ran 1.3-2x
  faster with gradients (benchmarks/README.md).

  `query_chunk` > 0 with more queries than that (and a key mask, [B, 1, 1, S], or none):
  the queries go through in chunks of `query_chunk` (`lax.map`), so only one chunk's scores
  [B, N, chunk, S] exist at a time. The result is the same. On a 2-core CPU, 1024 pixels
  attending to each other in chunks of 256 ran 1.6x faster forward, 1.4x with gradients.
  """
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f'attention impl {impl!r}: use one of {ATTENTION_IMPLS}')
  attend = jax.nn.dot_product_attention if impl == 'jax' else _einsum_attention
  dtype = q_BTNH.dtype
  k_BSNH, v_BSNH = k_BSNH.astype(dtype), v_BSNH.astype(dtype)
  B, T, N, H = q_BTNH.shape
  if (query_chunk <= 0 or T <= query_chunk or T % query_chunk
      or (mask is not None and mask.shape[-2] != 1)):
    return attend(q_BTNH, k_BSNH, v_BSNH, mask=mask)
  chunks_CBTNH = q_BTNH.reshape(B, T // query_chunk, query_chunk, N, H).swapaxes(0, 1)
  out_CBTNH = jax.lax.map(lambda q: attend(q, k_BSNH, v_BSNH, mask=mask), chunks_CBTNH)
  return out_CBTNH.swapaxes(0, 1).reshape(B, T, N, H)


def key_mask(valid_BS):
  """[B, S] boolean -> [B, 1, 1, S] attention mask."""
  return valid_BS[:, None, None, :]


class ImageAttention(nn.Module):
  """Self-attention over the pixels of a feature map (ADM AttentionBlock).

  With `context` (GLIDE), each layer projects the text tokens to its own keys/values and the
  pixels attend to [text tokens; pixels]; masked padding tokens are never attended to.
  `self_kv=False`: the pixels attend to the context tokens only (no pixel keys/values).
  `context_norm_groups` > 0: the context is group-normed in that many groups (over its channels
  and tokens) first.
  """
  num_heads: int = 1
  head_channels: int = -1
  norm_groups: int = 32
  self_kv: bool = True
  context_norm_groups: int = 0
  query_chunk: int = 0  # > 0: pixels attend in chunks of this many (`attention`)
  attention_impl: str = 'jax'  # `attention`'s impl
  inference: bool = False  # no gradients wanted: `group_norm`'s inference form
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC, context_BLD=None, context_mask_BL=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    B, H, W, C = x_BHWC.shape
    N = num_heads_for(C, self.num_heads, self.head_channels)
    h = group_norm(C, self.norm_groups, inference=self.inference, **kw)(x_BHWC).reshape(
        B, H * W, C)
    proj = lambda name: dense_general((N, C // N), ('embed', 'heads', 'kv'), name=name, **kw)
    if not self.self_kv and context_BLD is None:
      raise ValueError('ImageAttention(self_kv=False) attends to a context only: pass one')
    q = constrain(proj('query')(h), HEAD_AXES)
    if self.self_kv:
      k, v = (constrain(proj(n)(h), HEAD_AXES) for n in ('key', 'value'))
    mask = None
    if context_BLD is not None:
      if self.context_norm_groups:
        context_BLD = group_norm(context_BLD.shape[-1], self.context_norm_groups,
                                 inference=self.inference, name='context_norm', **kw)(context_BLD)
      ctx = lambda name: dense_general((N, C // N), ('embed', 'heads', 'kv'), name=name, **kw)
      ctx_k, ctx_v = ctx('context_key')(context_BLD), ctx('context_value')(context_BLD)
      valid_BS = context_mask_BL.astype(bool)
      if self.self_kv:
        ctx_k, ctx_v = ctx_k.astype(k.dtype), ctx_v.astype(v.dtype)
        k, v = jnp.concatenate([ctx_k, k], axis=1), jnp.concatenate([ctx_v, v], axis=1)
        valid_BS = jnp.concatenate([valid_BS, jnp.ones((B, H * W), bool)], axis=1)
      else:
        k, v = ctx_k.astype(q.dtype), ctx_v.astype(q.dtype)
      mask = key_mask(valid_BS)
    out = attention(q, k, v, mask, self.query_chunk, self.attention_impl)
    out = dense_general(C, ('heads', 'kv', 'embed'), axis=(-2, -1), zero_init=True, name='out',
                        **kw)(out)
    return constrain(x_BHWC + out.reshape(B, H, W, C).astype(x_BHWC.dtype), IMAGE_AXES)


class CrossAttention(nn.Module):
  """Pixels (or tokens) attend to text tokens only (Imagen).

  A learned null key/value is always visible, so a fully masked (dropped) caption leaves a
  well-defined, learned output instead of an average over padding.
  """
  num_heads: int = 1
  head_channels: int = -1
  norm_groups: int = 32
  attention_impl: str = 'jax'  # `attention`'s impl
  inference: bool = False  # no gradients wanted: `group_norm`'s inference form
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC, context_BLD, context_mask_BL):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    B, H, W, C = x_BHWC.shape
    N = num_heads_for(C, self.num_heads, self.head_channels)
    h = group_norm(C, self.norm_groups, inference=self.inference, **kw)(x_BHWC).reshape(
        B, H * W, C)
    ctx = layer_norm(**kw)(context_BLD)
    q = constrain(dense_general((N, C // N), ('embed', 'heads', 'kv'), name='query', **kw)(h),
                  HEAD_AXES)
    k = dense_general((N, C // N), ('embed', 'heads', 'kv'), name='key', **kw)(ctx)
    v = dense_general((N, C // N), ('embed', 'heads', 'kv'), name='value', **kw)(ctx)
    null_kv = learned(self, 'null_kv', (2, N, C // N), (None, 'heads', 'kv'),
                      param_dtype=self.param_dtype).astype(k.dtype)
    k = jnp.concatenate([jnp.broadcast_to(null_kv[0][None, None], (B, 1, N, C // N)), k], 1)
    v = jnp.concatenate([jnp.broadcast_to(null_kv[1][None, None], (B, 1, N, C // N)), v], 1)
    valid_BS = jnp.concatenate([jnp.ones((B, 1), bool), context_mask_BL.astype(bool)], axis=1)
    out = attention(q, k, v, key_mask(valid_BS), impl=self.attention_impl)
    out = dense_general(C, ('heads', 'kv', 'embed'), axis=(-2, -1), zero_init=True, name='out',
                        **kw)(out)
    return constrain(x_BHWC + out.reshape(B, H, W, C).astype(x_BHWC.dtype), IMAGE_AXES)


class FeedForward2d(nn.Module):
  """Channel MLP on a feature map (the FF half of Imagen's transformer blocks)."""
  mult: int = 2
  norm_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  inference: bool = False  # no gradients wanted: `group_norm`'s inference form

  @nn.compact
  def __call__(self, x_BHWC):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    C = x_BHWC.shape[-1]
    h = group_norm(C, self.norm_groups, inference=self.inference, **kw)(x_BHWC)
    h = nn.gelu(dense(self.mult * C, ('embed', 'mlp'), **kw)(h))
    h = dense(C, ('mlp', 'embed'), zero_init=True, **kw)(h)
    return constrain(x_BHWC + h.astype(x_BHWC.dtype), IMAGE_AXES)


class HeadAttention(nn.Module):
  """Multi-head attention of queries [B, T, C] to keys/values [B, S, D] (themselves for
  self-attention): query/key/value projections without bias, an output projection with one.
  `upcast`: scores, softmax and weighted sum in float32 whatever the dtype."""
  num_heads: int
  head_channels: int
  upcast: bool = False
  query_chunk: int = 0  # > 0: queries attend in chunks of this many (`attention`)
  attention_impl: str = 'jax'  # `attention`'s impl
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BTC, kv_BSD, mask=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    N, K = self.num_heads, self.head_channels
    proj = lambda name: dense_general((N, K), ('embed', 'heads', 'kv'), use_bias=False,
                                      name=name, **kw)
    q = constrain(proj('query')(x_BTC), HEAD_AXES)
    k, v = proj('key')(kv_BSD), proj('value')(kv_BSD)
    if self.upcast:
      q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
    out = attention(q, k, v, mask, self.query_chunk, self.attention_impl).astype(self.dtype)
    return dense_general(x_BTC.shape[-1], ('heads', 'kv', 'embed'), axis=(-2, -1), name='out',
                         **kw)(out)


class SpatialTransformerBlock(nn.Module):
  """Pre-LN block over pixel tokens: self-attention, cross-attention to the context, and a
  GEGLU MLP (value * GELU(gate), exact GELU), each added to its input."""
  num_heads: int
  head_channels: int
  ff_mult: int = 4
  upcast: bool = False
  query_chunk: int = 0
  attention_impl: str = 'jax'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BLC, context_BSD, context_mask_BS=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn_kw = dict(kw, num_heads=self.num_heads, head_channels=self.head_channels,
                   upcast=self.upcast, attention_impl=self.attention_impl)
    C = x_BLC.shape[-1]
    h = layer_norm(name='self_attn_norm', **kw)(x_BLC)
    x_BLC = x_BLC + HeadAttention(query_chunk=self.query_chunk, name='self_attn', **attn_kw)(h, h)
    h = layer_norm(name='cross_attn_norm', **kw)(x_BLC)
    mask = None if context_mask_BS is None else key_mask(context_mask_BS.astype(bool))
    x_BLC = x_BLC + HeadAttention(name='cross_attn', **attn_kw)(h, context_BSD.astype(h.dtype),
                                                                 mask)
    h = layer_norm(name='ff_norm', **kw)(x_BLC)
    value, gate = jnp.split(dense(2 * self.ff_mult * C, ('embed', 'mlp'), name='ff_in', **kw)(h),
                            2, axis=-1)
    h = constrain(value * nn.gelu(gate, approximate=False), MLP_AXES)
    x_BLC = x_BLC + dense(C, ('mlp', 'embed'), name='ff_out', **kw)(h)
    return constrain(x_BLC, SEQ_AXES)


class SpatialTransformer(nn.Module):
  """Stable Diffusion's attention layer (diffusers' Transformer2DModel): group norm (eps
  1e-6), a projection in (1x1 conv, or Dense with `linear_projection`), `depth`
  `SpatialTransformerBlock`s over the pixels, a projection out (zero-initialised), added to
  the input. The context enters each block's cross-attention as it is (no projection of its
  own); `context_mask_BL` masks context tokens out."""
  num_heads: int = 1
  head_channels: int = -1
  depth: int = 1
  norm_groups: int = 32
  linear_projection: bool = False
  ff_mult: int = 4
  upcast: bool = False  # attention in float32 (diffusers' upcast_attention)
  query_chunk: int = 0  # > 0: pixels self-attend in chunks of this many (`attention`)
  attention_impl: str = 'jax'  # `attention`'s impl
  inference: bool = False  # no gradients wanted: `group_norm`'s inference form
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC, context_BSD, context_mask_BS=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    B, H, W, C = x_BHWC.shape
    N = num_heads_for(C, self.num_heads, self.head_channels)
    h = group_norm(C, self.norm_groups, inference=self.inference, epsilon=1e-6, name='norm',
                   **kw)(x_BHWC)
    if self.linear_projection:
      h = dense(C, ('embed', 'mlp'), name='proj_in', **kw)(h.reshape(B, H * W, C))
    else:
      h = conv(C, 1, name='proj_in', **kw)(h).reshape(B, H * W, C)
    h = constrain(h, SEQ_AXES)
    for i in range(self.depth):
      h = SpatialTransformerBlock(N, C // N, ff_mult=self.ff_mult, upcast=self.upcast,
                                  query_chunk=self.query_chunk,
                                  attention_impl=self.attention_impl, name=f'block{i}', **kw)(
                                      h, context_BSD, context_mask_BS)
    if self.linear_projection:
      h = dense(C, ('mlp', 'embed'), zero_init=True, name='proj_out', **kw)(h).reshape(
          B, H, W, C)
    else:
      h = conv(C, 1, zero_init=True, name='proj_out', **kw)(h.reshape(B, H, W, C))
    return constrain(x_BHWC + h.astype(x_BHWC.dtype), IMAGE_AXES)


class AttentionPool(nn.Module):
  """Imagen's attention pooling of text tokens into one vector.

  The query is the masked mean token plus a learned offset; keys/values are
  [learned null; tokens], so a dropped caption pools to a learned vector.

  `query_as_key` (DeepFloyd IF's pooling): the query token itself is the first key/value in
  place of the learned null; `out_proj=False` drops the heads' output projection;
  `final_norm` layer-norms the result.
  """
  features: int
  num_heads: int = 8
  query_as_key: bool = False
  out_proj: bool = True
  final_norm: bool = False
  query_init_std: float = 0.02
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens_BLD, mask_BL):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    B, L, D = tokens_BLD.shape
    N = num_heads_for(D, self.num_heads, -1)
    x = layer_norm(**kw)(tokens_BLD)
    m_BL1 = mask_BL.astype(x.dtype)[:, :, None]
    mean_BD = (x * m_BL1).sum(1) / jnp.maximum(m_BL1.sum(1), 1.0)
    query_D = learned(self, 'query', (D,), ('embed',), param_dtype=self.param_dtype,
                      init=nn.initializers.normal(self.query_init_std))
    query_B1D = (mean_BD + query_D.astype(x.dtype)[None, :])[:, None]
    if self.query_as_key:
      first_B1D = query_B1D
    else:
      first_B1D = jnp.broadcast_to(
          learned(self, 'null', (D,), ('embed',), param_dtype=self.param_dtype).astype(x.dtype),
          (B, 1, D))
    kv = jnp.concatenate([first_B1D, x], axis=1)
    proj = lambda name: dense_general((N, D // N), ('embed', 'heads', 'kv'), name=name, **kw)
    valid = jnp.concatenate([jnp.ones((B, 1), bool), mask_BL.astype(bool)], axis=1)
    out = attention(proj('query_proj')(query_B1D), proj('key')(kv), proj('value')(kv),
                    key_mask(valid))
    if self.out_proj:
      out = dense_general(D, ('heads', 'kv', 'embed'), axis=(-2, -1), name='out', **kw)(out)
    else:
      out = out.reshape(B, 1, D)
    out = dense(self.features, ('embed', 'mlp'), **kw)(out[:, 0])
    return layer_norm(**kw)(out) if self.final_norm else out


# ----------------------------------------------------------------------------------------
# transformer stacks (text transformer, prior)

class TransformerBlock(nn.Module):
  """Pre-LN transformer block; returns (x, None) so that `nn.scan` can stack it."""
  width: int
  num_heads: int
  mlp_ratio: int = 4
  dropout: float = 0.0
  exact_gelu: bool = False  # erf GELU (torch's nn.GELU) instead of the tanh approximation
  deterministic: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BLW, mask):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    N, W = self.num_heads, self.width
    x_BLW = constrain(x_BLW, SEQ_AXES)
    h = layer_norm(**kw)(x_BLW)
    proj = lambda name: dense_general((N, W // N), ('embed', 'heads', 'kv'), name=name, **kw)
    q, k, v = (constrain(proj(n)(h), HEAD_AXES) for n in ('query', 'key', 'value'))
    h = attention(q, k, v, mask)
    h = dense_general(W, ('heads', 'kv', 'embed'), axis=(-2, -1), name='out', **kw)(h)
    x_BLW = x_BLW + nn.Dropout(self.dropout, deterministic=self.deterministic)(h)
    h = layer_norm(**kw)(x_BLW)
    h = nn.gelu(dense(self.mlp_ratio * W, ('embed', 'mlp'), **kw)(h),
                approximate=not self.exact_gelu)
    h = dense(W, ('mlp', 'embed'), **kw)(constrain(h, MLP_AXES))
    x_BLW = x_BLW + nn.Dropout(self.dropout, deterministic=self.deterministic)(h)
    return constrain(x_BLW, SEQ_AXES), None


class TransformerStack(nn.Module):
  """`num_layers` TransformerBlocks, scanned (params stacked on a 'layers' axis) or unrolled.

  Scanned params live under `layers` with a leading layer axis; unrolled ones under
  `layers_0`, `layers_1`, ... (`stack_layer_params` converts).
  """
  num_layers: int
  width: int
  num_heads: int
  mlp_ratio: int = 4
  dropout: float = 0.0
  exact_gelu: bool = False
  deterministic: bool = True
  scan_layers: bool = True
  remat_policy: str = 'none'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BLW, mask):
    block_kw = dict(width=self.width, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                    dropout=self.dropout, exact_gelu=self.exact_gelu,
                    deterministic=self.deterministic, dtype=self.dtype,
                    param_dtype=self.param_dtype)
    block = maybe_remat(TransformerBlock, self.remat_policy, prevent_cse=not self.scan_layers)
    if self.scan_layers:
      stack = nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True,
                                                                       'dropout': True},
                      in_axes=(nn.broadcast,), length=self.num_layers,
                      metadata_params={nn.PARTITION_NAME: 'layers'})
      x_BLW, _ = stack(**block_kw, name='layers')(x_BLW, mask)
    else:
      for i in range(self.num_layers):
        x_BLW, _ = block(**block_kw, name=f'layers_{i}')(x_BLW, mask)
    return x_BLW


def stack_layer_params(tree, num_layers: int):
  """Converts unrolled `layers_i` subtrees (anywhere in a param tree) to the scanned layout."""
  if not isinstance(tree, dict):
    return tree
  if 'layers_0' in tree:
    rest = {k: v for k, v in tree.items() if not k.startswith('layers_')}
    per_layer = [tree[f'layers_{i}'] for i in range(num_layers)]
    rest['layers'] = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
    return {k: stack_layer_params(v, num_layers) if k != 'layers' else v for k, v in rest.items()}
  return {k: stack_layer_params(v, num_layers) for k, v in tree.items()}
