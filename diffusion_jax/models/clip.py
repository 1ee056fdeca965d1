"""CLIP text and vision towers, numerically matching transformers' `CLIPModel`, and the
time-conditioned noised CLIP that GLIDE uses for CLIP guidance.

    module, params = convert.load_clip('/path/to/clip-vit-h-14')
    txt_BP = module.apply({'params': params}, ids_BL, mask_BL, method='encode_text')
    img_BP = module.apply({'params': params}, pixels_BHWC, method='encode_image')

Pixels are NHWC, already normalised with the CLIP mean/std (as transformers' `pixel_values`,
transposed); `diffusion_jax.encoders` does resizing and normalisation for raw images.
`NoisedCLIP` instead reads noised images x_t in the diffusion's [-1, 1] scale together with
their time t in [0, 1].
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
from flax.core import FrozenDict
import jax.numpy as jnp

Dtype = Any

_TEXT_DEFAULTS = dict(vocab_size=49408, width=512, layers=12, heads=8, mlp=2048, max_length=77,
                      act='quick_gelu', eos_token_id=49407, layer_norm_eps=1e-5)
_VISION_DEFAULTS = dict(image_size=224, patch_size=32, width=768, layers=12, heads=12, mlp=3072,
                        act='quick_gelu', channels=3, layer_norm_eps=1e-5)


def _preset(text: dict, vision: dict, embed_dim: int) -> dict[str, Any]:
  return dict(text={**_TEXT_DEFAULTS, **text}, vision={**_VISION_DEFAULTS, **vision},
              embed_dim=embed_dim)


PRESETS: dict[str, dict[str, Any]] = {
    'tiny': _preset(dict(vocab_size=64, width=32, layers=2, heads=4, mlp=64, max_length=16,
                         eos_token_id=None),
                    dict(image_size=16, patch_size=4, width=32, layers=2, heads=4, mlp=64), 32),
    'small': _preset(dict(vocab_size=128, width=64, layers=4, heads=4, mlp=256, max_length=32,
                          eos_token_id=None),
                     dict(image_size=32, patch_size=4, width=64, layers=4, heads=4, mlp=256), 64),
    # openai/clip-vit-large-patch14.
    'vit_l14': _preset(dict(width=768, layers=12, heads=12, mlp=3072),
                       dict(image_size=224, patch_size=14, width=1024, layers=24, heads=16,
                            mlp=4096), 768),
    # laion/CLIP-ViT-H-14-laion2B-s32B-b79K (OpenCLIP; exact GELU).
    'vit_h14': _preset(dict(width=1024, layers=24, heads=16, mlp=4096, act='gelu'),
                       dict(image_size=224, patch_size=14, width=1280, layers=32, heads=16,
                            mlp=5120, act='gelu'), 1024),
    # The CLIP of the unCLIP paper: ViT-H/16 at 256 px.
    'vit_h16_256': _preset(dict(width=1024, layers=24, heads=16, mlp=4096, act='gelu'),
                           dict(image_size=256, patch_size=16, width=1280, layers=32, heads=16,
                                mlp=5120, act='gelu'), 1024),
}

# Noised CLIP shapes. 'glide' is near the released filtered noised CLIP (64 px, patch 4, 12
# layers, width 512) with CLIP's BPE vocabulary and 77-token context; the exact released
# towers (image width 768, 65536 embeddings, per-timestep class token) are
# `convert_glide_clip.clip_model_config()`.
NOISED_PRESETS: dict[str, dict[str, Any]] = {
    'tiny': PRESETS['tiny'],
    'small': PRESETS['small'],
    'glide': _preset(dict(width=512, layers=12, heads=8, mlp=2048, eos_token_id=None),
                     dict(image_size=64, patch_size=4, width=512, layers=12, heads=8, mlp=2048),
                     512),
}


# How the noised CLIP's image tower reads t (see `CLIPVisionTower`).
TIME_EMBEDDINGS = ('mlp', 'class_table')


def _frozen_fields(fields) -> FrozenDict:
  """Tower fields as a hashable FrozenDict (a list from a saved config becomes a tuple)."""
  return FrozenDict({k: tuple(v) if isinstance(v, list) else v for k, v in dict(fields).items()})


def _activation(name: str):
  table = {
      'quick_gelu': lambda x: x * jax.nn.sigmoid(1.702 * x),
      'gelu': lambda x: jax.nn.gelu(x, approximate=False),
      'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),
      'gelu_pytorch_tanh': lambda x: jax.nn.gelu(x, approximate=True),
      'relu': jax.nn.relu,
  }
  if name not in table:
    raise ValueError(f'CLIP: unsupported activation {name!r}; known: {", ".join(sorted(table))}')
  return table[name]


def timestep_embedding(t_B, dim: int, max_period: float = 10000.0):
  """Sinusoidal embedding of 1000 * t (the ADM / GLIDE convention for t in [0, 1])."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = (1000.0 * t_B.astype(jnp.float32))[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def _ln(name, dtype, param_dtype, eps=1e-5):
  return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, param_dtype=param_dtype,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ('norm',)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('norm',)),
                      name=name)


