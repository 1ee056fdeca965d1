"""A diffusers latent-diffusion pipeline directory (Stable Diffusion, DiT, PixArt-alpha) as the
pieces `pipelines.latent.LatentPipeline` samples with.

    DIR/model_index.json      StableDiffusionPipeline | StableDiffusionImg2ImgPipeline |
                              StableDiffusionInpaintPipeline | DiTPipeline | PixArtAlphaPipeline
    DIR/unet/ or DIR/transformer/    UNet2DConditionModel | DiT / PixArt transformer
    DIR/vae/                  AutoencoderKL (`latent.load_codec`)
    DIR/scheduler/            the noise process, and how to sample it
    DIR/text_encoder/ + tokenizer/   CLIPTextModel (SD) | T5EncoderModel (PixArt)

What the networks read, as the reference pipelines feed them:
- SD: the CLIP text encoder's last hidden state, run without the attention mask (SD 2.x
  bakes its penultimate layer in by saving num_hidden_layers=23, so it is the last state
  here too); the empty prompt's encoding is the unconditional branch; no token is masked.
- PixArt: T5's last hidden state at 120 tokens with its mask, prompts lower-cased and
  stripped (diffusers' clean_caption=False); the empty prompt's for guidance.
- DiT: class labels; the null class for guidance (names through model_index's id2label).

The sampler: a DDIMScheduler's config maps exactly (`scheduler.sampler_section`); a
DPMSolverMultistepScheduler's becomes our DPM-Solver++(2M) on its spacing; any other class
(SD's released PNDM) becomes DDIM on 'leading' spacing with its steps_offset, its noise
process (betas, prediction type) read as is. Our DDIM lands its last step on clean data
(diffusers' set_alpha_to_one=True).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from diffusion_jax import convert, errors, latent
from diffusion_jax.diffusers_io import dit as dio_dit
from diffusion_jax.diffusers_io import encoders as dio_encoders
from diffusion_jax.diffusers_io import pipeline as dio_pipeline
from diffusion_jax.diffusers_io import scheduler as dio_scheduler
from diffusion_jax.models import clip as clip_lib
from diffusion_jax.tokenizer import Tokenizer, load_tokenizer

# Pipeline class -> (network folder, text encoder kind or None for class labels).
PIPELINES = {'StableDiffusionPipeline': ('unet', 'clip'),
             'StableDiffusionImg2ImgPipeline': ('unet', 'clip'),
             'StableDiffusionInpaintPipeline': ('unet', 'clip'),
             'DiTPipeline': ('transformer', None),
             'PixArtAlphaPipeline': ('transformer', 't5')}
# The pipelines' `__call__` defaults: steps and guidance scale.
SAMPLING = {'StableDiffusionPipeline': dict(num_steps=50, guidance_scale=7.5),
            'StableDiffusionImg2ImgPipeline': dict(num_steps=50, guidance_scale=7.5),
            'StableDiffusionInpaintPipeline': dict(num_steps=50, guidance_scale=7.5),
            'DiTPipeline': dict(num_steps=50, guidance_scale=4.0),
            'PixArtAlphaPipeline': dict(num_steps=20, guidance_scale=4.5)}
PIXART_TEXT_LEN = 120  # PixArtAlphaPipeline's max_sequence_length


@dataclasses.dataclass
class LatentParts:
  """What a latent pipeline directory holds, loaded."""
  pipeline_class: str
  module: nn.Module            # our UNet or DiT
  params: Any
  codec: latent.Codec
  diffusion: dict              # our `diffusion` section (noise process)
  sampler: dict                # our `sampler` section (with the pipeline's defaults)
  text_encoder: dio_encoders.Encoder | None = None
  labels: dict[str, int] | None = None   # DiT: class name -> label
  num_classes: int = 0

  @property
  def text_kind(self) -> str | None:
    return PIPELINES[self.pipeline_class][1]


def is_latent_dir(path: str) -> bool:
  return os.path.isdir(path) and dio_pipeline.model_class(path) in PIPELINES


def _scheduler_sections(path: str, pipeline_class: str) -> tuple[dict, dict]:
  """(diffusion, sampler) of DIR/scheduler: the noise process of any scheduler class, the
  sampler as the module docstring says."""
  where = os.path.join(dio_pipeline.component(path, 'scheduler'), 'scheduler_config.json')
  config = convert.read_json_object(where)
  cls = str(config.get('_class_name', 'DDIMScheduler'))
  steps = SAMPLING[pipeline_class]['num_steps']
  # The noise process alone: sampler fields and a learned variance are not the noise's.
  process = {k: v for k, v in config.items()
             if k not in ('variance_type', 'clip_sample', 'thresholding', 'set_alpha_to_one')}
  diffusion = dio_scheduler.diffusion_section(dict(process, _class_name='DDPMScheduler'), where)
  if cls == 'DDIMScheduler':
    sampler = dio_scheduler.sampler_section(config, steps, where)
  else:
    spacing = str(config.get('timestep_spacing', 'leading' if cls != 'DPMSolverMultistepScheduler'
                             else 'linspace'))
    offset = int(config.get('steps_offset', 0) or 0)
    name = 'dpmpp_2m' if cls == 'DPMSolverMultistepScheduler' else 'ddim'
    if name == 'ddim' or spacing == 'leading':
      spacing = f'leading+{offset}' if offset else 'leading'
    if name == 'dpmpp_2m' and spacing != 'trailing':  # its n of n + 1 points
      spacing = f'dpm_{spacing}'
    sampler = dict(name=name, num_steps=steps, eta=0.0, guidance_scale=1.0, threshold='none',
                   percentile=99.5, threshold_max=0.0, aug_level=0.0, spacing=spacing)
  sampler['guidance_scale'] = SAMPLING[pipeline_class]['guidance_scale']
  return diffusion, sampler


def load_clip_text_model(folder: str, tokenizer_folder: str) -> dio_encoders.Encoder:
  """A transformers CLIPTextModel folder (no projection: SD's text encoder) with its
  tokenizer at its model_max_length; the projection is an unused zero matrix."""
  cfg = convert.read_config(folder)
  where = convert.config_path(folder)
  if cfg.get('model_type') != 'clip_text_model':
    raise errors.InputError(f'{where}: model_type={cfg.get("model_type")!r}; the text encoder '
                            "of a Stable Diffusion directory is a CLIPTextModel "
                            "('clip_text_model')")
  convert.check_config_fields(cfg, where, convert.CLIP_TEXT_FIELDS)
  try:
    fields = clip_lib.config_from_hf({'text_config': cfg,
                                      'projection_dim': cfg.get('projection_dim', 512)})
  except ValueError as e:
    raise errors.InputError(f'{where}: {e}') from None
  module = dio_encoders.CLIPTextWithProjection(fields['text'], fields['embed_dim'])
  length = fields['text']['max_length']
  init = lambda: module.init(jax.random.key(0), jnp.zeros((1, length), jnp.int32))
  template = traverse_util.flatten_dict(nn.meta.unbox(jax.eval_shape(init)['params']))
  tensors = dict(convert.read_weights(folder))
  if not any(k.startswith('text_model.') for k in tensors):  # newer transformers drop it
    tensors = {f'text_model.{k}': v for k, v in tensors.items()}
  width = fields['text']['width']
  if 'text_projection.weight' not in tensors:
    tensors['text_projection.weight'] = np.zeros((fields['embed_dim'], width), np.float32)
  rules = dio_encoders._tower_rules('text_model', 'text_projection')
  params = convert.assemble(tensors, rules, template, ignore=convert.CLIP_IGNORE,
                            what=f'CLIP text weights in {folder}')
  tokenizer = load_tokenizer(tokenizer_folder, 1 << 30)
  max_length = int(tokenizer.hf.model_max_length)
  if max_length > length:
    raise errors.InputError(f'{tokenizer_folder}: model_max_length {max_length} exceeds the '
                            f'text encoder\'s {length} positions')
  return dio_encoders.Encoder('clip', module, params, Tokenizer(tokenizer.hf, max_length))


def _labels(path: str) -> dict[str, int] | None:
  """DiT's class names -> labels from model_index.json's id2label (each name of a
  comma-separated entry), as DiTPipeline reads them; None without one."""
  id2label = dio_pipeline.model_index(path).get('id2label')
  if not isinstance(id2label, dict):
    return None
  out = {}
  for key, value in id2label.items():
    for name in str(value).split(','):
      out[name.strip()] = int(key)
  return out


def load(path: str) -> LatentParts:
  """Every component of a latent pipeline directory, loaded (nothing downloads)."""
  cls = dio_pipeline.model_class(path)
  if cls not in PIPELINES:
    raise errors.InputError(f'{os.path.join(path, dio_pipeline.MODEL_INDEX)}: _class_name='
                            f'{cls!r}; a latent pipeline directory is one of '
                            f'{", ".join(PIPELINES)}')
  network, text_kind = PIPELINES[cls]
  diffusion, sampler = _scheduler_sections(path, cls)
  folder = dio_pipeline.component(path, network)
  T = int(diffusion['num_timesteps'])
  encoder, labels, num_classes = None, None, 0
  if network == 'unet':
    from diffusion_jax.diffusers_io import unet as dio_unet  # noqa: PLC0415
    module, params = dio_unet.load_unet(folder)
  else:
    extra = {'text_len': PIXART_TEXT_LEN} if text_kind == 't5' else {}
    module, params = dio_dit.load_dit(folder, num_timesteps=T, **extra)
    num_classes = int(getattr(module, 'num_classes', 0) or 0)
  codec = latent.load_codec(dio_pipeline.component(path, 'vae'))
  if text_kind == 'clip':
    encoder = load_clip_text_model(dio_pipeline.component(path, 'text_encoder'),
                                   dio_pipeline.component(path, 'tokenizer'))
  elif text_kind == 't5':
    encoder = dio_encoders.load_text_encoder(dio_pipeline.component(path, 'text_encoder'),
                                             't5', dio_pipeline.component(path, 'tokenizer'),
                                             max_length=PIXART_TEXT_LEN)
  else:
    labels = _labels(path)
  diffusion['learned_variance'] = bool(getattr(module, 'learned_variance', False))
  return LatentParts(cls, module, params, codec, diffusion, sampler, encoder, labels,
                     num_classes)
