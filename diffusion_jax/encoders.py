"""Frozen text and image encoders behind one interface: tokenize, encode, batched, sharded.

    enc = build_encoder(cfg.text_encoder)                    # T5 or CLIP, from config
    tokens_BLD, mask_BL, pooled_BD = enc.encode_text(prompts)
    emb_BD = enc.encode_image(images_uint8_BHWC)             # CLIP only

The parameters are placed on a mesh through their logical axis names
(`parallel.logical_shardings`), so T5-XXL and CLIP-H shard FSDP-style like the trained
networks; inputs are split over the batch axes. Results come back as host numpy arrays.
Inside a jitted train step, `text_forward(params, ids, mask)` and
`image_forward(params, images)` are the same computations as pure functions of the params.
Padded token positions are zeroed in `tokens_BLD` (kept with `zero_padding=False`). T5's
pooled embedding is the masked mean of its tokens (Imagen); CLIP's is its projected text
embedding (unCLIP).

`cache_captions` runs the encoder once over a list of captions and writes the results as
.npy files (memory-mapped when read back, no pickle); `CachedTextEncoder` then serves
`encode_text` from that cache, which saves running T5-XXL on every training step.

Config fields (`encoder_config`): name ('t5' | 'clip'), preset (a `models.t5.PRESETS` /
`models.clip.PRESETS` name, used when `path` is None), path (local transformers directory
with config.json + safetensors; None = random initialisation from `seed`, legitimate for the
offline demo), tokenizer_path (default: `path`), max_length (default 128 for T5, 77 for
CLIP, or the CLIP text tower's positions if fewer), batch_size, dtype ('float32' |
'bfloat16'), seed.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diffusion_jax import config_util, convert, errors, parallel
from diffusion_jax.diffusers_io import encoders as dio_encoders
from diffusion_jax.models import clip as clip_lib
from diffusion_jax.models import t5 as t5_lib
from diffusion_jax.tokenizer import DEFAULT_MAX_LENGTH, Tokenizer, load_tokenizer

# OpenAI CLIP's pixel statistics (transformers' CLIPImageProcessor defaults).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def encoder_config(name: str = 't5', preset: str = 'tiny', path: str | None = None, **kw):
  """The encoder section of a stage config."""
  c = ml_collections.ConfigDict()
  c.name = name
  c.preset = preset
  c.path = path
  c.tokenizer_path = kw.pop('tokenizer_path', None)
  c.max_length = kw.pop('max_length', None)
  c.batch_size = kw.pop('batch_size', 32)
  c.dtype = kw.pop('dtype', 'float32')
  c.seed = kw.pop('seed', 0)
  c.zero_padding = kw.pop('zero_padding', True)  # False: padding tokens keep their outputs
  # A CLIP image tower beside a single text tower `path` (a diffusers pipeline's text_encoder/).
  c.image_path = kw.pop('image_path', None)
  if kw:
    raise ValueError(f'encoder_config: unknown fields {sorted(kw)}')
  return c


def default_mesh() -> Mesh:
  """All local devices on the 'data' axis (parameters replicated, batches split)."""
  devices = np.asarray(jax.local_devices()).reshape(-1, 1, 1)
  return Mesh(devices, parallel.MESH_AXES)


class TextEncoder:
  """A frozen text encoder: `encode_text(prompts) -> (tokens_BLD, mask_BL, pooled_BD)`."""

  def __init__(self, name: str, module: nn.Module, params, tokenizer: Tokenizer | None, *,
               abstract_boxed, mesh: Mesh | None = None, rules=None, batch_size: int = 32,
               max_length: int | None = None, meta: Mapping[str, Any] | None = None,
               zero_padding: bool = True):
    if name not in ('t5', 'clip'):
      raise ValueError(f"encoder name must be 't5' or 'clip', got {name!r}")
    self.name = name
    self.module = module
    self.tokenizer = tokenizer
    self.mesh = default_mesh() if mesh is None else mesh
    self.rules = parallel.DEFAULT_LOGICAL_RULES if rules is None else rules
    self.meta = dict(meta or {})
    # False: padding positions keep the encoder's outputs (DeepFloyd IF's U-Nets read them).
    self.zero_padding = bool(zero_padding)
    shards = int(np.prod([self.mesh.shape[a] for a in parallel.BATCH_AXES]))
    self.batch_size = max(shards, -(-int(batch_size) // shards) * shards)
    self.max_length = int(max_length or (tokenizer.max_length if tokenizer else 0)
                          or DEFAULT_MAX_LENGTH[name])
    self.param_shardings = parallel.logical_shardings(abstract_boxed, self.mesh, self.rules)
    self.params = jax.device_put(params, self.param_shardings)
    self._b1 = NamedSharding(self.mesh, P(parallel.BATCH_AXES))
    self._b2 = NamedSharding(self.mesh, P(parallel.BATCH_AXES, None))
    self._b3 = NamedSharding(self.mesh, P(parallel.BATCH_AXES, None, None))
    self._text_fn = jax.jit(self.text_forward,
                            in_shardings=(self.param_shardings, self._b2, self._b2),
                            out_shardings=(self._b3, self._b2))

  @contextlib.contextmanager
  def _sharding_context(self):
    # The modules' activation constraints (batch over the data axes) take effect only with a
    # mesh and the logical rules in scope while tracing.
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield

  @property
  def embed_dim(self) -> int:
    if self.name == 't5':
      return self.module.d_model
    return self.module.embed_dim

  @property
  def token_dim(self) -> int:
    return self.module.d_model if self.name == 't5' else self.module.text['width']

  def text_forward(self, params, ids_BL, mask_BL):
    """Pure (jit-able) text encoding: (tokens_BLD with padding zeroed unless the encoder was
    built with zero_padding=False, pooled_BD), float32.

    For use inside a caller's jitted step with `self.params` passed in as `params`.
    """
    m = mask_BL.astype(jnp.float32)[:, :, None]
    if self.name == 't5':
      h = self.module.apply({'params': params}, ids_BL, mask_BL).astype(jnp.float32)
      pooled = jnp.sum(h * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
    else:
      feats = self.module.apply({'params': params}, ids_BL, mask_BL, method='text_features')
      h = feats['last_hidden_state'].astype(jnp.float32)
      pooled = feats['embeds'].astype(jnp.float32)
    return (h * m if self.zero_padding else h), pooled

  _text_forward = text_forward

  def _batches(self, n: int):
    for start in range(0, n, self.batch_size):
      yield start, min(start + self.batch_size, n)

  def _pad(self, x: np.ndarray, rows: int) -> np.ndarray:
    if x.shape[0] == rows:
      return x
    pad = np.zeros((rows - x.shape[0],) + x.shape[1:], x.dtype)
    if pad.dtype == bool:
      pad[:, :1] = True  # Keep padded rows well-formed (one visible token).
    return np.concatenate([x, pad], axis=0)

  def encode_ids(self, ids_BL, mask_BL) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Encodes already tokenized prompts (int32 ids, bool mask) in batches."""
    ids_BL, mask_BL = np.asarray(ids_BL, np.int32), np.asarray(mask_BL, bool)
    n = ids_BL.shape[0]
    tokens, pooled = [], []
    for s, e in self._batches(n):
      ids = jax.device_put(self._pad(ids_BL[s:e], self.batch_size), self._b2)
      mask = jax.device_put(self._pad(mask_BL[s:e], self.batch_size), self._b2)
      with self._sharding_context():
        tok, pool = self._text_fn(self.params, ids, mask)
      tokens.append(np.asarray(tok)[:e - s])
      pooled.append(np.asarray(pool)[:e - s])
    if not tokens:
      return (np.zeros((0, ids_BL.shape[1], self.token_dim), np.float32), mask_BL,
              np.zeros((0, self.embed_dim), np.float32))
    return np.concatenate(tokens), mask_BL, np.concatenate(pooled)

  def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    if self.tokenizer is None:
      raise ValueError(f'{self.name} encoder has no tokenizer: set tokenizer_path (a local '
                       'directory; `diffusion_jax.tokenizer.build_word_tokenizer` writes one)')
    return self.tokenizer(list(prompts))

  def encode_text(self, prompts: Sequence[str]):
    """(tokens_BLD float32 with padding zeroed, mask_BL bool, pooled_BD float32)."""
    return self.encode_ids(*self.tokenize(prompts))

  def encode_image(self, images):
    raise NotImplementedError(f'the {self.name} encoder has no image tower')

  def cache_captions(self, captions: Sequence[str], out_dir: str, *,
                     dtype: str = 'float32') -> str:
    """Encodes every caption once and writes out_dir/{tokens,mask,pooled}.npy + captions.json.

    Written chunk by chunk into memory-mapped .npy files, so the cache may exceed RAM.
    `dtype` 'float16' halves the size of the token states.
    """
    captions = [str(c) for c in captions]
    os.makedirs(out_dir, exist_ok=True)
    n, length = len(captions), self.max_length
    store = np.dtype(dtype)
    tokens = np.lib.format.open_memmap(os.path.join(out_dir, 'tokens.npy'), 'w+', store,
                                       (n, length, self.token_dim))
    mask = np.lib.format.open_memmap(os.path.join(out_dir, 'mask.npy'), 'w+', bool, (n, length))
    pooled = np.lib.format.open_memmap(os.path.join(out_dir, 'pooled.npy'), 'w+', store,
                                       (n, self.embed_dim))
    for s, e in self._batches(n):
      tok, msk, pool = self.encode_text(captions[s:e])
      tokens[s:e], mask[s:e], pooled[s:e] = tok.astype(store), msk, pool.astype(store)
    for arr in (tokens, mask, pooled):
      arr.flush()
    with open(os.path.join(out_dir, 'captions.json'), 'w') as f:
      json.dump({'captions': captions, 'encoder': self.name, 'max_length': length,
                 **{k: v for k, v in self.meta.items() if isinstance(v, (str, int, float))}}, f)
    return out_dir