def _dense(features, axis, names, dtype, param_dtype, name, use_bias=True, std=0.02):
  features = (features,) if isinstance(features, int) else tuple(features)
  n_in = 1 if isinstance(axis, int) else len(axis)
  return Dense(features, names, n_in, std, use_bias, dtype, param_dtype, name=name)


class Dense(nn.Module):
  """y = x . W contracting the last `n_in` dims of x; W has shape x.shape[-n_in:] + features.

  Used instead of `nn.DenseGeneral`, whose initializer builds a flat 2-d kernel and so
  cannot carry 3-d logical names under a mesh context (`jax.set_mesh`).
  """
  features: tuple[int, ...]
  names: tuple[Any, ...]
  n_in: int = 1
  std: float = 0.02
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    features = tuple(self.features)
    in_shape = x.shape[x.ndim - self.n_in:]
    kernel = self.param('kernel', nn.with_logical_partitioning(
        nn.initializers.normal(self.std), self.names), in_shape + features, self.param_dtype)
    contract = (tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in)))
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))
    if self.use_bias:
      bias = self.param('bias', nn.with_logical_partitioning(
          nn.initializers.zeros, self.names[self.n_in:]), features, self.param_dtype)
      y = y + bias.astype(self.dtype).reshape((1,) * (y.ndim - len(features)) + features)
    return y


class CLIPLayer(nn.Module):
  """Pre-LN transformer block (self-attention + MLP), float32 softmax."""
  heads: int
  mlp: int
  act: str
  eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BLD, mask_BQK):
    d = x_BLD.shape[-1]
    hk = (self.heads, d // self.heads)
    kw = (self.dtype, self.param_dtype)
    h = _ln('ln1', *kw, self.eps)(x_BLD).astype(self.dtype)
    q = _dense(hk, -1, ('embed', 'heads', 'kv'), *kw, 'q')(h)
    k = _dense(hk, -1, ('embed', 'heads', 'kv'), *kw, 'k')(h)
    v = _dense(hk, -1, ('embed', 'heads', 'kv'), *kw, 'v')(h)
    logits = jnp.einsum('bqhk,bshk->bhqs', q, k).astype(jnp.float32) * (hk[1] ** -0.5)
    if mask_BQK is not None:
      logits = jnp.where(mask_BQK[:, None], logits, jnp.finfo(jnp.float32).min)
    w = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    o = jnp.einsum('bhqs,bshk->bqhk', w, v)
    x_BLD = x_BLD + _dense(d, (-2, -1), ('heads', 'kv', 'embed'), *kw, 'o')(o)
    h = _ln('ln2', *kw, self.eps)(x_BLD).astype(self.dtype)
    h = _activation(self.act)(_dense(self.mlp, -1, ('embed', 'mlp'), *kw, 'fc1')(h))
    h = nn.with_logical_constraint(h, ('act_batch', 'act_len', 'act_mlp'))
    x_BLD = x_BLD + _dense(d, -1, ('mlp', 'embed'), *kw, 'fc2')(h)
    return nn.with_logical_constraint(x_BLD, ('act_batch', 'act_len', 'act_embed')), None


class CLIPStack(nn.Module):
  layers: int
  heads: int
  mlp: int
  act: str
  eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x_BLD, mask_BQK):
    layer = nn.remat(CLIPLayer, prevent_cse=False) if self.remat else CLIPLayer
    stack = nn.scan(layer, variable_axes={'params': 0}, split_rngs={'params': True},
                    in_axes=nn.broadcast, length=self.layers,
                    metadata_params={nn.PARTITION_NAME: 'layers'})
    x_BLD, _ = stack(self.heads, self.mlp, self.act, self.eps, self.dtype, self.param_dtype,
                     name='layers')(x_BLD, mask_BQK)
    return x_BLD


