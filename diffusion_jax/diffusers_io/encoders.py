"""The frozen encoders of diffusers pipelines (transformers-layout folders) on our modules.

    enc = load_text_encoder('karlo/text_encoder', 'clip')     # CLIPTextModelWithProjection
    out = encode_prompts(enc, ['a red cube'])                  # text_embed, text_tokens, text_mask
    enc = load_text_encoder('IF-I-XL/text_encoder', 't5')     # T5EncoderModel
    out = encode_prompts(enc, ['a red cube'])                  # text_tokens, text_mask
    img = load_image_encoder('karlo-image-variations/image_encoder')  # CLIPVision...Projection

`convert.load_t5` already reads IF's `text_encoder` (a T5EncoderModel folder, sharded or not);
`convert.load_clip` reads only a two-tower CLIPModel, so the single-tower folders of Karlo
(`CLIPTextModelWithProjection`, `CLIPVisionModelWithProjection`) are read here with the same
name mapping, onto our CLIP towers plus their projection.

`encode_prompts` tokenizes and encodes as the reference pipelines do:
- 'clip' (UnCLIPPipeline._encode_prompt): `max_length` = the tokenizer's model_max_length,
  padding to it, truncation; the text encoder runs WITHOUT the attention mask (the causal mask
  alone), and the prior receives the mask. text_embed is the projected pooled output.
- 't5' (IFPipeline.encode_prompt): prompts lower-cased and stripped, 77 tokens, padding,
  truncation, special tokens; the encoder runs WITH the mask, and the last hidden state is
  returned as is (padding positions are not zeroed). diffusers' `clean_caption=True` (its
  BeautifulSoup/ftfy caption cleaning) is not reproduced: diffusers itself falls back to
  lower-case and strip, with a warning, when bs4 or ftfy is not installed.
For classifier-free guidance both pipelines encode the empty caption the same way:
`encode_prompts(enc, [''] * n)`.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from diffusion_jax import convert, errors
from diffusion_jax.models import clip as clip_lib
from diffusion_jax.tokenizer import Tokenizer, load_tokenizer

# OpenAI CLIP's pixel statistics (CLIPImageProcessor's defaults), 0..1 units.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IF_MAX_LENGTH = 77  # IFPipeline.encode_prompt's fixed length
KINDS = ('clip', 't5')
# model_type of each single-tower transformers folder.
_MODEL_TYPES = {'clip': 'clip_text_model', 't5': 't5', 'clip_vision': 'clip_vision_model'}


class CLIPTextWithProjection(nn.Module):
  """transformers' CLIPTextModelWithProjection on our `CLIPTextTower`: last hidden state,
  pooled state and its projection (`text_embeds`)."""
  text: Any
  embed_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    object.__setattr__(self, 'text', clip_lib._frozen_fields(self.text))
    super().__post_init__()

  @nn.compact
  def __call__(self, input_ids_BL, attention_mask_BL=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    hidden_BLD, pooled_BD = clip_lib.CLIPTextTower(**dict(self.text), **kw,
                                                   name='text_model')(input_ids_BL,
                                                                      attention_mask_BL)
    proj = clip_lib._dense(self.embed_dim, -1, ('embed', None), self.dtype, self.param_dtype,
                           'text_projection', use_bias=False)
    return dict(last_hidden_state=hidden_BLD, pooled=pooled_BD,
                text_embeds=proj(pooled_BD.astype(self.dtype)))


class CLIPVisionWithProjection(nn.Module):
  """transformers' CLIPVisionModelWithProjection on our `CLIPVisionTower` (pixels NHWC,
  already normalised): last hidden state, pooled state and `image_embeds`."""
  vision: Any
  embed_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    object.__setattr__(self, 'vision', clip_lib._frozen_fields(self.vision))
    super().__post_init__()

  @nn.compact
  def __call__(self, pixels_BHWC):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    hidden_BLD, pooled_BD = clip_lib.CLIPVisionTower(**dict(self.vision), **kw,
                                                     name='vision_model')(pixels_BHWC)
    proj = clip_lib._dense(self.embed_dim, -1, ('embed', None), self.dtype, self.param_dtype,
                           'visual_projection', use_bias=False)
    return dict(last_hidden_state=hidden_BLD, pooled=pooled_BD,
                image_embeds=proj(pooled_BD.astype(self.dtype)))


@dataclasses.dataclass
class Encoder:
  """A loaded encoder: our module, its params and (text encoders) the pipeline's tokenizer."""
  kind: str                       # 'clip' | 't5' | 'clip_vision'
  module: nn.Module
  params: Any
  tokenizer: Tokenizer | None = None
  image_mean: tuple[float, ...] | None = None  # clip_vision: pixel statistics, 0..1 units
  image_std: tuple[float, ...] | None = None


