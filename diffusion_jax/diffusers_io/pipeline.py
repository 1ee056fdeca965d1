"""A diffusers-layout pipeline directory as pretrained stages (`diffusion_jax.pretrained`).

    DIR/model_index.json            the pipeline class and its components
    DIR/unet/config.json + diffusion_pytorch_model[.fp16].safetensors (or sharded)
    DIR/scheduler/scheduler_config.json
    DIR/text_encoder/, DIR/tokenizer/   transformers layout (T5 for DeepFloyd IF)

A DeepFloyd IF pipeline directory (`IFPipeline`: stage I, 64 px; `IFSuperResolutionPipeline`:
stage II, 64 -> 256 px) is one stage of our Imagen family: its stage config is built here
from the components' configs (the network from unet/config.json, the noise process and
sampler from the scheduler's, the frozen T5 read from text_encoder/ and tokenizer/), and its
U-Net weights are mapped into our parameter tree when the stage is loaded. A directory
holding both (ROOT/IF-I, ROOT/IF-II) is the cascade stage I -> stage II. Stage II upsamples
the low-res image (bilinear, corners aligned), noises it at the output size on its
image_noising_scheduler at noise level 250 (`model.low_res_upsampled`, `aug_level`
(250 + 1) / 1000) and embeds that level as the U-Net's class label; a stage saved without its
T5 (diffusers' `text_encoder=None`) reads its sibling stage's. Nothing is written and nothing
downloads; pickled weights are refused.
"""
from __future__ import annotations

import os
from typing import Any

from diffusion_jax import convert, errors
from diffusion_jax.diffusers_io import scheduler as dio_scheduler

MODEL_INDEX = 'model_index.json'
# The pipeline classes read here -> (our family, the stage's role).
IF_PIPELINES = {'IFPipeline': 'base', 'IFSuperResolutionPipeline': 'sr'}
# Their `__call__` defaults: steps, guidance scale (and stage II's noise level, a step of its
# image_noising_scheduler's 1000, which it also embeds as the U-Net's class label).
IF_SAMPLING = {'base': dict(num_steps=100, guidance_scale=7.0),
               'sr': dict(num_steps=50, guidance_scale=4.0)}
IF_NOISE_LEVEL = 250
NOISING_SCHEDULER = 'image_noising_scheduler'
IF_TEXT_LEN = 77  # the IF pipelines pad every prompt to 77 T5 tokens


def is_pipeline_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, MODEL_INDEX))


def model_index(path: str) -> dict[str, Any]:
  return convert.read_json_object(os.path.join(path, MODEL_INDEX))


def model_class(path: str) -> str:
  """The pipeline class a directory's model_index.json names ('' without one)."""
  if not is_pipeline_dir(path):
    return ''
  return str(model_index(path).get('_class_name', ''))


def pipeline_class(path: str) -> str:
  cls = model_class(path)
  if cls not in IF_PIPELINES:
    raise errors.InputError(f'{os.path.join(path, MODEL_INDEX)}: _class_name={cls!r} is not '
                            f'supported; pipelines read here: {", ".join(IF_PIPELINES)}')
  return cls


def component(path: str, name: str) -> str:
  """The component folder `name` of a pipeline directory (one-line error naming the class)."""
  folder = os.path.join(path, name)
  if not os.path.isdir(folder):
    raise errors.InputError(f'{path}: no {name}/ folder; a {model_class(path)} directory '
                            f'holds {name}/ (save it with save_pretrained)')
  return folder


def _text_folders(path: str) -> tuple[str, str]:
  """(text_encoder/, tokenizer/): the stage's own, else, for a stage saved without its T5,
  those of a sibling IF pipeline directory."""
  if os.path.isdir(os.path.join(path, 'text_encoder')):
    return component(path, 'text_encoder'), component(path, 'tokenizer')
  parent = os.path.dirname(os.path.normpath(path)) or '.'
  for sibling in sorted(os.listdir(parent)):
    other = os.path.join(parent, sibling)
    if (os.path.normpath(other) != os.path.normpath(path) and is_pipeline_dir(other)
        and model_index(other).get('_class_name') in IF_PIPELINES
        and os.path.isdir(os.path.join(other, 'text_encoder'))
        and os.path.isdir(os.path.join(other, 'tokenizer'))):
      return os.path.join(other, 'text_encoder'), os.path.join(other, 'tokenizer')
  return component(path, 'text_encoder'), component(path, 'tokenizer')  # the error