class CLIPTextTower(nn.Module):
  """Causal transformer over token ids; pooled at the end-of-text token.

  Pooling follows transformers: a config whose `eos_token_id` is 2 (checkpoints converted
  before the fix in transformers PR 24773, e.g. openai/clip-*) pools at the largest token id,
  which is the end-of-text token in CLIP's vocabulary; any other value pools at the first
  occurrence of that id. `eos_token_id=None` pools at the last unpadded token, which is the
  end-of-text token of any right-padding tokenizer: the presets that we train from scratch
  use it, so that they work with whatever tokenizer the data pipeline brings.
  """
  vocab_size: int
  width: int
  layers: int
  heads: int
  mlp: int
  max_length: int
  act: str
  eos_token_id: int | None
  layer_norm_eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, input_ids_BL, attention_mask_BL=None):
    b, length = input_ids_BL.shape
    if length > self.max_length:
      raise ValueError(f'CLIP text: {length} tokens > max_length {self.max_length}')
    tok = nn.Embed(self.vocab_size, self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                   embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                               ('vocab', 'embed')),
                   name='token_embedding')
    pos = self.param('position_embedding',
                     nn.with_logical_partitioning(nn.initializers.normal(0.01), (None, 'embed')),
                     (self.max_length, self.width), self.param_dtype)
    x_BLD = tok(input_ids_BL) + pos[None, :length].astype(self.dtype)
    mask_BQK = jnp.broadcast_to(jnp.tril(jnp.ones((length, length), bool)), (b, length, length))
    if attention_mask_BL is not None:
      mask_BQK = mask_BQK & attention_mask_BL.astype(bool)[:, None, :]
    x_BLD = CLIPStack(self.layers, self.heads, self.mlp, self.act, self.layer_norm_eps,
                      self.dtype, self.param_dtype, self.remat, name='encoder')(x_BLD, mask_BQK)
    hidden_BLD = _ln('final_ln', self.dtype, self.param_dtype, self.layer_norm_eps)(x_BLD)
    if self.eos_token_id is None:
      if attention_mask_BL is None:
        eos_B = jnp.full((b,), length - 1)
      else:
        last_valid = jnp.argmax(attention_mask_BL.astype(bool)[:, ::-1], axis=-1)
        eos_B = length - 1 - last_valid
    elif self.eos_token_id == 2:
      eos_B = jnp.argmax(input_ids_BL, axis=-1)
    else:
      eos_B = jnp.argmax((input_ids_BL == self.eos_token_id).astype(jnp.int32), axis=-1)
    pooled_BD = jnp.take_along_axis(hidden_BLD, eos_B[:, None, None], axis=1)[:, 0]
    return hidden_BLD, pooled_BD