def _config(folder: str, kind: str) -> dict[str, Any]:
  cfg = convert.read_config(folder)
  where = convert.config_path(folder)
  model_type = cfg.get('model_type')
  if model_type != _MODEL_TYPES[kind]:
    raise errors.InputError(f'{where}: model_type={model_type!r}; the {kind!r} loader reads '
                            f'model_type {_MODEL_TYPES[kind]!r} (give the matching kind)')
  return cfg


def _tower_rules(tower: str, projection: str) -> list[convert.Rule]:
  """convert.clip_rules restricted to one tower and its projection."""
  return [r for r in convert.clip_rules() if r.target[0] in (tower, projection)]


def _load_tower(folder: str, kind: str):
  cfg = _config(folder, kind)
  where = convert.config_path(folder)
  tower = 'text' if kind == 'clip' else 'vision'
  sub = {'text_config' if tower == 'text' else 'vision_config': cfg}
  convert.check_config_fields(cfg, where, convert.CLIP_TEXT_FIELDS if tower == 'text'
                              else convert.CLIP_VISION_FIELDS)
  try:
    fields = clip_lib.config_from_hf({**sub, 'projection_dim': cfg.get('projection_dim', 512)})
  except ValueError as e:
    raise errors.InputError(f'{where}: {e}') from None
  if tower == 'text':
    module = CLIPTextWithProjection(fields['text'], fields['embed_dim'])
    length = fields['text']['max_length']
    init = lambda: module.init(jax.random.key(0), jnp.zeros((1, length), jnp.int32))
    rules = _tower_rules('text_model', 'text_projection')
  else:
    v = fields['vision']
    module = CLIPVisionWithProjection(v, fields['embed_dim'])
    px = jnp.zeros((1, v['image_size'], v['image_size'], v['channels']))
    init = lambda: module.init(jax.random.key(0), px)
    rules = _tower_rules('vision_model', 'visual_projection')
  template = traverse_util.flatten_dict(nn.meta.unbox(jax.eval_shape(init)['params']))
  params = convert.assemble(convert.read_weights(folder), rules, template,
                            ignore=convert.CLIP_IGNORE, what=f'{kind} weights in {folder}')
  return module, params


def _sibling(folder: str, name: str) -> str:
  return os.path.join(os.path.dirname(os.path.abspath(folder)), name)