class CLIPEncoder(TextEncoder):
  """Frozen CLIP: `encode_text` as `TextEncoder` plus `encode_image(images) -> emb_BD`.

  Images: uint8 [B, H, W, 3] in [0, 255], or float in [-1, 1] (the library's convention).
  They are center-cropped to a square, resized (bicubic, antialiased) to the tower's input
  size and normalised with CLIP's mean and std.
  """

  def __init__(self, *args, image_mean=CLIP_MEAN, image_std=CLIP_STD, **kw):
    super().__init__('clip', *args, **kw)
    self.image_mean = tuple(float(v) for v in image_mean)
    self.image_std = tuple(float(v) for v in image_std)
    self._image_fns = {}

  @property
  def image_size(self) -> int:
    return self.module.vision['image_size']

  def preprocess(self, x_BHWC):
    """Images in [0, 1] (float32) -> CLIP pixels at the tower's size."""
    b, h, w, c = x_BHWC.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    x_BHWC = x_BHWC[:, top:top + side, left:left + side]
    size = self.image_size
    if side != size:
      x_BHWC = jax.image.resize(x_BHWC, (b, size, size, c), 'bicubic', antialias=True)
    mean = jnp.asarray(self.image_mean, jnp.float32).reshape(1, 1, 1, -1)
    std = jnp.asarray(self.image_std, jnp.float32).reshape(1, 1, 1, -1)
    return (jnp.clip(x_BHWC, 0.0, 1.0) - mean) / std

  def image_forward(self, params, images, uint8: bool = False):
    """Pure (jit-able) image encoding: float images in [-1, 1] (or uint8 with `uint8`) ->
    projected CLIP embeddings [B, D], float32; resizing and normalisation included."""
    x = images.astype(jnp.float32)
    x = x / 255.0 if uint8 else (x + 1.0) / 2.0
    pixels = self.preprocess(x)
    return self.module.apply({'params': params}, pixels, method='encode_image').astype(jnp.float32)

  _image_forward = image_forward

  def encode_image(self, images) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'encode_image expects [B, H, W, 3] images, got shape {images.shape}')
    uint8 = images.dtype == np.uint8
    key = (uint8, images.shape[1:])
    if key not in self._image_fns:
      self._image_fns[key] = jax.jit(
          lambda p, x: self.image_forward(p, x, uint8),
          in_shardings=(self.param_shardings, NamedSharding(self.mesh, P(parallel.BATCH_AXES))),
          out_shardings=self._b2)
    fn = self._image_fns[key]
    out = []
    for s, e in self._batches(images.shape[0]):
      x = jax.device_put(self._pad(images[s:e], self.batch_size),
                         NamedSharding(self.mesh, P(parallel.BATCH_AXES)))
      with self._sharding_context():
        out.append(np.asarray(fn(self.params, x))[:e - s])
    if not out:
      return np.zeros((0, self.embed_dim), np.float32)
    return np.concatenate(out)