class CLIPVisionTower(nn.Module):
  """ViT: patch conv (no bias), class token, positions, pre-LN, blocks, LN on the class token.

  With `time_conditioned`, `time_embedding` says how t enters:
  - 'mlp': an MLP of the sinusoidal embedding of 1000 * t is added to every token (class and
    patches) before the pre-LN. Its output layer starts at zero, so a noised CLIP initialised
    from a pretrained CLIP computes exactly that CLIP at the first step.
  - 'class_table': the class token is row k of a learned [num_timesteps, width] table
    (`time_table`, no `class_embedding`), k = round(t * num_timesteps) - 1 clipped to the
    table, i.e. t = (k + 1) / num_timesteps reads row k (glide-text2im's released noised CLIP).
  `input_mean` / `input_std` (per channel, 0..255 units) make the tower read x in [-1, 1] as
  ((x + 1) * 127.5 - mean) / std, as glide-text2im's CLIP does; None: pixels are used as given.
  """
  image_size: int
  patch_size: int
  width: int
  layers: int
  heads: int
  mlp: int
  act: str
  channels: int = 3
  layer_norm_eps: float = 1e-5
  time_conditioned: bool = False
  time_embedding: str = 'mlp'
  num_timesteps: int = 1000
  input_mean: tuple[float, ...] | None = None
  input_std: tuple[float, ...] | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  def _normalise(self, pixels_BHWC):
    if self.input_mean is None and self.input_std is None:
      return pixels_BHWC
    if self.input_mean is None or self.input_std is None:
      raise ValueError('CLIP vision: give both input_mean and input_std, or neither')
    mean_111C = jnp.asarray(self.input_mean, jnp.float32).reshape(1, 1, 1, -1)
    std_111C = jnp.asarray(self.input_std, jnp.float32).reshape(1, 1, 1, -1)
    return ((pixels_BHWC.astype(jnp.float32) + 1.0) * 127.5 - mean_111C) / std_111C

  @nn.compact
  def __call__(self, pixels_BHWC, t_B=None):
    b, h, w, c = pixels_BHWC.shape
    if (h, w) != (self.image_size, self.image_size) or c != self.channels:
      raise ValueError(f'CLIP vision: input {h}x{w}x{c}, model expects '
                       f'{self.image_size}x{self.image_size}x{self.channels}')
    if self.time_embedding not in TIME_EMBEDDINGS:
      raise ValueError(f'CLIP vision: unknown time_embedding {self.time_embedding!r}; known: '
                       f'{", ".join(TIME_EMBEDDINGS)}')
    if self.time_conditioned and t_B is None:
      raise ValueError('noised CLIP: the image tower needs the diffusion time t_B')
    pixels_BHWC = self._normalise(pixels_BHWC)
    p = self.patch_size
    patches = nn.Conv(
        self.width, (p, p), strides=(p, p), padding='VALID', use_bias=False, dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                 (None, None, 'conv_in', 'embed')),
        name='patch_embedding')(pixels_BHWC.astype(self.dtype))
    patches = patches.reshape(b, -1, self.width)
    table = self.time_conditioned and self.time_embedding == 'class_table'
    if table:
      # One learned class token per timestep: t = (k + 1) / T reads row k.
      rows = self.param('time_table',
                        nn.with_logical_partitioning(nn.initializers.normal(self.width ** -0.5),
                                                     (None, 'embed')),
                        (self.num_timesteps, self.width), self.param_dtype)
      k_B = jnp.round(t_B.astype(jnp.float32) * self.num_timesteps).astype(jnp.int32) - 1
      cls_B1D = jnp.take(rows, jnp.clip(k_B, 0, self.num_timesteps - 1), axis=0)[:, None]
    else:
      cls = self.param('class_embedding',
                       nn.with_logical_partitioning(nn.initializers.normal(self.width ** -0.5),
                                                    ('embed',)),
                       (self.width,), self.param_dtype)
      cls_B1D = jnp.broadcast_to(cls, (b, 1, self.width))
    n = patches.shape[1] + 1
    pos = self.param('position_embedding',
                     nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, 'embed')),
                     (n, self.width), self.param_dtype)
    x_BLD = jnp.concatenate([cls_B1D.astype(self.dtype), patches], axis=1)
    x_BLD = x_BLD + pos[None].astype(self.dtype)
    if self.time_conditioned and not table:
      e = timestep_embedding(t_B, self.width)
      e = _dense(self.width, -1, (None, 'embed'), self.dtype, self.param_dtype, 'time_fc1')(e)
      e = _dense(self.width, -1, ('embed', None), self.dtype, self.param_dtype, 'time_fc2',
                 std=0.0)(jax.nn.silu(e))
      x_BLD = x_BLD + e[:, None, :].astype(self.dtype)
    x_BLD = _ln('pre_ln', self.dtype, self.param_dtype, self.layer_norm_eps)(x_BLD)
    x_BLD = x_BLD.astype(self.dtype)
    x_BLD = CLIPStack(self.layers, self.heads, self.mlp, self.act, self.layer_norm_eps,
                      self.dtype, self.param_dtype, self.remat, name='encoder')(x_BLD, None)
    pooled_BD = _ln('post_ln', self.dtype, self.param_dtype, self.layer_norm_eps)(x_BLD[:, 0])
    return x_BLD, pooled_BD


