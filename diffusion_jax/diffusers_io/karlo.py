"""Kakao Brain's Karlo (a diffusers `UnCLIPPipeline` directory) as our unCLIP cascade.

    DIR/model_index.json        UnCLIPPipeline | UnCLIPImageVariationPipeline
    DIR/prior/ + prior_scheduler/                    PriorTransformer (text pipeline only)
    DIR/decoder/ + text_proj/ + decoder_scheduler/   UNet2DConditionModel + UnCLIPTextProjModel
    DIR/super_res_first/ + super_res_last/ + super_res_scheduler/   UNet2DModel (x2)
    DIR/text_encoder/ + tokenizer/                   CLIPTextModelWithProjection
    DIR/image_encoder/ + feature_extractor/          CLIPVisionModelWithProjection (variations)

Unlike a DeepFloyd IF directory (one stage), one Karlo directory is the whole cascade:
`stage_configs` builds the stage configs of 'prior', 'decoder' and 'super_res' from the
components' configs (networks from their config.json, noise process and sampler from their
scheduler's, each sampler with the pipeline's `__call__` defaults), and `load_stage` maps a
stage's weights with the existing converters. What the stages read, as the reference
pipeline feeds them:
- prior: the CLIP text encoder's last hidden state (padding kept, encoder run without the
  mask), the tokenizer's mask, its projected pooled output (raw, not normalised), the empty
  prompt's encoding for guidance; it samples in the normalised space of its clip_mean /
  clip_std, which the pipeline undoes after the last step (`load_stage` returns them).
- decoder: the same text inputs plus the (de-normalised) image embedding, through its
  text_proj; guidance drops both the caption (to the empty prompt's) and the image embedding
  (to the learned null one).
- super_res: the decoder's image, upsampled bicubically by the network; the last step (the
  schedule's step 0) runs super_res_last when its weights differ from super_res_first's.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from diffusion_jax import convert, errors
from diffusion_jax.diffusers_io import encoders as dio_encoders
from diffusion_jax.diffusers_io import pipeline as dio_pipeline
from diffusion_jax.diffusers_io import prior as dio_prior
from diffusion_jax.diffusers_io import scheduler as dio_scheduler
from diffusion_jax.diffusers_io import unet as dio_unet

PIPELINES = {'UnCLIPPipeline': ('prior', 'decoder', 'super_res'),
             'UnCLIPImageVariationPipeline': ('decoder', 'super_res')}
# The pipelines' `__call__` defaults: steps and guidance scale of each stage.
SAMPLING = {'prior': dict(num_steps=25, guidance_scale=4.0),
            'decoder': dict(num_steps=25, guidance_scale=8.0),
            'super_res': dict(num_steps=7, guidance_scale=1.0)}
SCHEDULERS = {'prior': 'prior_scheduler', 'decoder': 'decoder_scheduler',
              'super_res': 'super_res_scheduler'}
NETWORKS = {'prior': 'prior', 'decoder': 'decoder', 'super_res': 'super_res_first'}
# The component folders `--config.init_from=DIR/<component>` fine-tunes, and their stage.
FINE_TUNABLE = {'decoder': 'decoder', 'super_res_first': 'super_res',
                'super_res_last': 'super_res'}


def is_karlo_dir(path: str) -> bool:
  """A diffusers unCLIP pipeline directory (text-to-image or image variations)."""
  return os.path.isdir(path) and dio_pipeline.model_class(path) in PIPELINES


def split_component(path: str) -> tuple[str, str] | None:
  """(Karlo directory, component) when `path` names a network folder of one (DIR/decoder,
  DIR/super_res_first, DIR/super_res_last, DIR/prior), else None."""
  root, name = os.path.split(os.path.normpath(path))
  if name in (*FINE_TUNABLE, 'prior') and is_karlo_dir(root or '.'):
    return root or '.', name
  return None


def component_config(path: str) -> dict[str, Any]:
  """The stage config that fine-tunes the component `path` names (`split_component`): its
  stage's, with a text encoder the trainer builds (the pipeline's CLIP text tower beside an
  image tower: image_encoder/ of an image variation pipeline, else text_encoder.image_path
  to be set by the run)."""
  root, name = split_component(path)
  if name == 'prior':
    raise errors.InputError(
        f'{path}: fine-tuning Karlo\'s prior is not supported (it samples in the space of its '
        'clip_mean/clip_std, which our prior does not train in); fine-tune decoder, '
        'super_res_first or super_res_last')
  if FINE_TUNABLE[name] not in stage_names(root):
    raise errors.InputError(f'{path}: {dio_pipeline.model_class(root)} has no {name}/ to '
                            'fine-tune')
  return stage_config(root, FINE_TUNABLE[name])


def component_params(path: str, model: dict[str, Any]) -> dict:
  """Our parameter tree (numpy) of the component `path` names; of a super-res component, that
  folder's network alone."""
  root, name = split_component(path)
  if name == 'decoder':
    return load_stage(root, 'decoder', model)[0]
  kwargs = {k: v for k, v in model.items() if k != 'name'}
  return dio_unet.convert_unet(_weights(root, name), kwargs, what=os.path.join(root, name))


