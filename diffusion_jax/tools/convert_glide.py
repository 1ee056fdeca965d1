r"""Converts glide-text2im's released checkpoints (.pt) once into a pretrained pipeline directory.

    python -m diffusion_jax.tools.convert_glide --checkpoint=base.pt --kind=base \
        --out=glide --tokenizer=glide-text2im/glide_text2im/tokenizer
    python -m diffusion_jax.tools.convert_glide --checkpoint=upsample.pt --kind=upsample --out=glide
    python -m diffusion_jax.tools.convert_glide --checkpoint=base_inpaint.pt \
        --kind=base-inpaint --out=glide

KIND is base, upsample, base-inpaint, upsample-inpaint, clip-image-enc or clip-text-enc; each
goes to DIR/KIND (config.json, model.safetensors, tokenizer/), so converting the released
files one by one into one DIR builds the whole release, which `pipelines.from_pretrained(DIR)`
and `python -m diffusion_jax.sample --pretrained=DIR` sample. `--options` (JSON, glide-text2im's
option names) overrides the published hyperparameters, e.g. for a model trained at another
size. `--tokenizer` is glide-text2im's tokenizer folder (or its checkout); once one kind has
it, later kinds copy it from DIR.

This is one of the two places in the library that unpickle (with the Inception converter):
`torch.load(..., weights_only=True)`, tensors and plain containers only. Fetch the files
yourself (glide-text2im's download.py names them); nothing is downloaded here.
"""
from __future__ import annotations

import json
import os
import shutil
import sys

from absl import flags

from diffusion_jax import cli, errors


def load_state_dict(path: str) -> dict:
  """name -> float32 numpy array of a torch checkpoint, unpickled with weights_only=True."""
  import numpy as np  # noqa: PLC0415
  try:
    import torch  # noqa: PLC0415 - only the one-time converters need torch
  except ImportError:
    raise errors.InputError('converting a .pt file needs torch: pip install torch==2.13.0 '
                            '(CPU build), then run this again') from None
  if not os.path.isfile(path):
    raise errors.InputError(f'--checkpoint={path}: no such file (download the released file '
                            'yourself; glide-text2im/glide_text2im/download.py names them)')
  print(f'loading {path} with torch.load(weights_only=True): tensors only, no code runs',
        file=sys.stderr)
  try:
    state = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # noqa: BLE001 - what torch raises on garbage varies
    first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise errors.InputError(f'--checkpoint={path}: not a torch checkpoint of tensors '
                            f'({first_line})') from None
  if isinstance(state, dict) and isinstance(state.get('state_dict'), dict):
    state = state['state_dict']
  if not isinstance(state, dict) or not state:
    raise errors.InputError(f'--checkpoint={path}: holds a {type(state).__name__}, not a state '
                            'dict of tensors')
  out = {}
  for key, value in state.items():
    if not isinstance(value, torch.Tensor):
      raise errors.InputError(f'--checkpoint={path}: entry {key!r} is a '
                              f'{type(value).__name__}, not a tensor')
    out[str(key)] = value.detach().to(torch.float32).cpu().numpy().astype(np.float32)
  return out


def parse_options(text: str | None) -> dict:
  if not text:
    return {}
  try:
    options = json.loads(text)
  except ValueError as e:
    raise errors.InputError(f'--options: not JSON ({e}); e.g. --options=\'{{"num_channels": '
                            '64, "xf_width": 32}\'') from None
  if not isinstance(options, dict):
    raise errors.InputError('--options: must be a JSON object of glide-text2im options')
  return options


def tokenizer_source(path: str) -> str:
  """glide-text2im's tokenizer folder, given it or a checkout that holds it."""
  for candidate in (path, os.path.join(path, 'glide_text2im', 'tokenizer')):
    if any(os.path.isfile(os.path.join(candidate, n))
           for n in ('encoder.json.gz', 'encoder.json')):
      return candidate
  raise errors.InputError(f'--tokenizer={path}: holds no encoder.json[.gz]; point it at '
                          'glide_text2im/tokenizer of a local glide-text2im checkout')