class CLIP(nn.Module):
  """CLIP with both towers, projections and the logit scale.

  `text` and `vision` are dicts of tower fields (see `PRESETS`); `embed_dim` is the shared
  projection width. Methods: `encode_text`, `encode_image` (projected embeddings, not
  normalised), `text_features` / `image_features` (dicts with hidden states, pooled and
  projected outputs), and `__call__` which runs both and returns the logit scale too.
  """
  text: Any
  vision: Any
  embed_dim: int
  logit_scale_init: float = 2.6592  # log(1 / 0.07)
  time_conditioned: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  def __post_init__(self):
    # Tower fields arrive as dicts; frozen, the module stays hashable (jit static args, clone).
    object.__setattr__(self, 'text', _frozen_fields(self.text))
    object.__setattr__(self, 'vision', _frozen_fields(self.vision))
    super().__post_init__()

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat)
    self.text_model = CLIPTextTower(**dict(self.text), **kw)
    self.vision_model = CLIPVisionTower(**dict(self.vision), time_conditioned=self.time_conditioned,
                                        **kw)
    self.text_projection = _dense(self.embed_dim, -1, ('embed', None), self.dtype,
                                  self.param_dtype, None, use_bias=False,
                                  std=self.text['width'] ** -0.5)
    self.visual_projection = _dense(self.embed_dim, -1, ('embed', None), self.dtype,
                                    self.param_dtype, None, use_bias=False,
                                    std=self.vision['width'] ** -0.5)
    self.logit_scale = self.param(
        'logit_scale', nn.with_logical_partitioning(
            nn.initializers.constant(self.logit_scale_init), ()), (), jnp.float32)

  def text_features(self, input_ids_BL, attention_mask_BL=None):
    hidden_BLD, pooled_BD = self.text_model(input_ids_BL, attention_mask_BL)
    return dict(last_hidden_state=hidden_BLD, pooled=pooled_BD,
                embeds=self.text_projection(pooled_BD.astype(self.dtype)))

  def image_features(self, pixels_BHWC, t_B=None):
    hidden_BLD, pooled_BD = self.vision_model(pixels_BHWC, t_B)
    return dict(last_hidden_state=hidden_BLD, pooled=pooled_BD,
                embeds=self.visual_projection(pooled_BD.astype(self.dtype)))

  def encode_text(self, input_ids_BL, attention_mask_BL=None):
    return self.text_features(input_ids_BL, attention_mask_BL)['embeds']

  def encode_image(self, pixels_BHWC, t_B=None):
    return self.image_features(pixels_BHWC, t_B)['embeds']

  def __call__(self, pixels_BHWC, input_ids_BL, attention_mask_BL=None, t_B=None):
    """(image_emb_BP, text_emb_BP, logit_scale): unnormalised embeddings, log scale."""
    return (self.encode_image(pixels_BHWC, t_B), self.encode_text(input_ids_BL, attention_mask_BL),
            self.logit_scale)