def component_weights(folder: str) -> dict:
  """A diffusers component's tensors as float32: the float32 file or shards, else the fp16
  variant's (`unet.read_model_folder`)."""
  from diffusion_jax.diffusers_io import unet as dio_unet  # noqa: PLC0415
  return dio_unet.read_model_folder(folder)


def stage_config(path: str) -> dict[str, Any]:
  """Our stage config (a plain dict, as `pretrained.read_config` returns) of a pipeline dir:
  the Imagen paper config's training fields with the released network, schedule, sampler
  and T5."""
  from configs import imagen as imagen_configs  # noqa: PLC0415 - the paper skeleton
  from diffusion_jax.diffusers_io import unet as dio_unet  # noqa: PLC0415
  role = IF_PIPELINES[pipeline_class(path)]
  unet_dir = component(path, 'unet')
  unet_file = os.path.join(unet_dir, 'config.json')
  model = dict(dio_unet.unet_kwargs(convert.read_json_object(unet_file), where=unet_file))
  model.update(name='unet', text_len=IF_TEXT_LEN)
  sched_file = os.path.join(component(path, 'scheduler'), 'scheduler_config.json')
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
    _check_noising_scheduler(path, diffusion)
    # Step k is our time (k + 1) / T: the level noises as add_noise(k) and embeds k.
    sampler['aug_level'] = (IF_NOISE_LEVEL + 1) / diffusion['num_timesteps']
    # Stage II noises the low-res image after upsampling it to the output size.
    diffusion['noise_aug'] = True
    model['low_res_upsampled'] = True
  c = imagen_configs.get_config('stage=base64,size=paper' if role == 'base'
                                else 'stage=sr256,size=paper').to_dict()
  c.update(stage=os.path.basename(os.path.normpath(path)), size='released', model=model,
           diffusion={**c['diffusion'], **diffusion}, sampler={**c['sampler'], **sampler})
  text_encoder, tokenizer = _text_folders(path)
  c['text_encoder'].update(name='t5', preset='', path=text_encoder, tokenizer_path=tokenizer,
                           max_length=IF_TEXT_LEN, dtype='float32', zero_padding=False)
  c['input'].update(image_size=int(model['image_size']), text_max_len=IF_TEXT_LEN,
                    caption_rewrite='lower_strip',  # IF's prompt preparation (no cleaning)
                    low_res_size=model.get('low_res_size') or None, train_crop_size=None)
  return c


def _check_noising_scheduler(path: str, diffusion: dict[str, Any]) -> None:
  """Stage II's low-res noise comes from its image_noising_scheduler; we draw it on the
  stage's own schedule, so the two must be the same noise process."""
  where = os.path.join(component(path, NOISING_SCHEDULER), 'scheduler_config.json')
  noising = dio_scheduler.diffusion_section(convert.read_json_object(where), where)
  keys = ('schedule', 'num_timesteps', 'beta_start', 'beta_end')
  if any(noising.get(k) != diffusion.get(k) for k in keys):
    theirs = {k: noising[k] for k in keys if k in noising}
    ours = {k: diffusion[k] for k in keys if k in diffusion}
    raise errors.InputError(f'{where}: noise process {theirs} differs from the scheduler\'s '
                            f'{ours}; give both the same beta_schedule and num_train_timesteps')


def read_tensors(path: str) -> dict:
  """The stage's U-Net parameters in our tree as '/'-joined names -> arrays."""
  from flax import traverse_util  # noqa: PLC0415
  from diffusion_jax.diffusers_io import unet as dio_unet  # noqa: PLC0415
  kwargs = {k: v for k, v in stage_config(path)['model'].items() if k != 'name'}
  params = dio_unet.convert_unet(component_weights(component(path, 'unet')), kwargs)
  return {'/'.join(k): v for k, v in traverse_util.flatten_dict(dict(params)).items()}
