r"""Exports trained Imagen-family stages as diffusers DeepFloyd IF pipeline directories.

    python -m diffusion_jax.tools.export --workdir=ROOT --out=DIR [--stages=base64,sr256] \
        [--use_ema=true]

Each stage ROOT/<stage> (its newest checkpoint and the config saved with it) goes to
DIR/<stage>/ in the layout `IFPipeline.from_pretrained` (a base stage) or
`IFSuperResolutionPipeline.from_pretrained` (a stage with low_res_size) reads:

    model_index.json                 the pipeline class and its components
    unet/                            the U-Net (`diffusers_io.unet.save_unet`)
    scheduler/scheduler_config.json  the noise process and sampler (`diffusers_io.scheduler`)
    text_encoder/                    a copy of the T5 directory text_encoder.path names
    tokenizer/                       a copy of the stage's kept tokenizer ROOT/<stage>/tokenizer

`pipelines.from_pretrained(DIR/<stage>)` reads the result back. A stage diffusers cannot
express (our own attention pooling, a continuous-time schedule, a randomly initialised T5)
is refused in one line naming the field. Nothing is downloaded.

Stages fine-tuned from a Karlo directory (`--config.init_from=KARLO/decoder`,
`KARLO/super_res_first` or `KARLO/super_res_last`) go back into its layout instead: DIR is a
copy of KARLO (model_index.json, schedulers, CLIP, prior) whose decoder/ + text_proj/ and
super_res_first/ + super_res_last/ hold the trained networks (one super-res network trained:
both folders hold it, so the export samples what the stage samples).
"""
from __future__ import annotations

import json
import os
import shutil
import sys

from absl import flags

from diffusion_jax import cli, errors

PIPELINE_OF = {'base': 'IFPipeline', 'sr': 'IFSuperResolutionPipeline'}
# What the IF pipelines feed the U-Net: 77 T5 tokens, padding included, unmasked.
IF_TEXT_LEN = 77
# A super-resolution pipeline's noising of its low-res input (diffusers IF stage II's).
IMAGE_NOISING_SCHEDULER = {'_class_name': 'DDPMScheduler', 'beta_schedule': 'squaredcos_cap_v2',
                           'num_train_timesteps': 1000, 'variance_type': 'fixed_small',
                           'prediction_type': 'epsilon', 'clip_sample': True}


def trained_stages(workdir: str) -> list[str]:
  """The stage names under `workdir` that hold checkpoints/, sorted."""
  if not os.path.isdir(workdir):
    raise errors.InputError(f'--workdir={workdir}: no such directory; give the root that holds '
                            'one directory per trained stage (ROOT/<stage>/checkpoints)')
  return sorted(n for n in os.listdir(workdir)
                if os.path.isdir(os.path.join(workdir, n, 'checkpoints')))


def _refuse(stage: str, what: str):
  raise errors.InputError(f'stage {stage!r}: {what}')


def _unet_kwargs(stage: str, config) -> dict:
  model = config.model.to_dict()
  if model.get('name') != 'unet':
    _refuse(stage, f'model.name={model.get("name")!r} is not supported; diffusers IF pipelines '
            "hold a UNet2DConditionModel (model.name='unet')")
  return {k: v for k, v in model.items() if k != 'name'}


def _check_text(stage: str, config, kw: dict) -> str:
  """The stage's T5 directory; refuses text conditioning the IF pipelines do not feed."""
  te = config.get('text_encoder')
  if te is None or te.get('name') != 't5':
    _refuse(stage, f'text_encoder.name={te and te.get("name")!r} is not supported; IF '
            'pipelines encode prompts with T5')
  if not te.get('path'):
    _refuse(stage, 'text_encoder.path is unset (its T5 is randomly initialised); train it with '
            '--config.text_encoder.path=DIR naming a transformers T5 directory')
  if not os.path.isdir(te.path):
    _refuse(stage, f'text_encoder.path={te.path}: no such directory; restore the T5 directory '
            'it was trained with')
  if int(te.get('max_length') or 0) != IF_TEXT_LEN or int(kw.get('text_len') or 0) != IF_TEXT_LEN:
    _refuse(stage, f'text_encoder.max_length={te.get("max_length")!r} is not supported; IF '
            f'pipelines feed the U-Net {IF_TEXT_LEN} tokens')
  if te.get('zero_padding') or kw.get('text_mask_keys'):
    _refuse(stage, 'text_encoder.zero_padding/model.text_mask_keys=True is not supported; IF '
            'pipelines feed the padding tokens unmasked')
  return te.path


