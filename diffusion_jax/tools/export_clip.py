r"""Exports the CLIP trained by unCLIP's `clip` stage as a transformers CLIPModel directory,
which the prior and the decoder then load as their frozen encoder (`text_encoder.path`).

  python -m diffusion_jax.tools.export_clip --workdir=ROOT/clip --out=ROOT/clip/export

Written: config.json, model.safetensors, the tokenizer the stage trained with (kept in
its directory), preprocessor_config.json and export_info.json.
The EMA parameters are exported (`--raw` for the raw ones), as every other stage of a cascade
samples with its EMA. The trainer feeds images in [-1, 1], so the pixel statistics written
are mean = std = 0.5: `encoders` then maps [0, 1] pixels to exactly what the tower saw.

Idempotent: export_info.json records the checkpoint step and the parameter kind; a call
for the same finished checkpoint finds it and writes nothing.
"""
from __future__ import annotations

import json
import os
from typing import Any

from absl import flags

from diffusion_jax import cli, config_util, validation

EXPORT_INFO = 'export_info.json'
# Images reach the trainer in [-1, 1]; `encoders` normalises [0, 1] pixels as (x - mean) / std.
TRAINED_PIXEL_MEAN = TRAINED_PIXEL_STD = (0.5, 0.5, 0.5)


def export_info(out_dir: str) -> dict[str, Any] | None:
  """What a finished export came from, or None when out_dir holds no complete export."""
  path = os.path.join(out_dir, EXPORT_INFO)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def _tokenizer_dir(config, stage_dir: str) -> str:
  """The tokenizer the stage trained with: the one it keeps, else (older stages) its source."""
  from diffusion_jax import conditioning
  path = os.path.join(stage_dir, 'tokenizer')
  if not os.path.isfile(os.path.join(path, 'tokenizer_config.json')):
    path = conditioning.tokenizer_source(config, None) or path
  if not os.path.isfile(os.path.join(path, 'tokenizer_config.json')):
    raise FileNotFoundError(f'no tokenizer at {path}: the clip stage writes it when it trains')
  return path


def _check_round_trip(params, out_dir: str) -> None:
  """Reads the export back with the importer: every tensor must come back bit-identical."""
  import numpy as np
  from flax import traverse_util
  from diffusion_jax import convert
  _, loaded = convert.load_clip(out_dir)
  want, got = traverse_util.flatten_dict(params), traverse_util.flatten_dict(loaded)
  bad = [k for k in want if k not in got or not np.array_equal(want[k], got[k])]
  if bad or set(got) != set(want):
    raise AssertionError(f'export in {out_dir} does not read back: {["/".join(k) for k in bad]}')


def export_stage(stage_dir: str, out_dir: str, *, use_ema: bool = True) -> dict:
  """Exports the clip stage's newest checkpoint in `stage_dir` (with the config saved beside
  it) to `out_dir` unless that checkpoint is already exported there; returns the export info."""
  import jax
  from diffusion_jax import checkpoint as ckpt_lib
  from diffusion_jax import conditioning, convert, io_util
  ckpt_dir = os.path.abspath(os.path.join(stage_dir, 'checkpoints'))
  latest = None
  if os.path.isdir(ckpt_dir):
    checkpointer = ckpt_lib.Checkpointer(ckpt_dir, read_only=True)
    latest = checkpointer.latest_step()
    checkpointer.close()
  if latest is None:
    raise FileNotFoundError(f'no checkpoint in {ckpt_dir}: train the clip stage first')
  kind = 'ema' if use_ema else 'raw'
  wanted = {'checkpoint_dir': ckpt_dir, 'step': latest, 'params': kind}
  if export_info(out_dir) == wanted:
    return wanted
  stage = conditioning.restore_stage(stage_dir, use_ema=use_ema)
  config = stage.config
  if config_util.get(config, 'objective') != 'clip':
    raise ValueError(f'export_clip: {stage_dir} holds a {config_util.get(config, "objective")!r} '
                     'stage, not a clip stage (configs/unclip.py:stage=clip)')
  tokenizer_dir = _tokenizer_dir(config, stage_dir)
  params = jax.device_get(stage.params['clip'])  # a ContrastiveCLIP wraps a CLIP tree
  info = {'checkpoint_dir': ckpt_dir, 'step': stage.step, 'params': kind}
  # The info goes first and comes back last: an interrupted export is never taken as done.
  if os.path.exists(os.path.join(out_dir, EXPORT_INFO)):
    os.remove(os.path.join(out_dir, EXPORT_INFO))
  convert.export_clip(params, config.model, out_dir, tokenizer_dir=tokenizer_dir,
                      image_mean=TRAINED_PIXEL_MEAN, image_std=TRAINED_PIXEL_STD)
  _check_round_trip(params, out_dir)
  io_util.write_json(os.path.join(out_dir, EXPORT_INFO), info)
  return info


def define_flags(flag_values: flags.FlagValues = flags.FLAGS, sys_argv=None) -> None:
  """Defined when run as a program, not at import: the Shapes demo imports this module for
  export_stage."""
  del sys_argv
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string('workdir', None, 'The clip stage directory (ROOT/clip).', required=True,
                      **fv)
  flags.DEFINE_string('out', None, 'Output directory (transformers CLIPModel layout).',
                      required=True, **fv)
  flags.DEFINE_bool('raw', False, 'Export the raw parameters instead of the EMA.', **fv)


def main(argv, F: flags.FlagValues = flags.FLAGS):
  del argv
  validation.check_writable_dir(F.out, '--out')
  try:
    info = export_stage(F.workdir, F.out, use_ema=not F.raw)
  except (FileNotFoundError, ValueError) as e:  # no checkpoint, no tokenizer, not a clip stage
    raise cli.CLIError(e) from None
  print(f'exported step {info["step"]} ({info["params"]} params) to {F.out}')


if __name__ == '__main__':
  define_flags()
  cli.run(main)