class NoisedCLIP(nn.Module):
  """GLIDE's noised CLIP: the image tower also reads the diffusion time t in [0, 1].

  Called with the denoiser signature so the shared trainer can drive it:
  `apply({'params': p}, x_t_BHWC, t_B, cond, train=False)` with `cond['text_ids']` and
  `cond['text_mask']`; returns (image_emb_BP, text_emb_BP, logit_scale). For CLIP guidance,
  `encode_image(x_t, t_B)` and `encode_text(ids, mask)` give the two sides separately.
  The parameter tree is a `CLIP` tree (under 'clip') plus the time MLP, so pretrained CLIP
  weights can seed it; with `vision['time_embedding'] == 'class_table'` (glide-text2im's
  released towers, `diffusion_jax.convert_glide_clip`) the class token is a per-timestep table.
  """
  text: Any
  vision: Any
  embed_dim: int
  logit_scale_init: float = 2.6592
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  time_conditioned: bool = True  # False: a plain CLIP that ignores t (`ContrastiveCLIP`)

  def __post_init__(self):
    # Tower fields arrive as dicts; frozen, the module stays hashable (jit static args, clone).
    object.__setattr__(self, 'text', _frozen_fields(self.text))
    object.__setattr__(self, 'vision', _frozen_fields(self.vision))
    super().__post_init__()

  def setup(self):
    self.clip = CLIP(self.text, self.vision, self.embed_dim, self.logit_scale_init,
                     time_conditioned=self.time_conditioned, dtype=self.dtype,
                     param_dtype=self.param_dtype, remat=self.remat)

  def encode_image(self, x_BHWC, t_B):
    return self.clip.encode_image(x_BHWC, t_B)

  def encode_text(self, input_ids_BL, attention_mask_BL=None):
    return self.clip.encode_text(input_ids_BL, attention_mask_BL)

  def __call__(self, x_BHWC, t_B, cond, train: bool = False):
    del train  # No dropout.
    for key in ('text_ids', 'text_mask'):
      if key not in cond:
        raise KeyError(f'noised CLIP needs cond[{key!r}]')
    return self.clip(x_BHWC, cond['text_ids'], cond['text_mask'], t_B)


class ContrastiveCLIP(NoisedCLIP):
  """A plain CLIP in the trainer's calling convention: unCLIP's own CLIP (stage `clip` of
  configs/unclip.py), trained from scratch on clean images by the shared trainer.

  It is a `NoisedCLIP` without the time input, so one module, one example-inputs function
  and one contrastive loss serve both; t_B is accepted and ignored. Its parameters under
  'clip' form exactly a `CLIP` tree, which `convert.export_clip` writes as a transformers
  CLIPModel directory for `encoders.build_encoder` to load as a frozen encoder.
  """
  time_conditioned: bool = False


def make(preset: str = 'tiny', **overrides) -> CLIP:
  if preset not in PRESETS:
    raise ValueError(f'unknown CLIP preset {preset!r}; known: {", ".join(PRESETS)}')
  return CLIP(**{**PRESETS[preset], **overrides})


def make_noised(preset: str = 'tiny', **overrides) -> NoisedCLIP:
  if preset not in NOISED_PRESETS:
    raise ValueError(f'unknown noised CLIP preset {preset!r}; known: {", ".join(NOISED_PRESETS)}')
  return NoisedCLIP(**{**NOISED_PRESETS[preset], **overrides})


def config_from_hf(cfg: dict) -> dict[str, Any]:
  """`CLIP` fields from a transformers `CLIPModel` config.json dict."""
  if cfg.get('model_type', 'clip') != 'clip':
    raise ValueError(f'config.json has model_type={cfg.get("model_type")!r}; this loader reads '
                     'CLIPModel checkpoints (model_type "clip", both towers)')
  t, v = cfg.get('text_config') or {}, cfg.get('vision_config') or {}
  # Missing fields take transformers' CLIPTextConfig / CLIPVisionConfig defaults.
  text = dict(vocab_size=t.get('vocab_size', 49408), width=t.get('hidden_size', 512),
              layers=t.get('num_hidden_layers', 12), heads=t.get('num_attention_heads', 8),
              mlp=t.get('intermediate_size', 2048), max_length=t.get('max_position_embeddings', 77),
              act=t.get('hidden_act', 'quick_gelu'), eos_token_id=t.get('eos_token_id', 49407),
              layer_norm_eps=t.get('layer_norm_eps', 1e-5))
  vision = dict(image_size=v.get('image_size', 224), patch_size=v.get('patch_size', 32),
                width=v.get('hidden_size', 768), layers=v.get('num_hidden_layers', 12),
                heads=v.get('num_attention_heads', 12), mlp=v.get('intermediate_size', 3072),
                act=v.get('hidden_act', 'quick_gelu'), channels=v.get('num_channels', 3),
                layer_norm_eps=v.get('layer_norm_eps', 1e-5))
  _activation(text['act'])
  _activation(vision['act'])
  return dict(text=text, vision=vision, embed_dim=cfg.get('projection_dim', 512),
              logit_scale_init=cfg.get('logit_scale_init_value', 2.6592))