def load_text_encoder(folder: str, kind: str, tokenizer_folder: str | None = None,
                      max_length: int | None = None) -> Encoder:
  """A pipeline's text encoder: kind 'clip' (Karlo: CLIPTextModelWithProjection) or 't5'
  (IF: T5EncoderModel), with the tokenizer of `tokenizer_folder` (default: the pipeline's
  `tokenizer` folder beside `folder`) at the pipeline's length (IF: 77; Karlo: the
  tokenizer's model_max_length)."""
  if kind not in KINDS:
    raise errors.InputError(f'text encoder kind {kind!r}: use one of {", ".join(KINDS)}')
  if kind == 't5':
    _config(folder, kind)
    module, params = convert.load_t5(folder)
  else:
    module, params = _load_tower(folder, kind)
  tok_dir = tokenizer_folder or _sibling(folder, 'tokenizer')
  if not os.path.isdir(tok_dir):
    raise errors.InputError(f'{tok_dir}: no tokenizer folder; give tokenizer_folder= (the '
                            'pipeline keeps it in tokenizer/ beside text_encoder/)')
  if max_length is None and kind == 't5':
    max_length = IF_MAX_LENGTH
  tokenizer = load_tokenizer(tok_dir, max_length or 1 << 30)
  if max_length is None:
    max_length = int(tokenizer.hf.model_max_length)
    if max_length > 1 << 20:
      raise errors.InputError(f'{tok_dir}: the tokenizer sets no model_max_length; give '
                              'max_length=')
    tokenizer = Tokenizer(tokenizer.hf, max_length)
  if kind == 'clip' and max_length > module.text['max_length']:
    raise errors.InputError(f'{tok_dir}: max_length {max_length} exceeds the text encoder\'s '
                            f'{module.text["max_length"]} positions')
  return Encoder(kind, module, params, tokenizer)


def load_image_encoder(folder: str, feature_extractor_folder: str | None = None) -> Encoder:
  """Karlo image variations' CLIPVisionModelWithProjection, with the pixel statistics of
  its `feature_extractor` folder (CLIP's when absent)."""
  module, params = _load_tower(folder, 'clip_vision')
  stats_dir = feature_extractor_folder or image_stats_folder(folder)
  mean, std = convert.read_image_stats(stats_dir, CLIP_MEAN, CLIP_STD)
  return Encoder('clip_vision', module, params, image_mean=tuple(mean), image_std=tuple(std))


def is_text_tower(folder: str) -> bool:
  """A transformers CLIPTextModel[WithProjection] folder (a pipeline's text_encoder/)."""
  path = convert.config_path(folder)
  return (os.path.isfile(path)
          and convert.read_json_object(path).get('model_type') == _MODEL_TYPES['clip'])


def load_clip_pair(text_folder: str, vision_folder: str):
  """(CLIP, params): our two-tower CLIP from a pipeline's single-tower folders (Karlo's
  text_encoder/ and an image variation pipeline's image_encoder/), so that a trainer's frozen
  encoder embeds both captions and images; the unused logit scale keeps its initial value."""
  t_cfg, v_cfg = _config(text_folder, 'clip'), _config(vision_folder, 'clip_vision')
  convert.check_config_fields(t_cfg, convert.config_path(text_folder), convert.CLIP_TEXT_FIELDS)
  convert.check_config_fields(v_cfg, convert.config_path(vision_folder),
                              convert.CLIP_VISION_FIELDS)
  dims = (t_cfg.get('projection_dim', 512), v_cfg.get('projection_dim', 512))
  if dims[0] != dims[1]:
    raise errors.InputError(f'{vision_folder}: projection_dim {dims[1]} differs from the text '
                            f'encoder\'s {dims[0]} in {text_folder}; give the image tower '
                            'trained with it')
  try:
    fields = clip_lib.config_from_hf({'text_config': t_cfg, 'vision_config': v_cfg,
                                      'projection_dim': dims[0]})
  except ValueError as e:
    raise errors.InputError(f'{text_folder}: {e}') from None
  module = clip_lib.CLIP(**fields)
  template = traverse_util.flatten_dict(clip_lib.abstract_params(module))
  tensors = {**convert.read_weights(text_folder), **convert.read_weights(vision_folder),
             'logit_scale': np.full((), fields['logit_scale_init'], np.float32)}
  params = convert.assemble(tensors, convert.clip_rules(), template, ignore=convert.CLIP_IGNORE,
                            what=f'CLIP weights in {text_folder} and {vision_folder}')
  return module, params