def _tokenizer_class(tokenizer_dir: str) -> str:
  path = os.path.join(tokenizer_dir, 'tokenizer_config.json')
  with open(path) as f:
    return str(json.load(f).get('tokenizer_class') or 'AutoTokenizer')


def _copy_dir(src: str, dst: str) -> None:
  if os.path.isdir(dst):
    shutil.rmtree(dst)
  shutil.copytree(src, dst)


def _restore(stage_dir: str, use_ema: bool):
  from diffusion_jax import conditioning  # noqa: PLC0415 - importing the CLI stays light
  name = os.path.basename(os.path.normpath(stage_dir))
  try:
    return conditioning.restore_stage(stage_dir, use_ema=use_ema, name=name)
  except FileNotFoundError:
    raise errors.InputError(f'stage {name!r}: no checkpoint in {stage_dir}/checkpoints; train '
                            'it first') from None


def _host_params(stage):
  from flax import linen as nn  # noqa: PLC0415
  import jax  # noqa: PLC0415
  return jax.device_get(nn.meta.unbox(stage.params))


def export_stage(stage_dir: str, out_dir: str, *, use_ema: bool = True) -> str:
  """Writes the trained stage `stage_dir` as a diffusers IF pipeline directory `out_dir`."""
  from diffusion_jax.diffusers_io import scheduler as dio_scheduler  # noqa: PLC0415
  from diffusion_jax.diffusers_io import unet as dio_unet  # noqa: PLC0415
  from diffusion_jax import io_util  # noqa: PLC0415
  name = os.path.basename(os.path.normpath(stage_dir))
  stage = _restore(stage_dir, use_ema)
  config = stage.config
  if config.get('family') != 'imagen':
    _refuse(name, f'family={config.get("family")!r} is not supported; only Imagen-family '
            'stages (T5-conditioned U-Nets) have a diffusers IF layout')
  kw = _unet_kwargs(name, config)
  try:
    dio_unet.diffusers_config(kw)  # refuses what diffusers cannot express, naming the field
  except errors.InputError as e:
    raise errors.InputError(f'stage {name!r}: {e}') from None
  scheduler = dio_scheduler.scheduler_config(config.diffusion.to_dict(),
                                             config.sampler.to_dict(), where=f'stage {name!r}')
  text_encoder = _check_text(name, config, kw)
  tokenizer = os.path.join(stage_dir, 'tokenizer')
  if not os.path.isfile(os.path.join(tokenizer, 'tokenizer_config.json')):
    _refuse(name, f'{tokenizer}: no kept tokenizer (tokenizer_config.json); a run that reads '
            'T5 keeps one there')
  role = 'sr' if kw.get('low_res_size') else 'base'
  if role == 'sr' and config.diffusion.get('noise_aug') and (
      int(config.diffusion.num_timesteps) != IMAGE_NOISING_SCHEDULER['num_train_timesteps']
      or config.diffusion.schedule != IMAGE_NOISING_SCHEDULER['beta_schedule']):
    _refuse(name, f'diffusion.schedule={config.diffusion.schedule!r} is not supported with '
            'noise_aug; IF stage II noises its low-res input on squaredcos_cap_v2 over 1000 steps')
  if role == 'sr' and not kw.get('low_res_upsampled'):
    _refuse(name, 'model.low_res_upsampled=False is not supported; IF stage II noises its '
            'low-res input after upsampling it: train with --config.model.'
            'low_res_upsampled=True')
  params = _host_params(stage)
  os.makedirs(out_dir, exist_ok=True)
  dio_unet.save_unet(os.path.join(out_dir, 'unet'), kw, params)
  io_util.write_json(os.path.join(out_dir, 'scheduler', 'scheduler_config.json'), scheduler)
  _copy_dir(text_encoder, os.path.join(out_dir, 'text_encoder'))
  _copy_dir(tokenizer, os.path.join(out_dir, 'tokenizer'))
  index = {'_class_name': PIPELINE_OF[role],
           'scheduler': ['diffusers', scheduler['_class_name']],
           'text_encoder': ['transformers', 'T5EncoderModel'],
           'tokenizer': ['transformers', _tokenizer_class(tokenizer)],
           'unet': ['diffusers', 'UNet2DConditionModel'],
           'feature_extractor': [None, None], 'safety_checker': [None, None],
           'watermarker': [None, None], 'requires_safety_checker': False}
  if role == 'sr':
    index['image_noising_scheduler'] = ['diffusers', 'DDPMScheduler']
    io_util.write_json(os.path.join(out_dir, 'image_noising_scheduler', 'scheduler_config.json'),
                       IMAGE_NOISING_SCHEDULER)
  io_util.write_json(os.path.join(out_dir, 'model_index.json'), index)
  return out_dir