def _module_and_params(cfg):
  name, path = config_util.get(cfg, 'name', 't5'), config_util.get(cfg, 'path')
  dtype = _DTYPES[config_util.get(cfg, 'dtype', 'float32')]
  lib = {'t5': t5_lib, 'clip': clip_lib}.get(name)
  if lib is None:
    raise ValueError(f"encoder name must be 't5' or 'clip', got {name!r}")
  if name == 'clip' and path and dio_encoders.is_text_tower(path):
    image_path = config_util.get(cfg, 'image_path')
    if not image_path:
      raise errors.InputError(
          f'text_encoder.path={path} holds a CLIP text tower only, and the stage embeds images '
          'too: set --config.text_encoder.image_path to its CLIP image tower (e.g. an '
          'UnCLIPImageVariationPipeline\'s image_encoder/)')
    module, params = dio_encoders.load_clip_pair(path, image_path)
    module = module.clone(dtype=dtype)
  elif path:
    module, params = {'t5': convert.load_t5, 'clip': convert.load_clip}[name](path, dtype=dtype)
  else:
    module = lib.make(config_util.get(cfg, 'preset', 'tiny'), dtype=dtype)
    params = None
  abstract = lib.abstract_params(module, boxed=True)
  return name, module, params, abstract


def _match_clip_eos(module, params, tokenizer: Tokenizer, where: str):
  """CLIP pools at its end-of-text id, which must be the tokenizer's.

  A randomly initialised tower with an explicit id takes the tokenizer's (the small presets
  pool at the last unpadded token instead); a pretrained one must already agree, or every
  prompt would pool the same token.
  """
  eos = module.text['eos_token_id']
  # None: pooled at the last unpadded token; 2: legacy argmax pooling.
  if tokenizer.eos_id is None or eos is None or eos == 2 or eos == tokenizer.eos_id:
    return module
  if params is None:
    return module.clone(text={**module.text, 'eos_token_id': tokenizer.eos_id})
  raise ValueError(f'the CLIP config pools at eos_token_id={eos} but the tokenizer at {where} '
                   f'ends prompts with id {tokenizer.eos_id}; use the tokenizer saved with the '
                   'model')