def config_to_hf(fields: dict[str, Any], *, bos_token_id: int | None = None,
                 pad_token_id: int | None = None) -> dict[str, Any]:
  """A transformers `CLIPModel` config.json dict from `CLIP` fields: the inverse of
  `config_from_hf` (`config_from_hf(config_to_hf(f)) == f` for every field it reads).

  transformers pools the text tower at `eos_token_id`, so a tower that pools at the last
  unpadded token (`eos_token_id=None`) must be given the id its tokenizer ends prompts with
  first (see `convert.export_clip`).
  """
  text, vision = dict(fields['text']), dict(fields['vision'])
  if text.get('eos_token_id') is None:
    raise ValueError('CLIP text eos_token_id is None (pools at the last unpadded token), which '
                     'a transformers config cannot express: set it to the tokenizer\'s eos id')
  embed_dim = int(fields['embed_dim'])
  text_cfg = dict(
      model_type='clip_text_model', vocab_size=text['vocab_size'], hidden_size=text['width'],
      num_hidden_layers=text['layers'], num_attention_heads=text['heads'],
      intermediate_size=text['mlp'], max_position_embeddings=text['max_length'],
      hidden_act=text['act'], layer_norm_eps=text['layer_norm_eps'],
      eos_token_id=text['eos_token_id'], projection_dim=embed_dim)
  text_cfg.update({k: v for k, v in (('bos_token_id', bos_token_id),
                                     ('pad_token_id', pad_token_id)) if v is not None})
  vision_cfg = dict(
      model_type='clip_vision_model', image_size=vision['image_size'],
      patch_size=vision['patch_size'], hidden_size=vision['width'],
      num_hidden_layers=vision['layers'], num_attention_heads=vision['heads'],
      intermediate_size=vision['mlp'], hidden_act=vision['act'],
      num_channels=vision.get('channels', 3), layer_norm_eps=vision['layer_norm_eps'],
      projection_dim=embed_dim)
  return dict(architectures=['CLIPModel'], model_type='clip', projection_dim=embed_dim,
              logit_scale_init_value=float(fields.get('logit_scale_init', 2.6592)),
              text_config=text_cfg, vision_config=vision_cfg, torch_dtype='float32')


def abstract_params(module, boxed: bool = False):
  """Parameter shapes of a `CLIP` or `NoisedCLIP` without allocating."""
  text, vision = dict(module.text), dict(module.vision)
  ids = jnp.zeros((1, text['max_length']), jnp.int32)
  px = jnp.zeros((1, vision['image_size'], vision['image_size'], vision.get('channels', 3)))
  t = jnp.zeros((1,))
  if isinstance(module, NoisedCLIP):
    fn = lambda: module.init(jax.random.PRNGKey(0), px, t,
                             {'text_ids': ids, 'text_mask': ids > -1})
  else:
    fn = lambda: module.init(jax.random.PRNGKey(0), px, ids, ids > -1)
  tree = jax.eval_shape(fn)['params']
  return tree if boxed else nn.meta.unbox(tree)



def noised_clip_example_inputs(model_cfg, batch_size: int):
  """Zero `(x, t_B, cond)` of the shapes a `NoisedCLIP` built from `model_cfg` reads."""
  text, vision = dict(model_cfg['text']), dict(model_cfg['vision'])
  size, channels = vision['image_size'], vision.get('channels', 3)
  ids = jnp.zeros((batch_size, text['max_length']), jnp.int32)
  return (jnp.zeros((batch_size, size, size, channels), jnp.float32),
          jnp.zeros((batch_size,), jnp.float32),
          {'text_ids': ids, 'text_mask': jnp.ones(ids.shape, bool)})
