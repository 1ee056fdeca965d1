"""InceptionV3 with the FID graph (pytorch-fid's `FIDInceptionA/C/E` blocks), NHWC.

This is the network behind every published FID: TensorFlow's 2015-12-05 Inception graph as
ported by pytorch-fid (`pt_inception-2015-12-05-6726825d.pth`). It differs from torchvision's
InceptionV3 in three places, all reproduced here:

- the average-pool branch of the A, C and E blocks excludes the zero padding from the mean
  (TensorFlow's `avg_pool` with SAME padding; torch's `count_include_pad=False`);
- the last E block (`Mixed_7c`) max-pools in that branch instead of averaging;
- batch norm uses eps 1e-3 (torchvision's `BasicConv2d`, as the TF graph).

The forward pass is pytorch-fid's `InceptionV3(output_blocks=[3])`: images in [0, 1] are
resized to 299x299 with `F.interpolate(mode='bilinear', align_corners=False)` semantics (no
antialiasing: when downsampling only the two nearest source pixels contribute), scaled to
[-1, 1], and run up to the global average pool: 2048-d "pool3" features.

Parameters keep torchvision's module names (`Mixed_6b/branch7x7_2/{kernel,scale,bias,mean,
var}`), so the weight file is the torch state dict saved as safetensors
(`diffusion_jax.tools.convert_inception` writes it once) and `convert.load_inception` maps it
name by name.
Batch-norm statistics are ordinary parameters: the network is only ever run for inference.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

FID_SIZE = 299
FEATURE_DIM = 2048
BN_EPS = 1e-3
NUM_CLASSES = 1008  # The TF graph's classifier (unused for FID; kept in the weight file).

_PRECISIONS = {'highest': jax.lax.Precision.HIGHEST, 'high': jax.lax.Precision.HIGH,
               'default': jax.lax.Precision.DEFAULT}


def _pair(v) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nn.Module):
  """Conv (no bias) -> batch norm (inference statistics, eps 1e-3) -> ReLU."""
  features: int
  kernel_size: Any = 1
  stride: Any = 1
  padding: Any = 0
  precision: str = 'highest'

  @nn.compact
  def __call__(self, x_BHWC):
    kh, kw = _pair(self.kernel_size)
    ph, pw = _pair(self.padding)
    cin = x_BHWC.shape[-1]
    kernel = self.param('kernel', nn.initializers.he_normal(), (kh, kw, cin, self.features),
                        jnp.float32)
    scale = self.param('scale', nn.initializers.ones, (self.features,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
    mean = self.param('mean', nn.initializers.zeros, (self.features,), jnp.float32)
    var = self.param('var', nn.initializers.ones, (self.features,), jnp.float32)
    y = jax.lax.conv_general_dilated(
        x_BHWC, kernel, window_strides=_pair(self.stride), padding=((ph, ph), (pw, pw)),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=_PRECISIONS[self.precision])
    c = lambda v: v.reshape(1, 1, 1, -1)
    y = (y - c(mean)) * c(scale * jax.lax.rsqrt(var + BN_EPS)) + c(bias)
    return nn.relu(y)


def _avg_pool_3x3_same(x_BHWC):
  # TF's SAME average pool: padded positions do not count in the mean.
  return nn.avg_pool(x_BHWC, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def _max_pool_3x3(x_BHWC, stride: int, pad: int = 0):
  return nn.max_pool(x_BHWC, (3, 3), strides=(stride, stride),
                     padding=((pad, pad), (pad, pad)))


class FIDInceptionA(nn.Module):
  pool_features: int
  precision: str = 'highest'

  @nn.compact
  def __call__(self, x):
    C = lambda *a, **k: BasicConv2d(*a, precision=self.precision, **k)
    b1 = C(64, 1, name='branch1x1')(x)
    b5 = C(48, 1, name='branch5x5_1')(x)
    b5 = C(64, 5, padding=2, name='branch5x5_2')(b5)
    b3 = C(64, 1, name='branch3x3dbl_1')(x)
    b3 = C(96, 3, padding=1, name='branch3x3dbl_2')(b3)
    b3 = C(96, 3, padding=1, name='branch3x3dbl_3')(b3)
    bp = C(self.pool_features, 1, name='branch_pool')(_avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  precision: str = 'highest'

  @nn.compact
  def __call__(self, x):
    C = lambda *a, **k: BasicConv2d(*a, precision=self.precision, **k)
    b3 = C(384, 3, stride=2, name='branch3x3')(x)
    bd = C(64, 1, name='branch3x3dbl_1')(x)
    bd = C(96, 3, padding=1, name='branch3x3dbl_2')(bd)
    bd = C(96, 3, stride=2, name='branch3x3dbl_3')(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3(x, 2)], axis=-1)


class FIDInceptionC(nn.Module):
  channels_7x7: int
  precision: str = 'highest'

  @nn.compact
  def __call__(self, x):
    C = lambda *a, **k: BasicConv2d(*a, precision=self.precision, **k)
    c7 = self.channels_7x7
    b1 = C(192, 1, name='branch1x1')(x)
    b7 = C(c7, 1, name='branch7x7_1')(x)
    b7 = C(c7, (1, 7), padding=(0, 3), name='branch7x7_2')(b7)
    b7 = C(192, (7, 1), padding=(3, 0), name='branch7x7_3')(b7)
    bd = C(c7, 1, name='branch7x7dbl_1')(x)
    bd = C(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_2')(bd)
    bd = C(c7, (1, 7), padding=(0, 3), name='branch7x7dbl_3')(bd)
    bd = C(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_4')(bd)
    bd = C(192, (1, 7), padding=(0, 3), name='branch7x7dbl_5')(bd)
    bp = C(192, 1, name='branch_pool')(_avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  precision: str = 'highest'

  @nn.compact
  def __call__(self, x):
    C = lambda *a, **k: BasicConv2d(*a, precision=self.precision, **k)
    b3 = C(192, 1, name='branch3x3_1')(x)
    b3 = C(320, 3, stride=2, name='branch3x3_2')(b3)
    b7 = C(192, 1, name='branch7x7x3_1')(x)
    b7 = C(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
    b7 = C(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
    b7 = C(192, 3, stride=2, name='branch7x7x3_4')(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3(x, 2)], axis=-1)


class FIDInceptionE(nn.Module):
  """`max_pool=False`: pytorch-fid's FIDInceptionE_1 (Mixed_7b); True: FIDInceptionE_2."""
  max_pool: bool = False
  precision: str = 'highest'

  @nn.compact
  def __call__(self, x):
    C = lambda *a, **k: BasicConv2d(*a, precision=self.precision, **k)
    b1 = C(320, 1, name='branch1x1')(x)
    b3 = C(384, 1, name='branch3x3_1')(x)
    b3 = jnp.concatenate([C(384, (1, 3), padding=(0, 1), name='branch3x3_2a')(b3),
                          C(384, (3, 1), padding=(1, 0), name='branch3x3_2b')(b3)], axis=-1)
    bd = C(448, 1, name='branch3x3dbl_1')(x)
    bd = C(384, 3, padding=1, name='branch3x3dbl_2')(bd)
    bd = jnp.concatenate([C(384, (1, 3), padding=(0, 1), name='branch3x3dbl_3a')(bd),
                          C(384, (3, 1), padding=(1, 0), name='branch3x3dbl_3b')(bd)], axis=-1)
    # The TF graph max-pools in its last block (pytorch-fid keeps this quirk).
    pooled = _max_pool_3x3(x, 1, pad=1) if self.max_pool else _avg_pool_3x3_same(x)
    bp = C(192, 1, name='branch_pool')(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def bilinear_matrix(out_size: int, in_size: int) -> np.ndarray:
  """[out, in] weights of torch's `interpolate(mode='bilinear', align_corners=False)`.

  Source coordinate (i + 0.5) * in / out - 0.5, clamped at 0; the two neighbouring pixels
  (the upper one clamped to the edge) are blended linearly. No antialiasing, as in
  pytorch-fid: a downscale samples, it does not average a footprint.
  """
  # Torch's CPU kernel: the scale is a float32 ratio, the source coordinate is formed in
  # higher precision and stored as float32; lambda is then taken in float32. Any other
  # rounding moves the weights by up to ~1e-4 at 2000 px (checked against torch bit-exactly).
  f32 = np.float32
  scale = np.float64(f32(in_size) / f32(out_size))
  src = np.maximum(scale * (np.arange(out_size) + 0.5) - 0.5, 0.0).astype(f32)
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = np.clip(src - lo.astype(f32), f32(0), f32(1))
  m = np.zeros((out_size, in_size), np.float32)
  rows = np.arange(out_size)
  np.add.at(m, (rows, lo), f32(1) - frac)
  np.add.at(m, (rows, hi), frac)
  return m


def resize_bilinear(x_BHWC, size: int, precision: str = 'highest'):
  """pytorch-fid's resize of float images to size x size (separable, exact weights)."""
  _, h, w, _ = x_BHWC.shape
  if (h, w) == (size, size):
    return x_BHWC
  mh = jnp.asarray(bilinear_matrix(size, h), jnp.float32)
  mw = jnp.asarray(bilinear_matrix(size, w), jnp.float32)
  p = _PRECISIONS[precision]
  x = jnp.einsum('oh,bhwc->bowc', mh, x_BHWC, precision=p)
  return jnp.einsum('pw,bowc->bopc', mw, x, precision=p)


class InceptionV3(nn.Module):
  """FID InceptionV3: images [B, H, W, 3] in [0, 1] -> pool3 features [B, 2048].

  `resize_size`: 299 for every FID (smaller values only to make CPU tests cheap; the network
  needs at least 75). `precision`: matmul/conv precision; 'highest' so that TPUs and GPUs do
  not silently compute the features in bfloat16 passes.
  """
  resize_size: int | None = FID_SIZE
  precision: str = 'highest'

  @nn.compact
  def __call__(self, images_BHWC):
    p = self.precision
    C = lambda *a, **k: BasicConv2d(*a, precision=p, **k)
    x = images_BHWC.astype(jnp.float32)
    if self.resize_size:
      x = resize_bilinear(x, self.resize_size, p)
    x = 2.0 * x - 1.0
    x = C(32, 3, stride=2, name='Conv2d_1a_3x3')(x)
    x = C(32, 3, name='Conv2d_2a_3x3')(x)
    x = C(64, 3, padding=1, name='Conv2d_2b_3x3')(x)
    x = _max_pool_3x3(x, 2)
    x = C(80, 1, name='Conv2d_3b_1x1')(x)
    x = C(192, 3, name='Conv2d_4a_3x3')(x)
    x = _max_pool_3x3(x, 2)
    x = FIDInceptionA(32, p, name='Mixed_5b')(x)
    x = FIDInceptionA(64, p, name='Mixed_5c')(x)
    x = FIDInceptionA(64, p, name='Mixed_5d')(x)
    x = InceptionB(p, name='Mixed_6a')(x)
    x = FIDInceptionC(128, p, name='Mixed_6b')(x)
    x = FIDInceptionC(160, p, name='Mixed_6c')(x)
    x = FIDInceptionC(160, p, name='Mixed_6d')(x)
    x = FIDInceptionC(192, p, name='Mixed_6e')(x)
    x = InceptionD(p, name='Mixed_7a')(x)
    x = FIDInceptionE(False, p, name='Mixed_7b')(x)
    x = FIDInceptionE(True, p, name='Mixed_7c')(x)
    return jnp.mean(x, axis=(1, 2))  # Adaptive average pool to 1x1: pool3.


def abstract_params(module: InceptionV3 | None = None):
  module = module or InceptionV3()
  x = jnp.zeros((1, 75, 75, 3), jnp.float32)  # Shapes of the params do not depend on H, W.
  return jax.eval_shape(lambda: module.clone(resize_size=None).init(
      jax.random.PRNGKey(0), x))['params']


def random_params(seed: int = 0, module: InceptionV3 | None = None):
  """Random weights with non-trivial batch-norm statistics (tests and the offline demo).

  Kernels are He-normal so that activations keep their scale through the ~95 layers; the
  batch-norm scale/shift/statistics are drawn around identity so every term is exercised.
  """
  from flax import traverse_util
  rng = np.random.default_rng(seed)
  out = {}
  for path, spec in traverse_util.flatten_dict(abstract_params(module)).items():
    shape, leaf = tuple(spec.shape), path[-1]
    if leaf == 'kernel':
      fan_in = shape[0] * shape[1] * shape[2]
      v = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
    elif leaf in ('scale', 'var'):
      v = rng.uniform(0.5, 1.5, shape)
    else:
      v = rng.normal(0.0, 0.1, shape)
    out[path] = v.astype(np.float32)
  return traverse_util.unflatten_dict(out)