def stage_config(kind: str, opts: dict):
  """The full stage config of a converted U-Net kind: the GLIDE paper config's training
  fields (optimizer, input) with the released network, schedule and sampler."""
  import ml_collections  # noqa: PLC0415

  from configs import glide as glide_configs  # noqa: PLC0415
  from diffusion_jax import convert_glide  # noqa: PLC0415
  skeleton = {'base': 'base64', 'upsample': 'up256', 'base-inpaint': 'inpaint64',
              'upsample-inpaint': 'inpaint256'}[kind]
  c = glide_configs.get_config(f'stage={skeleton},size=paper')
  model = convert_glide.model_config(opts)
  c.stage = kind
  c.size = 'released'
  c.model = ml_collections.ConfigDict(model)
  c.diffusion = ml_collections.ConfigDict(convert_glide.diffusion_config(opts))
  c.sampler = ml_collections.ConfigDict(convert_glide.sampler_config(kind, opts))
  c.input.image_size = model['image_size']
  c.input.low_res_size = model['low_res_size'] or None
  c.input.text_max_len = max(2, model['text_len'])
  c.text_encoder.max_length = c.input.text_max_len
  c.text_encoder.vocab_size = model['vocab_size']
  return c


def convert(checkpoint: str, kind: str, out: str, options: dict | None = None,
            tokenizer: str | None = None) -> str:
  """Writes OUT/KIND from `checkpoint`; returns that directory."""
  import jax  # noqa: PLC0415

  from diffusion_jax import convert_glide, models, pretrained, validation  # noqa: PLC0415
  from diffusion_jax import conditioning  # noqa: PLC0415
  if kind not in convert_glide.KINDS:
    raise errors.InputError(f'--kind={kind}: choose one of {", ".join(convert_glide.KINDS)}')
  validation.check_writable_dir(out, '--out')
  stage_dir = os.path.join(out, kind)
  if kind in convert_glide.CLIP_KINDS:
    from diffusion_jax import convert_glide_clip  # noqa: PLC0415
    convert_glide_clip.convert_file(checkpoint, kind, stage_dir, options or {},
                                    load_state_dict, tokenizer)
    _join_clip_towers(out)
    return stage_dir
  options = dict(options or {})
  convert_glide.released_options(kind, options)  # bad options fail before the file is read
  state = load_state_dict(checkpoint)
  embedding = state.get('token_embedding.weight')
  if 'n_vocab' not in options and embedding is not None and embedding.ndim == 2:
    options['n_vocab'] = int(embedding.shape[0])  # the tokenizer the model was trained with
  tok_tmp = None
  if tokenizer:
    tok_tmp = os.path.join(out, f'.tokenizer.tmp{os.getpid()}')
    n_vocab = convert_glide.convert_tokenizer(tokenizer_source(tokenizer), tok_tmp)
    if n_vocab != options.setdefault('n_vocab', n_vocab):
      shutil.rmtree(tok_tmp)
      raise errors.InputError(f'--tokenizer={tokenizer}: {n_vocab} tokens, but the checkpoint '
                              f'embeds {options["n_vocab"]}; give the tokenizer it was trained '
                              'with')
  opts = convert_glide.released_options(kind, options)
  config = stage_config(kind, opts)
  validation.check_stage_config(config)
  model = models.build(config.model)
  init = conditioning.init_params_fn(config, model)
  import flax.linen as nn  # noqa: PLC0415
  template = nn.meta.unbox(jax.eval_shape(init, jax.random.PRNGKey(0)))
  params = convert_glide.convert_unet(state, config.model.to_dict(), template,
                                      what=f'--checkpoint={checkpoint} (--kind={kind})')
  pretrained.write_stage(stage_dir, config, params,
                         metadata={'source': os.path.basename(checkpoint), 'kind': kind})
  tok_out = os.path.join(stage_dir, pretrained.TOKENIZER_DIR)
  if tok_tmp:
    if os.path.isdir(tok_out):
      shutil.rmtree(tok_out)
    os.replace(tok_tmp, tok_out)
  elif config.model.text_source != 'none':
    _copy_tokenizer_from_siblings(out, kind, tok_out)
  print(f'wrote {stage_dir} ({convert_glide.param_count(params):,} parameters)')
  return stage_dir


CLIP_STAGE = 'clip'


