"""A diffusers-layout pipeline directory as pretrained stages (`diffusion_jax.pretrained`).

    DIR/model_index.json            the pipeline class and its components
    DIR/unet/config.json + diffusion_pytorch_model[.fp16].safetensors (or sharded)
    DIR/scheduler/scheduler_config.json
    DIR/text_encoder/, DIR/tokenizer/   transformers layout (T5 for DeepFloyd IF)

A DeepFloyd IF pipeline directory (`IFPipeline`: stage I, 64 px; `IFSuperResolutionPipeline`:
stage II, 64 -> 256 px) is one stage of our Imagen family: its stage config is built here
from the components' configs (the network from unet/config.json, the noise process and
sampler from the scheduler's, the frozen T5 read from text_encoder/ and tokenizer/), and its
U-Net weights are mapped into our parameter tree when the stage is loaded. Nothing is
written and nothing downloads; pickled weights are refused.
"""
from __future__ import annotations

import os
from typing import Any

from diffusion_jax import convert, errors
from diffusion_jax.diffusers_io import scheduler as dio_scheduler

MODEL_INDEX = 'model_index.json'
# The pipeline classes read here -> (our family, the stage's role).
IF_PIPELINES = {'IFPipeline': 'base', 'IFSuperResolutionPipeline': 'sr'}
# Their `__call__` defaults: steps, guidance scale (and stage II's noise level of 1000).
IF_SAMPLING = {'base': dict(num_steps=100, guidance_scale=7.0),
               'sr': dict(num_steps=50, guidance_scale=4.0)}
IF_NOISE_LEVEL = 250
IF_TEXT_LEN = 77  # the IF pipelines pad every prompt to 77 T5 tokens
WEIGHT_NAMES = ('diffusion_pytorch_model.safetensors', 'diffusion_pytorch_model.fp16.safetensors')


def is_pipeline_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, MODEL_INDEX))


def model_index(path: str) -> dict[str, Any]:
  return convert.read_json_object(os.path.join(path, MODEL_INDEX))


def pipeline_class(path: str) -> str:
  cls = str(model_index(path).get('_class_name', ''))
  if cls not in IF_PIPELINES:
    raise errors.InputError(f'{os.path.join(path, MODEL_INDEX)}: _class_name={cls!r} is not '
                            f'supported; pipelines read here: {", ".join(IF_PIPELINES)}')
  return cls


def _component(path: str, name: str) -> str:
  folder = os.path.join(path, name)
  if not os.path.isdir(folder):
    raise errors.InputError(f'{path}: no {name}/ folder; a {pipeline_class(path)} directory '
                            f'holds {name}/ (save it with save_pretrained)')
  return folder


def component_weights(folder: str) -> dict:
  """A diffusers component's tensors: the float32 file, else the fp16 variant, else shards."""
  names = set(os.listdir(folder))
  for name in WEIGHT_NAMES:
    if name in names:
      return {k: v.astype('float32') for k, v in
              convert.read_weights(os.path.join(folder, name)).items()}
  return {k: v.astype('float32') for k, v in convert.read_weights(folder).items()}


def stage_config(path: str) -> dict[str, Any]:
  """Our stage config (a plain dict, as `pretrained.read_config` returns) of a pipeline dir:
  the Imagen paper config's training fields with the released network, schedule, sampler
  and T5."""
  from configs import imagen as imagen_configs  # noqa: PLC0415 - the paper skeleton
  from diffusion_jax.diffusers_io import unet as dio_unet  # noqa: PLC0415
  role = IF_PIPELINES[pipeline_class(path)]
  unet_dir = _component(path, 'unet')
  unet_file = os.path.join(unet_dir, 'config.json')
  model = dict(dio_unet.unet_kwargs(convert.read_json_object(unet_file), where=unet_file))
  model.update(name='unet', text_len=IF_TEXT_LEN)
  sched_file = os.path.join(_component(path, 'scheduler'), 'scheduler_config.json')
  sched_cfg = convert.read_json_object(sched_file)
  diffusion = dio_scheduler.diffusion_section(sched_cfg, sched_file)
  if model['learned_variance'] != diffusion['learned_variance']:
    if sched_cfg.get('_class_name') != 'DDIMScheduler':  # DDIM never reads a variance
      raise errors.InputError(
          f'{sched_file}: variance_type={sched_cfg.get("variance_type")!r} but the U-Net '
          f'{"predicts" if model["learned_variance"] else "does not predict"} its variance; '
          'give the scheduler the U-Net was trained with')
    diffusion['learned_variance'] = model['learned_variance']
  sampler = dio_scheduler.sampler_section(sched_cfg, IF_SAMPLING[role]['num_steps'], sched_file)
  sampler['guidance_scale'] = IF_SAMPLING[role]['guidance_scale']
  if role == 'sr':
    sampler['aug_level'] = IF_NOISE_LEVEL / diffusion['num_timesteps']
    diffusion['noise_aug'] = True
  c = imagen_configs.get_config('stage=base64,size=paper' if role == 'base'
                                else 'stage=sr256,size=paper').to_dict()
  c.update(stage=os.path.basename(os.path.normpath(path)), size='released', model=model,
           diffusion={**c['diffusion'], **diffusion}, sampler={**c['sampler'], **sampler})
  c['text_encoder'].update(name='t5', preset='', path=_component(path, 'text_encoder'),
                           tokenizer_path=_component(path, 'tokenizer'),
                           max_length=IF_TEXT_LEN, dtype='float32', zero_padding=False)
  c['input'].update(image_size=int(model['image_size']), text_max_len=IF_TEXT_LEN,
                    caption_rewrite='lower_strip',  # IF's prompt preparation (no cleaning)
                    low_res_size=model.get('low_res_size') or None, train_crop_size=None)
  return c


def read_tensors(path: str) -> dict:
  """The stage's U-Net parameters in our tree as '/'-joined names -> arrays."""
  from flax import traverse_util  # noqa: PLC0415
  from diffusion_jax.diffusers_io import unet as dio_unet  # noqa: PLC0415
  kwargs = {k: v for k, v in stage_config(path)['model'].items() if k != 'name'}
  params = dio_unet.convert_unet(component_weights(_component(path, 'unet')), kwargs)
  return {'/'.join(k): v for k, v in traverse_util.flatten_dict(dict(params)).items()}