def build_encoder(cfg, mesh: Mesh | None = None, rules=None) -> TextEncoder:
  """A `TextEncoder` (T5) or `CLIPEncoder` from an `encoder_config` section."""
  name, module, params, abstract = _module_and_params(cfg)
  mesh = default_mesh() if mesh is None else mesh
  rules = parallel.DEFAULT_LOGICAL_RULES if rules is None else rules
  tok_path = config_util.get(cfg, 'tokenizer_path') or config_util.get(cfg, 'path')
  max_length = config_util.get(cfg, 'max_length')
  if max_length is None:
    max_length = DEFAULT_MAX_LENGTH[name]
    if name == 'clip':
      max_length = min(max_length, module.text['max_length'])
  tokenizer = load_tokenizer(tok_path, max_length) if tok_path else None
  if tokenizer is not None and name == 'clip':
    if max_length > module.text['max_length']:
      raise ValueError(f'max_length {max_length} exceeds the CLIP text tower\'s '
                       f'{module.text["max_length"]} positions')
    module = _match_clip_eos(module, params, tokenizer, tok_path)
  if tokenizer is not None:
    vocab = module.vocab_size if name == 't5' else module.text['vocab_size']
    if tokenizer.vocab_size > vocab:
      raise ValueError(f'tokenizer at {tok_path} has {tokenizer.vocab_size} tokens but the '
                       f'{name} model embeds only {vocab}')
  if params is None:
    # Random init directly into the shardings: nothing is materialised unsharded.
    shardings = parallel.logical_shardings(abstract, mesh, rules)
    if name == 't5':
      init = lambda k: module.init(k, jnp.zeros((1, 8), jnp.int32))
    else:
      text, vision = module.text, module.vision
      init = lambda k: module.init(
          k, jnp.zeros((1, vision['image_size'], vision['image_size'], 3)),
          jnp.zeros((1, text['max_length']), jnp.int32))
    params = jax.jit(lambda k: nn.meta.unbox(init(k))['params'], out_shardings=shardings)(
        jax.random.PRNGKey(int(config_util.get(cfg, 'seed', 0))))
  meta = dict(name=name, preset=config_util.get(cfg, 'preset', ''), path=config_util.get(cfg, 'path', ''),
              seed=int(config_util.get(cfg, 'seed', 0)))
  kw = dict(abstract_boxed=abstract, mesh=mesh, rules=rules,
            batch_size=int(config_util.get(cfg, 'batch_size', 32)), max_length=max_length, meta=meta,
            zero_padding=bool(config_util.get(cfg, 'zero_padding', True)))
  if name == 't5':
    return TextEncoder('t5', module, params, tokenizer, **kw)
  mean, std = CLIP_MEAN, CLIP_STD
  if config_util.get(cfg, 'image_path'):
    stats = dio_encoders.image_stats_folder(config_util.get(cfg, 'image_path'))
    mean, std = convert.read_image_stats(stats, mean, std)
  elif config_util.get(cfg, 'path'):
    mean, std = convert.read_image_stats(config_util.get(cfg, 'path'), mean, std)
  return CLIPEncoder(module, params, tokenizer, image_mean=mean, image_std=std, **kw)


