r"""Exports the CLIP trained by unCLIP's `clip` stage as a transformers CLIPModel directory,
which the prior and the decoder then load as their frozen encoder (`text_encoder.path`).

  python -m diffusion_jax.tools.export_clip --config=configs/unclip.py:stage=clip,size=shapes \
      --workdir=ROOT/clip --out=ROOT/clip/export

Written: config.json, model.safetensors, the tokenizer the stage trained with (the
workdir's, or `text_encoder.tokenizer_path`), preprocessor_config.json and export_info.json.
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

from absl import app, flags
from ml_collections import config_flags

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
  from diffusion_jax import config_util
  path = (config_util.get(config.text_encoder, 'tokenizer_path')
          or os.path.join(stage_dir, 'tokenizer'))
  if not os.path.isfile(os.path.join(path, 'tokenizer_config.json')):
    raise FileNotFoundError(f'no tokenizer at {path}: the clip stage writes it when it trains')
  return path


def _restore_params(config, stage_dir: str, ckpt_dir: str, use_ema: bool):
  """(CLIP params as numpy, step) from the newest readable checkpoint."""
  import jax
  from diffusion_jax import checkpoint as ckpt_lib
  from diffusion_jax.train import loop
  abstract = loop.build_trainer(config, stage_dir).abstract_state  # as the trainer laid it out
  checkpointer = ckpt_lib.Checkpointer(ckpt_dir, max_to_keep=None)
  try:
    restored = checkpointer.restore_latest(abstract)
  finally:
    checkpointer.close()
  if restored is None:
    raise FileNotFoundError(f'no checkpoint in {ckpt_dir}: train the clip stage first')
  state, step = restored
  params = state.ema_params if use_ema else state.params
  return jax.device_get(params['clip']), int(step)  # a ContrastiveCLIP wraps a CLIP tree


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


def export_stage(config, stage_dir: str, out_dir: str, *, use_ema: bool = True) -> dict:
  """Exports the clip stage's newest checkpoint in `stage_dir` to `out_dir` unless that
  checkpoint is already exported there; returns the export info."""
  from diffusion_jax import checkpoint as ckpt_lib
  from diffusion_jax import config_util, convert
  if config_util.get(config, 'objective') != 'clip':
    raise ValueError(f'export_clip: config objective is {config_util.get(config, "objective")!r}'
                     ', not a clip stage (configs/unclip.py:stage=clip)')
  ckpt_dir = os.path.abspath(os.path.join(stage_dir, 'checkpoints'))
  latest = None
  if os.path.isdir(ckpt_dir):
    checkpointer = ckpt_lib.Checkpointer(ckpt_dir, max_to_keep=None)
    latest = checkpointer.latest_step()
    checkpointer.close()
  kind = 'ema' if use_ema else 'raw'
  wanted = {'checkpoint_dir': ckpt_dir, 'step': latest, 'params': kind}
  if latest is not None and export_info(out_dir) == wanted:
    return wanted
  tokenizer_dir = _tokenizer_dir(config, stage_dir)
  params, step = _restore_params(config, stage_dir, ckpt_dir, use_ema)
  info = {'checkpoint_dir': ckpt_dir, 'step': step, 'params': kind}
  # The info goes first and comes back last: an interrupted export is never taken as done.
  if os.path.exists(os.path.join(out_dir, EXPORT_INFO)):
    os.remove(os.path.join(out_dir, EXPORT_INFO))
  convert.export_clip(params, config.model, out_dir, tokenizer_dir=tokenizer_dir,
                      image_mean=TRAINED_PIXEL_MEAN, image_std=TRAINED_PIXEL_STD)
  _check_round_trip(params, out_dir)
  with open(os.path.join(out_dir, EXPORT_INFO), 'w') as f:
    json.dump(info, f, indent=2)
  return info


def main(argv=None):
  # Flags are defined here, not at import: the demo imports this module next to other CLIs
  # that define --config and --workdir too.
  config = config_flags.DEFINE_config_file('config', None, 'The clip stage config: FILE:ARG.',
                                           lock_config=True)
  workdir = flags.DEFINE_string('workdir', None, 'The clip stage directory (ROOT/clip).')
  out = flags.DEFINE_string('out', None, 'Output directory (transformers CLIPModel layout).')
  raw = flags.DEFINE_bool('raw', False, 'Export the raw parameters instead of the EMA.')
  flags.mark_flags_as_required(['config', 'workdir', 'out'])

  def run(args):
    if len(args) > 1:
      raise app.UsageError(f'unexpected arguments: {args[1:]}')
    info = export_stage(config.value, workdir.value, out.value, use_ema=not raw.value)
    print(f'exported step {info["step"]} ({info["params"]} params) to {out.value}')

  app.run(run, argv)


if __name__ == '__main__':
  main()