def image_stats_folder(vision_folder: str) -> str:
  """Where an image tower's pixel statistics are: its own preprocessor_config.json, else the
  pipeline's feature_extractor/ beside it."""
  if os.path.isfile(os.path.join(vision_folder, 'preprocessor_config.json')):
    return vision_folder
  return _sibling(vision_folder, 'feature_extractor')


def preprocess_prompts(kind: str, prompts: Sequence[str], clean_caption: bool = False
                       ) -> list[str]:
  """The text each pipeline tokenizes: IF lower-cases and strips; Karlo passes it as is."""
  if isinstance(prompts, str):
    raise TypeError('pass a list of prompts, not a single string')
  if kind == 't5':
    if clean_caption:
      raise errors.InputError('clean_caption=True (diffusers\' bs4/ftfy caption cleaning) is '
                              'not implemented; pass clean_caption=False (lower-case and strip, '
                              'what diffusers does when bs4 or ftfy is missing)')
    return [p.lower().strip() for p in prompts]
  return list(prompts)


def _forward(module, params, ids_BL, mask_BL):
  if isinstance(module, CLIPTextWithProjection):
    return jax.jit(lambda p, i: module.apply({'params': p}, i))(params, ids_BL)
  return jax.jit(lambda p, i, m: module.apply({'params': p}, i, m))(params, ids_BL, mask_BL)


def encode_prompts(encoder: Encoder, prompts: Sequence[str], *, clean_caption: bool = False,
                   rewrite: Callable[[str], str] | None = None) -> dict[str, np.ndarray]:
  """What the reference pipeline feeds its networks for `prompts`.

  'clip': text_embed [B, P] (projected pooled), text_tokens [B, L, D] (last hidden state),
  text_mask [B, L]; 't5': text_tokens [B, 77, D] and text_mask. `rewrite`, if given, runs on
  each prompt after the pipeline's own preprocessing.
  """
  if encoder.kind not in KINDS or encoder.tokenizer is None:
    raise errors.InputError(f'encode_prompts needs a text encoder, got kind {encoder.kind!r}')
  texts = preprocess_prompts(encoder.kind, prompts, clean_caption)
  if rewrite is not None:
    texts = [rewrite(t) for t in texts]
  ids_BL, mask_BL = encoder.tokenizer(texts)
  out = _forward(encoder.module, encoder.params, jnp.asarray(ids_BL), jnp.asarray(mask_BL))
  if encoder.kind == 'clip':
    return dict(text_embed=np.asarray(out['text_embeds'], np.float32),
                text_tokens=np.asarray(out['last_hidden_state'], np.float32),
                text_mask=mask_BL)
  hidden_BLD = out[0] if isinstance(out, (tuple, list)) else out
  return dict(text_tokens=np.asarray(hidden_BLD, np.float32), text_mask=mask_BL)


def encode_images(encoder: Encoder, images_BHWC) -> np.ndarray:
  """image_embeds [B, P] of images already at the tower's size: uint8 (0..255) or float in
  [0, 1], rescaled and normalised as CLIPImageProcessor does (no resize or crop here)."""
  if encoder.kind != 'clip_vision':
    raise errors.InputError(f'encode_images needs an image encoder, got kind {encoder.kind!r}')
  x = np.asarray(images_BHWC)
  size = encoder.module.vision['image_size']
  if x.ndim != 4 or x.shape[1:3] != (size, size):
    raise errors.InputError(f'images of shape {x.shape}: give [B, {size}, {size}, C] (resize '
                            'and center-crop first)')
  x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
  mean = np.asarray(encoder.image_mean, np.float32)
  std = np.asarray(encoder.image_std, np.float32)
  pixels = (x - mean) / std
  out = jax.jit(lambda p, px: encoder.module.apply({'params': p}, px))(encoder.params,
                                                                       jnp.asarray(pixels))
  return np.asarray(out['image_embeds'], np.float32)