def karlo_source(stage_dir: str) -> tuple[str, str] | None:
  """(Karlo directory, component) the stage was fine-tuned from, read from the config saved
  with its newest checkpoint; None for any other stage."""
  from diffusion_jax import checkpoint as ckpt_lib  # noqa: PLC0415
  from diffusion_jax.diffusers_io import karlo  # noqa: PLC0415
  reader = ckpt_lib.Checkpointer(os.path.join(stage_dir, 'checkpoints'), read_only=True)
  try:
    steps = reader.all_steps()
    saved = reader.saved_config(steps[-1]) if steps else None
  finally:
    reader.close()
  init_from = (saved or {}).get('init_from')
  return karlo.split_component(init_from) if init_from else None


def export_karlo(stage_dirs: dict[str, str], sources: dict[str, tuple[str, str]], out: str, *,
                 use_ema: bool = True) -> str:
  """Writes stages fine-tuned from one Karlo directory into a copy of it at `out`; `sources`:
  each stage's (Karlo directory, component), as `karlo_source` reads them."""
  from diffusion_jax import conditioning, io_util  # noqa: PLC0415
  from diffusion_jax.diffusers_io import karlo  # noqa: PLC0415
  from diffusion_jax.diffusers_io import unet as dio_unet  # noqa: PLC0415
  roots = sorted({os.path.abspath(root) for root, _ in sources.values()})
  if len(roots) != 1:
    raise errors.InputError(f'--stages: fine-tuned from different Karlo directories '
                            f'({", ".join(roots)}); export the stages of one at a time')
  root = roots[0]
  kinds = {name: karlo.FINE_TUNABLE[component] for name, (_, component) in sources.items()}
  for kind in set(kinds.values()):
    same = sorted(n for n, k in kinds.items() if k == kind)
    if len(same) > 1:
      raise errors.InputError(f'--stages: {", ".join(same)} all fine-tune Karlo\'s {kind}; '
                              'choose one with --stages')
  if os.path.abspath(out) == root:
    raise errors.InputError(f'--out={out} is the Karlo directory the stages started from; give '
                            'a new directory')
  if os.path.isdir(out) and os.listdir(out) and not karlo.is_karlo_dir(out):
    raise errors.InputError(f'--out={out}: exists and is not a Karlo directory; give a new one')
  shutil.copytree(root, out, dirs_exist_ok=True)  # what was not fine-tuned stays Karlo's
  for name, stage_dir in stage_dirs.items():
    kind = kinds[name]
    stage = _restore(stage_dir, use_ema)
    released = conditioning.config_from_saved(karlo.stage_config(root, kind))
    diffs = [line for line in conditioning.config_differences(released, stage.config,
                                                              ('model', 'diffusion'))
             if line.split(':', 1)[0].rsplit('.', 1)[-1] not in conditioning.EXECUTION_LEAVES]
    if diffs:
      _refuse(name, f'its network or noise process differs from {root}\'s {kind} '
              f'({"; ".join(diffs)}); the Karlo layout changes only weights')
    te = stage.config.get('text_encoder') or {}
    if kind == 'decoder' and (not te.get('raw_embeddings') or not te.get('path') or (
        io_util.folder_fingerprint(te.path)
        != io_util.folder_fingerprint(os.path.join(root, 'text_encoder')))):
      _refuse(name, f'text_encoder.path={te.get("path")!r} (raw_embeddings='
              f'{te.get("raw_embeddings")!r}) is not the CLIP text tower of {root}, which the '
              'exported directory keeps; train with the adopted text encoder')
    kw = {k: v for k, v in stage.config.model.to_dict().items() if k != 'name'}
    params = _host_params(stage)
    folders = (('decoder', 'text_proj') if kind == 'decoder'
               else ('super_res_first', 'super_res_last'))
    for folder in folders:
      if os.path.isdir(os.path.join(out, folder)):
        shutil.rmtree(os.path.join(out, folder))
    if kind == 'decoder':
      dio_unet.save_unet(os.path.join(out, 'decoder'), kw, params,
                         text_proj_folder=os.path.join(out, 'text_proj'))
    else:
      for folder in folders:
        dio_unet.save_unet(os.path.join(out, folder), kw, params)
  return out


