"""What training and sampling share: a stage's conditioning, its frozen encoder and tokenizer,
and its trained parameters restored without the optimizer.

- `Conditioner(config, encoder)` turns a data batch into `(x0, cond)` for the network, as the
  network's example inputs ask (`models.example_inputs`); the pipelines call its pieces
  (`text_cond`, `low_res_cond`, `image_embed`) with sampling's fixed settings.
- `build_encoder(config, mesh, rules)` and `build_tokenizer(config, encoder, stage_dir)`:
  the stage's frozen T5/CLIP and the tokenizer of whatever reads its token ids.
- `build_codec(config, stage_dir, mesh)`: a latent stage's frozen autoencoder (`latent.Codec`);
  the step then receives `latent_frozen(autoencoder_params, text_frozen)` as its `frozen`.
- `restore_stage(stage_dir)`: the config saved with the newest readable checkpoint, the
  network built from it and its EMA (or raw) parameters, laid out on the config's mesh.
  Sampling, exporting and evaluation read a stage only this way, so what was trained is what
  samples.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec

from diffusion_jax import checkpoint as ckpt_lib
from diffusion_jax import config_util, encoders, errors, latent, models, parallel, pretrained
from diffusion_jax import tokenizer as tokenizer_lib
from diffusion_jax.data import pipeline as data_pipeline
from diffusion_jax.data import registry
from diffusion_jax.diffusion import guidance, schedules
from diffusion_jax.models import autoencoder as autoencoder_lib

log = logging.getLogger(__name__)

TARGETS = ('image', 'image_embed')


# Embeddings and masks --------------------------------------------------------------------------

def l2_scaled(e_BD):
  """Unit-normalised embedding scaled by sqrt(D): unit variance per dimension, so the prior
  diffuses it like data (DALLE2-pytorch's image_embed_scale)."""
  e_BD = e_BD.astype(jnp.float32)
  norm = jnp.sqrt(jnp.maximum(jnp.sum(e_BD * e_BD, -1, keepdims=True), 1e-12))
  return e_BD / norm * math.sqrt(e_BD.shape[-1])


def random_box_masks(rng, batch: int, size: int):
  """GLIDE-style inpainting masks [B, H, W, 1]: 1 = known pixel, a random box unknown."""
  k1, k2 = jax.random.split(rng)
  lo = jax.random.randint(k1, (batch, 2), 0, size // 2)
  extent = jax.random.randint(k2, (batch, 2), size // 4, size // 2 + 1)
  hi = lo + extent
  idx = jnp.arange(size)
  inside_y = (idx[None, :] >= lo[:, :1]) & (idx[None, :] < hi[:, :1])
  inside_x = (idx[None, :] >= lo[:, 1:]) & (idx[None, :] < hi[:, 1:])
  hole = inside_y[:, :, None] & inside_x[:, None, :]
  return (~hole).astype(jnp.float32)[..., None]


# The conditioner -------------------------------------------------------------------------------

class Conditioner:
  """Turns a data batch into (x0, cond) for the network, as the network's inputs require.
  With `codec` (a latent stage) x0 is the batch images' scaled latents and `frozen` is
  `latent_frozen(autoencoder_params, text_frozen)`."""

  def __init__(self, config, encoder=None, codec=None):
    self.config = config
    self.encoder = encoder
    self.codec = codec
    if is_latent_stage(config):
      if codec is None:
        raise ValueError(f'stage {config.stage!r} trains on latents: it needs its frozen '
                         'autoencoder (build_codec)')
      check_latent_shape(config, codec)
    self.sample_posterior = bool(config_util.get(config_util.get(config, 'autoencoder', {}),
                                                 'sample_posterior', False))
    _, _, example_cond = models.example_inputs(config.model, 1)
    self.keys = frozenset(example_cond)
    self.target = config_util.get(config, 'target', 'image')
    if self.target not in TARGETS:
      raise ValueError(f'config.target={self.target!r} is not one of {TARGETS}')
    # input.text_cache: batches carry the text encoder's outputs (`cached_text_cond`).
    text_cached = bool(config_util.get(config_util.get(config, 'input', {}), 'text_cache', ''))
    needs_encoder = ('text_tokens' in self.keys or 'text_embed' in self.keys) and not text_cached
    needs_encoder |= 'image_embed' in self.keys or self.target == 'image_embed'
    if needs_encoder and encoder is None:
      raise ValueError(f'stage {config.stage!r} needs a frozen encoder (config.text_encoder)')
    self.diffusion = config.diffusion
    self.schedule = schedules.from_config(config.diffusion)
    # Karlo's networks read CLIP's projected embeddings as they are; ours, l2_scaled ones.
    te = config_util.get(config, 'text_encoder')
    self.raw_embeddings = bool(te is not None and config_util.get(te, 'raw_embeddings', False))

  def clip_embedding(self, e_BD):
    """A CLIP embedding as the networks read it: raw (text_encoder.raw_embeddings) or
    `l2_scaled`."""
    return e_BD.astype(jnp.float32) if self.raw_embeddings else l2_scaled(e_BD)

  def image_embed(self, frozen, images):
    """The frozen CLIP image embedding of images in [-1, 1], as the networks consume it."""
    return self.clip_embedding(self.encoder.image_forward(frozen, images, False))

  def text_cond(self, frozen, text_ids, text_mask) -> dict[str, Any]:
    """The text entries of cond: frozen-encoder tokens and pooled embedding, or the raw ids of
    a network that owns its text encoder."""
    cond: dict[str, Any] = {}
    if {'text_tokens', 'text_embed'} & self.keys:
      tokens, pooled = self.encoder.text_forward(frozen, text_ids, text_mask)
      if 'text_tokens' in self.keys:
        cond['text_tokens'] = tokens
        cond['text_mask'] = text_mask
      cond.update(self.null_text_cond(frozen, tokens.shape[0]))
      if 'text_embed' in self.keys:
        cond['text_embed'] = self.clip_embedding(pooled)
    if 'text_ids' in self.keys:
      cond['text_ids'] = text_ids
      cond['text_mask'] = text_mask
    return cond

  def cached_text_cond(self, frozen, batch) -> dict[str, Any]:
    """`text_cond` from a batch that carries the encoder's outputs (input.text_cache:
    text_tokens, text_mask, text_pooled); `frozen` holds the cached empty-prompt encoding."""
    cond: dict[str, Any] = {}
    if 'text_tokens' in self.keys:
      cond['text_tokens'] = batch['text_tokens']
      cond['text_mask'] = batch['text_mask']
    cond.update(self.null_text_cond(frozen, batch['text_tokens'].shape[0]))
    if 'text_embed' in self.keys:
      cond['text_embed'] = self.clip_embedding(batch['text_pooled'])
    return cond

  def null_text_cond(self, frozen, n: int) -> dict[str, Any]:
    """The encoder's output for the empty prompt, for networks whose dropped caption reads it
    (DeepFloyd IF, Karlo: their unconditional branch) instead of a learned null. Without an
    encoder (input.text_cache) `frozen` is the cached {'tokens', 'mask', 'pooled'} of it."""
    wanted = {'null_text_tokens', 'null_text_mask', 'null_text_embed'} & self.keys
    if not wanted:
      return {}
    if self.encoder is None:
      tokens, mask, pooled = frozen['tokens'], frozen['mask'], frozen['pooled']
    else:
      ids, mask = self.encoder.tokenize([''])
      tokens, pooled = self.encoder.text_forward(frozen, jnp.asarray(ids), jnp.asarray(mask))
    null = {'null_text_tokens': tokens, 'null_text_mask': jnp.asarray(mask, bool),
            'null_text_embed': self.clip_embedding(pooled)}
    return {k: jnp.broadcast_to(null[k], (n,) + null[k].shape[1:]) for k in wanted}

  def low_res_cond(self, low_res, rng, aug_t_B=None, blur_sigma: float | None = None,
                   aug_noise=None) -> dict[str, Any]:
    """`low_res` (blurred, then noise-augmented, when the stage trains so) and `aug_t`.
    Training draws the blur and the level (aug_t_B None); sampling passes the fixed level
    (0: clean) and `blur_sigma` (low-res pixels; 0 or None: no blur). With
    `model.low_res_upsampled` (DeepFloyd IF stage II) the image is upsampled to the
    output size before its noise; `aug_noise` is that noise when given."""
    low_res = low_res.astype(jnp.float32)
    n = low_res.shape[0]
    k_blur = jax.random.fold_in(rng, 0xB1)  # rng itself stays the noise augmentation's
    blur_max = float(config_util.get(self.diffusion, 'low_res_blur_max', 0.0))
    if aug_t_B is None and blur_max > 0:
      low_res = guidance.blur_augment(low_res, k_blur, max_sigma=blur_max)
    elif aug_t_B is not None and blur_sigma:
      low_res = guidance.blur_augment(low_res, k_blur, float(blur_sigma),
                                      max_sigma=float(blur_sigma))
    if config_util.get(self.config.model, 'low_res_upsampled', False):
      size = int(self.config.model.image_size)
      method = config_util.get(self.config.model, 'low_res_resize', 'bilinear')
      low_res = models.unet.upsample_low_res(low_res, size, size, method)
    fixed_zero = isinstance(aug_t_B, (int, float)) and aug_t_B <= 0
    if config_util.get(self.diffusion, 'noise_aug', False) and not fixed_zero:
      low_res, aug_t = guidance.noise_augment(
          low_res, rng, self.schedule, aug_t_B,
          max_level=float(config_util.get(self.diffusion, 'noise_aug_max', 1.0)),
          noise=None if aug_noise is None else aug_noise.astype(jnp.float32))
    else:
      aug_t = jnp.zeros((n,), jnp.float32)
    cond = {'low_res': low_res}
    if 'aug_t' in self.keys:
      cond['aug_t'] = aug_t
    return cond

  def latents(self, autoencoder_params, images, rng):
    """The scaled latents of images in [-1, 1]: a posterior sample (autoencoder.
    sample_posterior) drawn with `rng`, else the posterior mean."""
    return self.codec.encode(autoencoder_params, images.astype(jnp.float32),
                             rng if self.sample_posterior else None)

  def __call__(self, batch, frozen, rng):
    autoencoder_params = None
    if self.codec is not None:
      autoencoder_params, frozen = frozen[LATENT_FROZEN[0]], frozen[LATENT_FROZEN[1]]
    k_text, k_image, k_aug, k_mask = jax.random.split(rng, 4)
    image = batch['image'].astype(jnp.float32)
    n = image.shape[0]
    if 'text_tokens' in batch:  # input.text_cache
      cond: dict[str, Any] = self.cached_text_cond(frozen, batch)
    else:
      cond = self.text_cond(frozen, batch.get('text_ids'), batch.get('text_mask'))
    if 'image_embed' in self.keys:
      cond['image_embed'] = self.image_embed(frozen, image)
    if 'drop_text' in self.keys:
      p = float(config_util.get(self.diffusion, 'cond_drop_text', 0.0))
      cond['drop_text'] = jax.random.bernoulli(k_text, p, (n,))
    if 'drop_image' in self.keys:
      p = float(config_util.get(self.diffusion, 'cond_drop_image', 0.0))
      cond['drop_image'] = jax.random.bernoulli(k_image, p, (n,))
    if 'low_res' in self.keys:
      cond.update(self.low_res_cond(batch['low_res'], k_aug))
    if 'inpaint_mask' in self.keys:
      mask = random_box_masks(k_mask, n, image.shape[1])
      cond['inpaint_mask'] = mask
      cond['inpaint_image'] = image * mask
    x0 = self.image_embed(frozen, image) if self.target == 'image_embed' else image
    if self.codec is not None:
      x0 = self.latents(autoencoder_params, image, jax.random.fold_in(rng, 0x1A7E))
    return x0, cond


# The frozen autoencoder of a latent stage ------------------------------------------------------

# The keys of a latent stage's `frozen`: the autoencoder's parameters, and what the stage's
# text conditioning reads (the text encoder's parameters, a text cache's empty prompt, None).
LATENT_FROZEN = ('autoencoder', 'text')


def latent_frozen(autoencoder_params, text_frozen):
  """A latent stage's `frozen` argument of the train step."""
  return {LATENT_FROZEN[0]: autoencoder_params, LATENT_FROZEN[1]: text_frozen}


def is_latent_stage(config) -> bool:
  """A stage that trains diffusion on a frozen autoencoder's latents (an `autoencoder`
  section), not the autoencoder itself."""
  return (config_util.get(config, 'autoencoder') is not None and
          config_util.get(config, 'objective', 'diffusion') != 'autoencoder')


def autoencoder_path(config, stage_dir: str | None) -> str:
  """`autoencoder.path`, or the `autoencoder` stage beside `stage_dir` (ROOT/autoencoder)."""
  path = config_util.get(config.autoencoder, 'path')
  if path:
    return path
  if not stage_dir:
    raise errors.InputError('the latent stage needs --config.autoencoder.path=DIR (a diffusers '
                            'AutoencoderKL folder, a pipeline directory with vae/, or a '
                            'trained autoencoder stage ROOT/autoencoder)')
  return os.path.join(os.path.dirname(os.path.abspath(stage_dir)), 'autoencoder')


def build_codec(config, stage_dir: str | None = None, mesh=None) -> latent.Codec | None:
  """A latent stage's frozen autoencoder (None for other stages): a diffusers AutoencoderKL
  folder or pipeline directory (`latent.load_codec`), or an autoencoder stage trained here
  (`restore_stage`, its EMA parameters), in its latent space with `autoencoder.scaling_factor`
  / `shift_factor` overriding it where set; parameters replicated on `mesh`."""
  if not is_latent_stage(config):
    return None
  path = autoencoder_path(config, stage_dir)
  flag = f'--config.autoencoder.path={path}'
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    try:
      stage = restore_stage(path, name='autoencoder')
    except FileNotFoundError:
      raise errors.InputError(f'{flag}: its checkpoints/ holds no checkpoint; train it first '
                              '(--config=configs/latent.py:stage=autoencoder)') from None
    if not isinstance(stage.model, autoencoder_lib.AutoencoderKL):
      raise errors.InputError(f'{flag}: that stage trains model {stage.config.model.name!r}, '
                              'not an autoencoder')
    codec = latent.Codec(stage.model, stage.params, latent.LatentSpace.of(stage.model))
  elif os.path.isdir(path):
    try:
      codec = latent.load_codec(path)
    except (OSError, ValueError, KeyError) as e:
      if isinstance(e, errors.InputError):
        raise
      raise errors.InputError(f'{flag}: not a diffusers AutoencoderKL folder ({e})') from None
  else:
    raise errors.InputError(f'{flag}: no such directory; give a diffusers AutoencoderKL folder, '
                            'a pipeline directory with vae/, or a trained autoencoder stage '
                            '(train it with --config=configs/latent.py:stage=autoencoder)')
  overrides = {k: float(v) for k in ('scaling_factor', 'shift_factor')
               if (v := config_util.get(config.autoencoder, k)) is not None}
  space = dataclasses.replace(codec.space, **overrides) if overrides else codec.space
  params = codec.params
  if mesh is not None:
    params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
  return latent.Codec(codec.module, params, space)


def check_latent_shape(config, codec: latent.Codec) -> None:
  """The network is built for the latents the autoencoder makes of the stage's images."""
  pixels = int(config.input.image_size)
  f, channels = codec.downsample_factor, codec.latent_channels
  if pixels % f:
    raise errors.InputError(f'--config.input.image_size={pixels}: must be a multiple of the '
                            f"autoencoder's downsample factor {f}")
  side = pixels // f
  m = config.model
  got = (int(config_util.get(m, 'image_size', 0)), int(config_util.get(m, 'in_channels', 0)),
         int(config_util.get(m, 'out_channels', 0)))
  if got != (side, channels, channels):
    raise errors.InputError(
        f'--config.model.image_size={got[0]}, in_channels={got[1]}, out_channels={got[2]}: the '
        f'autoencoder makes {side}x{side}x{channels} latents of input.image_size={pixels} px; '
        f'set model.image_size={side}, model.in_channels=model.out_channels={channels}')


# Frozen encoder and tokenizer -------------------------------------------------------------------

def build_encoder(config, mesh, rules):
  """The stage's frozen encoder (T5 or CLIP), or None when the stage needs none."""
  te = config_util.get(config, 'text_encoder')
  if te is None or not config_util.get(te, 'name'):
    return None
  # Fields the stage leaves unset keep encoder_config's defaults.
  sizes = {k: config_util.get(te, k) for k in ('max_length', 'batch_size')}
  cfg = encoders.encoder_config(
      te.name, config_util.get(te, 'preset', 'tiny'), config_util.get(te, 'path'),
      tokenizer_path=config_util.get(te, 'tokenizer_path'),
      image_path=config_util.get(te, 'image_path'),
      seed=int(config_util.get(te, 'seed', config.seed)),
      dtype=config_util.get(te, 'dtype', 'float32'),
      zero_padding=bool(config_util.get(te, 'zero_padding', True)),
      **{k: int(v) for k, v in sizes.items() if v is not None})
  return encoders.build_encoder(cfg, mesh, rules)


def tokenizer_source(config, encoder) -> str | None:
  """Where a stage's tokenizer comes from: `text_encoder.tokenizer_path`, else the frozen
  encoder's own directory (`text_encoder.path`), else the tokenizer that comes with the
  registered dataset (a prepared folder's), else None (the dataset's vocabulary)."""
  te = config_util.get(config, 'text_encoder')
  path = config_util.get(te, 'tokenizer_path') if te is not None else None
  if not path and encoder is not None and encoder.tokenizer is not None:
    path = config_util.get(te, 'path')
  dataset = config_util.get(config.input, 'dataset')
  if not path and dataset:
    tokenizer_fn = registry.dataset(dataset).tokenizer_fn
    path = tokenizer_fn(config.input) if tokenizer_fn else None
  return path


def build_tokenizer(config, encoder, stage_dir: str, *, keep: bool = False):
  """The tokenizer of whatever reads `text_ids`, applying the stage's `input.caption_rewrite`
  so that the trainer and the pipelines tokenize alike.

  A stage keeps the tokenizer it trains with in its directory (`ROOT/<stage>/tokenizer`,
  written at its first step: `keep=True`, the trainer) and reads it from there ever after,
  sampling included, so a tokenizer directory changed or removed later cannot change what a
  trained stage's prompts mean. What is kept: `tokenizer_source`'s tokenizer, else a
  word-level tokenizer of the registered dataset's vocabulary (procedural captions, offline).
  """
  max_len = int(config.input.text_max_len)
  rewrite = data_pipeline.caption_rewrite(config.input)
  out = os.path.join(stage_dir, 'tokenizer')
  source = tokenizer_source(config, encoder)
  if not os.path.isfile(os.path.join(out, 'tokenizer_config.json')):
    if not keep:
      if source:  # a stage trained before stages kept their tokenizer
        return tokenizer_lib.load_tokenizer(source, max_len, rewrite=rewrite)
      raise FileNotFoundError(f'no tokenizer in {out}: the stage writes it when it trains')
    if jax.process_index() == 0:
      _keep_tokenizer(config, source, out, max_len)
    sync_processes('tokenizer')
  return tokenizer_lib.load_tokenizer(out, max_len, rewrite=rewrite)


def _keep_tokenizer(config, source: str | None, out: str, max_len: int) -> None:
  """Writes the stage's tokenizer into `out` (whole or not at all)."""
  tmp = f'{out}.tmp{os.getpid()}'
  if source:
    tokenizer_lib.load_tokenizer(source, max_len).hf.save_pretrained(tmp)
  else:
    te = config_util.get(config, 'text_encoder')
    dataset = config_util.get(config.input, 'dataset')
    entry = registry.dataset(dataset) if dataset else None
    if entry is None or not entry.vocabulary:
      prepared = (' (its prepared data holds none: is it prepared in input.data_dir?)'
                  if entry is not None and entry.tokenizer_fn else '')
      raise errors.InputError(
          f'no tokenizer for input.dataset={dataset!r}{prepared}: set '
          '--config.text_encoder.tokenizer_path (or text_encoder.path) to a local '
          'transformers tokenizer directory')
    style = config_util.get(te, 'tokenizer_style') if te is not None else None
    if not style:  # the conventions of the frozen encoder that reads the ids
      style = 'clip' if te is not None and config_util.get(te, 'name') == 'clip' else 't5'
    tokenizer_lib.build_word_tokenizer(entry.vocabulary, tmp, style=style)
  if os.path.isdir(out):  # a partial copy left by a killed run
    shutil.rmtree(out)
  os.replace(tmp, out)


def sync_processes(name: str):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


# Parameters ------------------------------------------------------------------------------------

def init_params_fn(config, model: nn.Module):
  """`init(key) -> boxed params` of the stage's network, from its example inputs."""
  x, t, cond = models.example_inputs(config.model, 1)

  def init(key):
    return model.init({'params': key, 'dropout': key}, x, t, cond)['params']
  return init


def abstract_params(config, model: nn.Module, mesh, rules):
  """The parameters' shapes, dtypes and shardings (from their logical names); no memory."""
  boxed = jax.eval_shape(init_params_fn(config, model), jax.random.PRNGKey(0))
  shardings = parallel.logical_shardings(boxed, mesh, rules)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      nn.meta.unbox(boxed), shardings)


# Restoring a trained stage ---------------------------------------------------------------------

# Fields that decide what a stage computes: a caller's config that differs from the saved one
# here would sample another model than the one trained.
WEIGHT_FIELDS = ('model', 'diffusion', 'text_encoder', 'objective', 'target', 'input.dataset',
                 'input.modules', 'input.image_size', 'input.low_res_size',
                 'input.text_max_len', 'input.caption_rewrite')


# Leaves that set how a network runs (precision, memory), not what its weights mean.
EXECUTION_LEAVES = ('dtype', 'param_dtype', 'remat_policy', 'cpu_kernels', 'batch_size')
# What a resumed run may change freely beside them: fine-tuning on other data or sizes.
RESUMABLE_FIELDS = ('input.dataset', 'input.modules', 'input.image_size')


def meaning_changes(saved, other) -> list[str]:
  """`config_differences` in what the weights mean (network, diffusion, encoder, objective),
  execution settings and the data excepted: what resuming a checkpoint must not change
  silently."""
  fields = tuple(f for f in WEIGHT_FIELDS if f not in RESUMABLE_FIELDS)
  return [line for line in config_differences(saved, other, fields)
          if line.split(':', 1)[0].rsplit('.', 1)[-1] not in EXECUTION_LEAVES]


def config_from_saved(saved: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A stage config from the dict a checkpoint saved (JSON lists back to tuples)."""
  def freeze(v):
    if isinstance(v, Mapping):
      return {k: freeze(x) for k, x in v.items()}
    if isinstance(v, list):
      return tuple(freeze(x) for x in v)
    return v
  return ml_collections.ConfigDict(freeze(dict(saved)))


def config_differences(saved, other, fields=WEIGHT_FIELDS) -> list[str]:
  """`key: saved -> other` for each leaf under `fields` where the two configs differ."""
  a, b = config_util.flatten(saved), config_util.flatten(other)
  keys = sorted(k for k in set(a) | set(b)
                if any(k == f or k.startswith(f + '.') for f in fields))
  return [f'{k}: {a.get(k)!r} (trained) vs {b.get(k)!r}' for k in keys if a.get(k) != b.get(k)]


@dataclasses.dataclass
class TrainedStage:
  """A trained stage as sampling sees it: its saved config, network and parameters."""
  config: ml_collections.ConfigDict
  step: int
  model: nn.Module
  mesh: Any
  rules: Any
  params: Any


def restore_stage(stage_dir: str, *, use_ema: bool = True, expected=None,
                  name: str = '') -> TrainedStage:
  """The newest readable checkpoint of `stage_dir` with the config saved beside it.

  `expected`: the config the caller would build the stage from; where it differs from the
  saved one in what the weights mean (`WEIGHT_FIELDS`) a warning lists the fields, and the
  saved config is used. A checkpoint with no saved config is restored with `expected`.
  Raises FileNotFoundError, naming the directory, when there is no checkpoint at all.
  """
  reader = ckpt_lib.Checkpointer(os.path.join(stage_dir, 'checkpoints'), read_only=True)
  which = 'ema_params' if use_ema else 'params'
  label = name or stage_dir

  def restore(step):
    saved = reader.saved_config(step)
    if saved is None:
      if expected is None:
        raise ValueError(f'checkpoint step {step} saved no config and none was given')
      log.warning('stage %r: checkpoint step %d saved no config; using the caller\'s', label,
                  step)
      config = expected
    else:
      config = config_from_saved(saved)
    registry.import_modules(config_util.get(config.input, 'modules'))
    model = models.build(config.model)
    mesh = parallel.create_mesh(config.mesh)
    rules = parallel.logical_rules(config.mesh)
    params = reader.restore_subtree(step, which, abstract_params(config, model, mesh, rules))
    return TrainedStage(config, step, model, mesh, rules, params)

  try:
    stage = reader.restore_newest(restore)
  finally:
    reader.close()
  if stage is None:
    raise FileNotFoundError(f'stage {label!r}: no checkpoint in {reader.directory}; train it '
                            'first')
  if expected is not None:
    diffs = config_differences(stage.config, expected)
    if diffs:
      log.warning('stage %r is sampled with the config saved in its checkpoint (step %d), '
                  'which differs from the one given: %s', label, stage.step, '; '.join(diffs))
  return stage


def load_pretrained_stage(stage_dir: str) -> TrainedStage:
  """A pretrained stage directory (`pretrained`: config.json + model.safetensors) as sampling
  and fine-tuning see it: its config, network and parameters, laid out on the config's mesh."""
  config = config_from_saved(pretrained.read_config(stage_dir))
  registry.import_modules(config_util.get(config_util.get(config, 'input', {}), 'modules'))
  try:
    model = models.build(config.model)
  except (ValueError, KeyError, AttributeError, TypeError) as e:
    raise errors.InputError(f'{os.path.join(stage_dir, pretrained.CONFIG_FILE)}: its model '
                            f'section does not build a network ({e})') from None
  mesh = parallel.create_mesh(config.mesh)
  rules = parallel.logical_rules(config.mesh)
  abstract = abstract_params(config, model, mesh, rules)
  host = pretrained.read_params(stage_dir, abstract, config.model.to_dict())
  params = jax.tree.map(lambda a, spec: jax.device_put(a.astype(spec.dtype), spec.sharding),
                        host, abstract)
  return TrainedStage(config, 0, model, mesh, rules, params)