def load_cache(cache_dir: str) -> dict[str, Any]:
  """Arrays written by `cache_captions` (memory-mapped, no pickle) and their captions."""
  out = {k: np.load(os.path.join(cache_dir, f'{k}.npy'), mmap_mode='r', allow_pickle=False)
         for k in ('tokens', 'mask', 'pooled')}
  with open(os.path.join(cache_dir, 'captions.json')) as f:
    out['info'] = json.load(f)
  return out


class CachedTextEncoder:
  """Serves `encode_text(prompts)` from a `cache_captions` directory.

  A prompt not in the cache is encoded by `fallback` (a `TextEncoder`) when one is given,
  and is a KeyError naming the prompt otherwise.
  """

  def __init__(self, cache_dir: str, fallback: TextEncoder | None = None):
    self.cache = load_cache(cache_dir)
    self.fallback = fallback
    self.index = {c: i for i, c in enumerate(self.cache['info']['captions'])}

  def encode_text(self, prompts: Sequence[str]):
    rows = [self.index.get(p) for p in prompts]
    missing = [p for p, r in zip(prompts, rows) if r is None]
    if missing and self.fallback is None:
      raise KeyError(f'{len(missing)} prompts are not in the caption cache, e.g. {missing[0]!r}')
    tokens = np.zeros((len(prompts),) + self.cache['tokens'].shape[1:], np.float32)
    mask = np.zeros((len(prompts),) + self.cache['mask'].shape[1:], bool)
    pooled = np.zeros((len(prompts),) + self.cache['pooled'].shape[1:], np.float32)
    hit = [i for i, r in enumerate(rows) if r is not None]
    if hit:
      src = np.asarray([rows[i] for i in hit])
      order = np.argsort(src)  # Sorted reads from the memory map.
      for j in order:
        i = hit[j]
        tokens[i] = self.cache['tokens'][rows[i]]
        mask[i] = self.cache['mask'][rows[i]]
        pooled[i] = self.cache['pooled'][rows[i]]
    if missing:
      miss = [i for i, r in enumerate(rows) if r is None]
      t, m, p = self.fallback.encode_text([prompts[i] for i in miss])
      tokens[miss], mask[miss], pooled[miss] = t, m, p
    return tokens, mask, pooled
