"""Pretrained stage directories: a stage's weights and the config that says what they mean,
without training state.

    DIR/<stage>/config.json         the stage config (as a trainer would use it)
    DIR/<stage>/model.safetensors   its parameters, our tree, '/'-joined paths, float32
    DIR/<stage>/tokenizer/          the tokenizer of whatever reads its token ids (optional)

`tools/convert_glide` writes such directories from glide-text2im's releases; a diffusers
pipeline directory (`model_index.json`, `diffusers_io.pipeline`) is read as one stage too
(a directory of DeepFloyd IF's stage I and stage II pipelines as their cascade);
`pipelines.from_pretrained(DIR)` samples them; `--config.init_from=DIR/<stage>` fine-tunes
one (of a Karlo directory, the network folder: DIR/decoder, DIR/super_res_first or
DIR/super_res_last). Reading refuses pickles and names every missing, unexpected or mis-shaped
tensor.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from diffusion_jax import convert, errors, io_util
from diffusion_jax.diffusers_io import karlo
from diffusion_jax.diffusers_io import pipeline as dio_pipeline

CONFIG_FILE = 'config.json'
WEIGHTS_FILE = 'model.safetensors'
TOKENIZER_DIR = 'tokenizer'


def is_stage_dir(path: str) -> bool:
  """Ours (config.json + model.safetensors), a diffusers pipeline directory (one stage) or a
  network folder of a Karlo directory (`karlo.split_component`)."""
  return dio_pipeline.is_pipeline_dir(path) or karlo.split_component(path) is not None or (
      os.path.isfile(os.path.join(path, CONFIG_FILE))
      and os.path.isfile(os.path.join(path, WEIGHTS_FILE)))


def stage_dirs(root: str) -> dict[str, str]:
  """name -> directory of every pretrained stage directly under `root`, sorted by name."""
  if os.path.isfile(root) and convert.is_pickle_file(root):
    raise errors.InputError(f'refusing to load {root}: a pickle (it can run arbitrary code); '
                            'convert it once with python -m diffusion_jax.tools.convert_glide '
                            f'--checkpoint={root} --kind=KIND --out=DIR and give DIR')
  if not os.path.isdir(root):
    raise errors.InputError(f'{root}: no such directory; give a directory of pretrained stages '
                            '(written by python -m diffusion_jax.tools.convert_glide)')
  if dio_pipeline.is_pipeline_dir(root):  # one diffusers pipeline: a one-stage cascade
    return {os.path.basename(os.path.normpath(root)): root}
  return {name: os.path.join(root, name) for name in sorted(os.listdir(root))
          if is_stage_dir(os.path.join(root, name))}


def stages_root(root: str) -> str:
  """The directory `stage_dirs(root)`'s names are under (a lone pipeline's parent)."""
  if dio_pipeline.is_pipeline_dir(root):
    return os.path.dirname(os.path.normpath(root)) or '.'
  return root


def write_stage(out_dir: str, config: Mapping[str, Any], params: Mapping,
                metadata: Mapping[str, str] | None = None) -> None:
  """Writes `config` (a ConfigDict or dict) and `params` (a nested dict of arrays)."""
  os.makedirs(out_dir, exist_ok=True)
  flat = traverse_util.flatten_dict(dict(params))
  tensors = {'/'.join(k): np.array(v, np.float32, order='C') for k, v in flat.items()}
  from safetensors.numpy import save_file  # noqa: PLC0415
  meta = {'format': 'diffusion_jax', **dict(metadata or {})}
  io_util.replace_atomically(os.path.join(out_dir, WEIGHTS_FILE),
                             lambda tmp: save_file(tensors, tmp, metadata=meta))
  as_dict = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
  text = json.dumps(_plain(as_dict), indent=1, sort_keys=True)

  def write(tmp):
    with open(tmp, 'w') as f:
      f.write(text + '\n')
  io_util.replace_atomically(os.path.join(out_dir, CONFIG_FILE), write)


def _plain(value):
  """JSON-ready: tuples to lists, numpy scalars to Python, placeholders (None) kept."""
  if isinstance(value, Mapping):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value


def read_config(stage_dir: str) -> dict[str, Any]:
  """The stage config dict saved in `stage_dir` (one-line errors for what is wrong)."""
  if not os.path.isdir(stage_dir):
    raise errors.InputError(f'{stage_dir}: no such directory; expected a pretrained stage '
                            f'directory ({CONFIG_FILE} + {WEIGHTS_FILE})')
  if karlo.is_karlo_dir(stage_dir):
    raise errors.InputError(f'{stage_dir}: a Karlo (diffusers unCLIP) directory is a whole '
                            'cascade, not one stage; name the network to fine-tune, e.g. '
                            f'{os.path.join(stage_dir, "decoder")}, or sample it with '
                            f'pipelines.from_pretrained or --pretrained={stage_dir}')
  if karlo.split_component(stage_dir):
    return karlo.component_config(stage_dir)
  if dio_pipeline.is_pipeline_dir(stage_dir):
    return dio_pipeline.stage_config(stage_dir)
  return convert.read_json_object(os.path.join(stage_dir, CONFIG_FILE))


def read_params(stage_dir: str, template: Mapping, model: Mapping[str, Any]) -> dict:
  """The parameters of `stage_dir` as numpy arrays, checked against `template` (the network's
  abstract parameters): every tensor there, of the right shape, finite, nothing else. `model`
  is the stage config's model section (`read_config`), which a Karlo component's mapping
  reads."""
  if dio_pipeline.is_pipeline_dir(stage_dir):
    tensors = dio_pipeline.read_tensors(stage_dir)
    what = os.path.join(stage_dir, 'unet')
  elif karlo.split_component(stage_dir):
    tree = karlo.component_params(stage_dir, dict(model))
    tensors = {'/'.join(k): v for k, v in traverse_util.flatten_dict(dict(tree)).items()}
    what = stage_dir
  else:
    tensors = convert.read_weights(os.path.join(stage_dir, WEIGHTS_FILE))
    what = os.path.join(stage_dir, WEIGHTS_FILE)
  flat_template = traverse_util.flatten_dict(dict(template))
  rules = [convert.Rule(path, ('/'.join(path),)) for path in flat_template]
  return convert.assemble(tensors, rules, flat_template, what=what)