def stage_names(path: str) -> tuple[str, ...]:
  cls = dio_pipeline.model_class(path)
  if cls not in PIPELINES:
    index = os.path.join(path, dio_pipeline.MODEL_INDEX)
    raise errors.InputError(f'{index}: _class_name={cls!r}; a Karlo directory is one of '
                            f'{", ".join(PIPELINES)}')
  return PIPELINES[cls]


def text_length(path: str) -> int:
  """The tokenizer's model_max_length: the length every prompt is padded to."""
  cfg_file = os.path.join(dio_pipeline.component(path, 'tokenizer'), 'tokenizer_config.json')
  length = convert.read_json_object(cfg_file).get('model_max_length')
  if not isinstance(length, int) or not 0 < length < 1 << 20:
    raise errors.InputError(f'{cfg_file}: model_max_length={length!r}; give the CLIP text '
                            'length (77 for Karlo)')
  return length


def _config(folder: str) -> dict[str, Any]:
  return convert.read_json_object(os.path.join(folder, 'config.json'))


def _sections(path: str, name: str) -> tuple[dict, dict]:
  sched_file = os.path.join(dio_pipeline.component(path, SCHEDULERS[name]),
                            'scheduler_config.json')
  sched = convert.read_json_object(sched_file)
  if sched.get('_class_name', 'UnCLIPScheduler') != 'UnCLIPScheduler':
    raise errors.InputError(f'{sched_file}: _class_name={sched.get("_class_name")!r}; the '
                            'unCLIP pipelines step with UnCLIPScheduler')
  diffusion = dio_scheduler.diffusion_section(sched, sched_file)
  sampler = dio_scheduler.sampler_section(sched, SAMPLING[name]['num_steps'], sched_file)
  sampler.update(guidance_scale=SAMPLING[name]['guidance_scale'], best_of=1)
  return diffusion, sampler


def _model(path: str, name: str, num_timesteps: int) -> dict[str, Any]:
  folder = dio_pipeline.component(path, NETWORKS[name])
  where = os.path.join(NETWORKS[name], 'config.json')
  config = _config(folder)
  if name == 'prior':
    model = dio_prior.prior_kwargs(config, num_timesteps, where)
    model.update(name='prior')
    return model
  if name == 'decoder':
    text_proj = _config(dio_pipeline.component(path, 'text_proj'))
    model = dio_unet.unet_kwargs(config, where=where, text_proj_config=text_proj)
    model.update(name='unet', text_len=text_length(path))
    return model
  decoder_size = int(_config(dio_pipeline.component(path, 'decoder')).get('sample_size')
                     or 64)
  model = dio_unet.unet_kwargs(config, where=where, low_res_size=decoder_size)
  last_where = os.path.join('super_res_last', 'config.json')
  last = dio_unet.unet_kwargs(_config(dio_pipeline.component(path, 'super_res_last')),
                              where=last_where, low_res_size=decoder_size)
  last['image_size'] = model['image_size']  # the release leaves its sample_size null
  if last != model:
    diff = sorted(k for k in set(model) | set(last) if model.get(k) != last.get(k))
    raise errors.InputError(f'{last_where}: its network differs from super_res_first\'s in '
                            f'{", ".join(diff)}; only weights may differ')
  model.update(name='unet')
  return model