def clip_stage_config(opts: dict):
  """The noised CLIP's stage config: the GLIDE paper's noised_clip stage with the released
  towers' network and schedule."""
  import ml_collections  # noqa: PLC0415

  from configs import glide as glide_configs  # noqa: PLC0415
  from diffusion_jax import convert_glide, convert_glide_clip  # noqa: PLC0415
  c = glide_configs.get_config('stage=noised_clip,size=paper')
  c.stage = CLIP_STAGE
  c.size = 'released'
  c.model = ml_collections.ConfigDict(convert_glide_clip.clip_model_config(opts))
  c.input.image_size = int(opts['image_size'])
  c.input.text_max_len = int(opts['max_text_len'])
  c.text_encoder.max_length = c.input.text_max_len
  c.text_encoder.vocab_size = int(opts['n_vocab'])
  c.diffusion.schedule = opts['beta_schedule']
  c.diffusion.num_timesteps = max(1, int(opts['n_timesteps']))
  c.diffusion.logsnr_min, c.diffusion.logsnr_max = convert_glide.LOGSNR_BOUNDS
  return c


def _join_clip_towers(out: str) -> None:
  """Once both CLIP towers are in OUT, OUT/clip is their noised CLIP as one pretrained stage
  (what CLIP guidance loads), with the text tower's tokenizer."""
  from diffusion_jax import convert, pretrained  # noqa: PLC0415
  towers = {kind: os.path.join(out, kind) for kind in ('clip-image-enc', 'clip-text-enc')}
  if not all(os.path.isfile(os.path.join(d, 'tower.json')) for d in towers.values()):
    return
  infos = {k: convert.read_json_object(os.path.join(d, 'tower.json')) for k, d in towers.items()}
  opts = [info.get('options') for info in infos.values()]
  if opts[0] != opts[1]:
    raise errors.InputError(f'{out}: the CLIP towers were converted with different --options '
                            f'({opts[0]} vs {opts[1]}); convert both with the same')
  flat = {}
  for d in towers.values():
    flat.update(convert.read_weights(os.path.join(d, pretrained.WEIGHTS_FILE)))
  from flax import traverse_util  # noqa: PLC0415
  params = traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in flat.items()})
  stage_dir = os.path.join(out, CLIP_STAGE)
  pretrained.write_stage(stage_dir, clip_stage_config(opts[0]), params,
                         metadata={'kind': 'clip-image-enc + clip-text-enc'})
  tok = os.path.join(towers['clip-text-enc'], pretrained.TOKENIZER_DIR)
  tok_out = os.path.join(stage_dir, pretrained.TOKENIZER_DIR)
  if os.path.isdir(tok):
    if os.path.isdir(tok_out):
      shutil.rmtree(tok_out)
    shutil.copytree(tok, tok_out)
  else:
    print('warning: the CLIP text tower has no tokenizer (convert clip-text-enc with '
          '--tokenizer=glide_text2im/tokenizer); CLIP guidance needs it', file=sys.stderr)
  print(f'wrote {stage_dir} (both CLIP towers: CLIP guidance)')


def _copy_tokenizer_from_siblings(out: str, kind: str, tok_out: str) -> None:
  """A kind converted without --tokenizer takes the one an earlier kind wrote into OUT."""
  from diffusion_jax import convert_glide, pretrained  # noqa: PLC0415
  for other in convert_glide.UNET_KINDS:
    src = os.path.join(out, other, pretrained.TOKENIZER_DIR)
    if other != kind and os.path.isfile(os.path.join(src, 'tokenizer_config.json')):
      if os.path.isdir(tok_out):
        shutil.rmtree(tok_out)
      shutil.copytree(src, tok_out)
      return
  print(f'warning: {kind} has no tokenizer (pass --tokenizer=glide_text2im/tokenizer); it '
        'cannot read prompts until one is converted into this directory', file=sys.stderr)


def main(argv, F: flags.FlagValues = flags.FLAGS):
  del argv
  convert(F.checkpoint, F.kind, F.out, parse_options(F.options), F.tokenizer)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS, sys_argv=None) -> None:
  """Flags exist only when run as a program, so importing `convert` defines none."""
  del sys_argv
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string('checkpoint', None, 'a released glide-text2im .pt file', required=True,
                      **fv)
  flags.DEFINE_string('kind', None, 'base, upsample, base-inpaint, upsample-inpaint, '
                      'clip-image-enc or clip-text-enc', required=True, **fv)
  flags.DEFINE_string('out', None, 'the pipeline directory; the kind goes to OUT/KIND',
                      required=True, **fv)
  flags.DEFINE_string('options', None, "JSON of glide-text2im options overriding the published "
                      'ones, e.g. {"num_channels": 64}', **fv)
  flags.DEFINE_string('tokenizer', None, "glide-text2im's tokenizer folder (or checkout)", **fv)


if __name__ == '__main__':
  define_flags()
  cli.run(main)