def export(workdir: str, out: str, stages: list[str] | None = None, use_ema: bool = True
           ) -> list[str]:
  """Exports `stages` (default: every trained stage) of `workdir` to OUT/<stage>."""
  found = trained_stages(workdir)
  if not found:
    raise errors.InputError(f'--workdir={workdir}: holds no trained stage (ROOT/<stage>/'
                            'checkpoints); train one first')
  names = stages or found
  unknown = [n for n in names if n not in found]
  if unknown:
    raise errors.InputError(f'--stages: {", ".join(unknown)} not trained under {workdir}; '
                            f'choose from {", ".join(found)}')
  sources = {n: karlo_source(os.path.join(workdir, n)) for n in names}
  karlo_stages = [n for n in names if sources[n]]
  if karlo_stages:
    others = [n for n in names if n not in karlo_stages]
    if others:
      raise errors.InputError(f'--stages: {", ".join(karlo_stages)} go back into a Karlo '
                              f'directory and {", ".join(others)} into IF ones; export them '
                              'separately with --stages')
    path = export_karlo({n: os.path.join(workdir, n) for n in names}, sources, out,
                        use_ema=use_ema)
    print(f'{", ".join(names)}: wrote {path}', file=sys.stderr)
    return [path]
  written = []
  for name in names:
    path = export_stage(os.path.join(workdir, name), os.path.join(out, name), use_ema=use_ema)
    print(f'{name}: wrote {path}', file=sys.stderr)
    written.append(path)
  return written


def main(argv, F: flags.FlagValues = flags.FLAGS):
  del argv
  stages = [s.strip() for s in (F.stages or '').split(',') if s.strip()] or None
  export(F.workdir, F.out, stages, F.use_ema)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS, sys_argv=None) -> None:
  """Flags exist only when run as a program, so importing `export` defines none."""
  del sys_argv
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string('workdir', None, 'the root of the trained stages (ROOT/<stage>)',
                      required=True, **fv)
  flags.DEFINE_string('out', None, 'the output directory; each stage goes to OUT/<stage> (stages '
                      'fine-tuned from Karlo: OUT is the Karlo directory)',
                      required=True, **fv)
  flags.DEFINE_string('stages', None, 'comma-separated stage names (default: every trained '
                      'stage)', **fv)
  flags.DEFINE_boolean('use_ema', True, 'export the EMA parameters (else the raw ones)', **fv)


if __name__ == '__main__':
  define_flags()
  cli.run(main)