def stage_config(path: str, name: str) -> dict[str, Any]:
  """Our stage config (a plain dict) of one stage of a Karlo directory: the tiny unCLIP
  config's training fields with the released network, schedule and sampler."""
  from configs import unclip as unclip_configs  # noqa: PLC0415 - the config skeleton
  if name not in stage_names(path):
    raise errors.InputError(f'{path}: no stage {name!r}; it has {", ".join(stage_names(path))}')
  diffusion, sampler = _sections(path, name)
  model = _model(path, name, diffusion['num_timesteps'])
  if model.get('learned_variance', False) != diffusion['learned_variance']:
    raise errors.InputError(
        f'{SCHEDULERS[name]}/scheduler_config.json: its variance_type does not match '
        f'{NETWORKS[name]} ({"learned" if model.get("learned_variance") else "fixed"} variance)')
  skeleton = {'prior': 'prior', 'decoder': 'decoder64', 'super_res': 'up256'}[name]
  c = unclip_configs.get_config(f'stage={skeleton},size=tiny').to_dict()
  c.update(stage=name, size='released', model=model, target='image_embed'
           if name == 'prior' else 'image',
           diffusion={**c['diffusion'], **diffusion}, sampler={**c['sampler'], **sampler})
  c['text_encoder'] = _text_encoder(path) if name != 'super_res' else dict(name=None, path=None)
  c['input'].update(image_size=int(model.get('image_size') or c['input']['image_size']),
                    low_res_size=model.get('low_res_size') or None, low_res_degradation='none',
                    text_max_len=int(model.get('text_len') or text_length(path)),
                    dataset=None, modules=(), train_crop_size=None)
  c['karlo'] = dict(path=os.path.abspath(path), stage=name)
  return c


def _text_encoder(path: str) -> dict[str, Any]:
  """The text_encoder section of a CLIP-reading stage: the pipeline's towers (a sampling
  pipeline builds them itself, `load_encoders`), raw embeddings, padding kept."""
  image = os.path.join(path, 'image_encoder')
  return dict(name='clip', preset='', path=dio_pipeline.component(path, 'text_encoder'),
              tokenizer_path=dio_pipeline.component(path, 'tokenizer'),
              image_path=image if os.path.isdir(image) else None,
              max_length=text_length(path), dtype='float32', seed=0, batch_size=32,
              zero_padding=False, raw_embeddings=True)


def stage_configs(path: str) -> dict[str, dict[str, Any]]:
  """name -> stage config of every stage of the directory, in cascade order."""
  return {name: stage_config(path, name) for name in stage_names(path)}


def _weights(path: str, folder_name: str) -> dict[str, np.ndarray]:
  return dio_pipeline.component_weights(dio_pipeline.component(path, folder_name))


def load_stage(path: str, name: str, model: dict[str, Any]) -> tuple[dict, dict]:
  """(params, extras) of a stage (numpy trees): extras holds the prior's `clip_mean` /
  `clip_std` and super_res's `final_params` (super_res_last's, None when they equal
  super_res_first's)."""
  kwargs = {k: v for k, v in model.items() if k != 'name'}
  folder = dio_pipeline.component(path, NETWORKS[name])
  if name == 'prior':
    tensors = _weights(path, 'prior')
    what = f'prior weights in {folder}'
    params = dio_prior.convert_prior(tensors, kwargs, what=what)
    stats = dio_prior.clip_stats(tensors, kwargs['out_dim'] or kwargs['embed_dim'], what)
    return params, stats
  if name == 'decoder':
    params = dio_unet.convert_unet(_weights(path, 'decoder'), kwargs,
                                   text_proj_state=_weights(path, 'text_proj'), what=folder)
    return params, {}
  first = _weights(path, 'super_res_first')
  last = _weights(path, 'super_res_last')
  params = dio_unet.convert_unet(first, kwargs, what=folder)
  same = sorted(first) == sorted(last) and all(np.array_equal(first[k], last[k]) for k in first)
  final = None if same else dio_unet.convert_unet(
      last, kwargs, what=os.path.join(path, 'super_res_last'))
  return params, {'final_params': final}


def load_encoders(path: str) -> dict[str, dio_encoders.Encoder]:
  """The pipeline's frozen CLIP towers: 'text' (with its tokenizer) and, for image
  variations, 'image'."""
  folder = lambda name: dio_pipeline.component(path, name)
  out = {'text': dio_encoders.load_text_encoder(folder('text_encoder'), 'clip',
                                                folder('tokenizer'))}
  if dio_pipeline.model_class(path) == 'UnCLIPImageVariationPipeline':
    out['image'] = dio_encoders.load_image_encoder(folder('image_encoder'),
                                                   folder('feature_extractor'))
  return out
