r"""Samples a trained cascade.

  python -m diffusion_jax.sample --config=configs/imagen.py:stage=cascade,size=tiny \
      --workdir=ROOT --prompt="a red circle" --num_images=4 --seed=0 --out=DIR

Writes DIR/<index>.png, DIR/grid.png and DIR/captions.json, with progress over stages and
steps (reported from inside the jitted loops) and per-stage timing on stderr. Prompts come
from --prompt (repeatable) and/or --prompts_file (one per line); each is sampled
--num_images times. Applications:

  --mode=inpaint --image=IMG --mask=MASK (GLIDE; white = keep)
  --mode=variations --image=IMG [--eta=1.0]           (unCLIP)
  --mode=interpolate --image=A --image_b=B --num=5    (unCLIP)
  --mode=text_diff --image=IMG --prompt=OLD --new_prompt=NEW --weights=0,0.25,0.5 (unCLIP)

Pretrained stages (e.g. a glide-text2im release converted by
`python -m diffusion_jax.tools.convert_glide`) replace --config and --workdir:

  python -m diffusion_jax.sample --pretrained=DIR --prompt="a red circle" \
      --set=guidance_scale=3 --set=base.spacing=50 --set=upsample.spacing=fast27

Per-stage sampler settings: `--config.stages.base64.num_steps=32` and so on with --config;
`--set=KEY=VALUE` (every stage) or `--set=STAGE.KEY=VALUE` (one stage) with --pretrained,
KEY one of the sampler settings (sampler, num_steps, eta, guidance_scale, threshold, spacing,
noise_scale, ...). A converted GLIDE stage samples with glide-text2im's respacing (spacing=100,
fast27), which fixes its steps: change `spacing` there, not `num_steps`. The settings each stage
ran with are written to captions.json. Bad input (a setting out of range, a missing checkpoint
or pretrained directory, an unknown stage, an empty prompt file, an --out that cannot be
written) is one line on stderr and exit status 2, before anything compiles.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

from absl import flags, logging

from diffusion_jax import cli, errors

CLIError = cli.CLIError  # errors.InputError: reported as one line, exit status 2
MODES = ('generate', 'inpaint', 'variations', 'interpolate', 'text_diff')


def define_flags(flag_values: flags.FlagValues = flags.FLAGS, sys_argv=None) -> None:
  """The CLI's flags (defined when it runs, not when it is imported)."""
  fv = dict(flag_values=flag_values)
  cli.define_config(flag_values, sys_argv, kind='cascade')
  flags.DEFINE_string('workdir', None, 'ROOT holding one directory per stage', **fv)
  flags.DEFINE_string('pretrained', None, 'DIR of pretrained stages (e.g. written by python -m '
                      'diffusion_jax.tools.convert_glide); replaces --config and --workdir', **fv)
  flags.DEFINE_multi_string('set', [], 'with --pretrained: a sampler setting, KEY=VALUE for '
                            'every stage or STAGE.KEY=VALUE for one (repeatable), e.g. '
                            '--set=guidance_scale=3 --set=base.spacing=50', **fv)
  flags.DEFINE_multi_string('prompt', [], 'a prompt (repeatable)', **fv)
  flags.DEFINE_string('prompts_file', None, 'a text file, one prompt per line', **fv)
  flags.DEFINE_integer('num_images', 1, 'images per prompt', **fv)
  flags.DEFINE_integer('seed', 0, 'random seed', **fv)
  flags.DEFINE_string('out', 'samples', 'output directory', **fv)
  flags.DEFINE_list('stages', None, 'run only these stages of the chain, in order '
                    '(default: the config\'s order)', **fv)
  flags.DEFINE_enum('mode', 'generate', MODES, 'what to do', **fv)
  flags.DEFINE_string('image', None, 'input image (inpaint, variations, text_diff, '
                      'interpolate)', **fv)
  flags.DEFINE_string('image_b', None, 'second image (interpolate)', **fv)
  flags.DEFINE_string('mask', None, 'inpainting mask image: white = keep, black = fill', **fv)
  flags.DEFINE_float('eta', 1.0, 'DDIM eta of variations', **fv)
  flags.DEFINE_integer('num', 5, 'interpolation frames', **fv)
  flags.DEFINE_string('new_prompt', None, 'text_diff target caption', **fv)
  flags.DEFINE_list('weights', ['0', '0.25', '0.5', '0.75'], 'text_diff slerp weights', **fv)
  flags.DEFINE_float('clip_guidance_scale', 0.0,
                     'GLIDE: CLIP guidance with the noised CLIP instead of CFG', **fv)
  flags.DEFINE_bool('quiet', False, 'no progress bar', **fv)


def read_prompts(prompts, prompts_file) -> list[str]:
  out = [p for p in prompts]
  if prompts_file:
    if not os.path.isfile(prompts_file):
      raise CLIError(f'--prompts_file={prompts_file}: no such file')
    try:
      with open(prompts_file, encoding='utf-8') as f:
        lines = [line.strip() for line in f]
    except (OSError, UnicodeDecodeError) as e:
      raise CLIError(f'--prompts_file={prompts_file}: cannot be read as UTF-8 text ({e}); '
                     'write one prompt per line') from None
    lines = [line for line in lines if line]
    if not lines:
      raise CLIError(f'--prompts_file={prompts_file} is empty: write one prompt per line')
    out.extend(lines)
  return out


class ProgressBar:
  """One line per stage on stderr, redrawn as the jitted loop reports its steps."""

  def __init__(self, stream=sys.stderr, enabled: bool = True):
    self.stream, self.enabled = stream, enabled
    self.current = None
    self.start = 0.0

  def __call__(self, stage: str, step: int, total: int):
    if not self.enabled:
      return
    if stage != self.current:
      if self.current is not None:
        self.stream.write('\n')
      self.current, self.start = stage, time.perf_counter()
    width = 30
    filled = int(width * step / max(total, 1))
    elapsed = time.perf_counter() - self.start
    self.stream.write(f'\r{stage:>22s} [{"#" * filled}{"." * (width - filled)}] '
                      f'{step}/{total} {elapsed:6.1f}s')
    self.stream.flush()

  def close(self):
    if self.enabled and self.current is not None:
      self.stream.write('\n')
      self.stream.flush()
    self.current = None


def _load_image(path):
  """uint8 [H, W, 3], decoded as training images are (`io_util.decode_image_bytes`);
  a missing, undecodable or too large file raises InputError."""
  from diffusion_jax import io_util
  from diffusion_jax.errors import InputError
  if not path or not os.path.isfile(path):
    raise InputError(f'image {path!r}: no such file; pass the path of an image file')
  with open(path, 'rb') as f:
    data = f.read()
  try:
    return io_util.decode_image_bytes(data)
  except io_util.ImageDecodeError as e:
    fix = (f'shrink it to at most {io_util.MAX_IMAGE_PIXELS} pixels' if e.reason == 'too_large'
           else 'pass a PNG, JPEG or other image PIL reads')
    raise InputError(f'image {path!r} cannot be used ({e}); {fix}') from None


def write_outputs(out_dir: str, images, captions, meta) -> None:
  import numpy as np
  from PIL import Image
  from diffusion_jax import io_util
  os.makedirs(out_dir, exist_ok=True)
  names = []
  for i, image in enumerate(np.asarray(images)):
    name = f'{i:05d}.png'
    Image.fromarray(image).save(os.path.join(out_dir, name))
    names.append(name)
  Image.fromarray(io_util.make_grid(np.asarray(images))).save(os.path.join(out_dir, 'grid.png'))
  with open(os.path.join(out_dir, 'captions.json'), 'w') as f:
    json.dump({'images': [{'file': n, 'caption': c} for n, c in zip(names, captions)],
               **meta}, f, indent=1)


def run(config, workdir: str | None, prompts: list[str], *, pretrained: str | None = None,
        sets=(), num_images: int = 1, seed: int = 0, out: str = 'samples', stages=None,
        mode: str = 'generate', progress: bool = True, image: str | None = None,
        image_b: str | None = None, mask: str | None = None, eta: float = 1.0,
        num_interp: int = 5, new_prompt: str | None = None,
        weights=('0', '0.25', '0.5', '0.75'), clip_guidance_scale: float = 0.0):
  """Samples the cascade of `config` rooted at `workdir`, or the pretrained stages in
  `pretrained` with the sampler overrides `sets` (`--set` values); writes `out`."""
  import jax
  import numpy as np
  from diffusion_jax import config_util, pipelines, validation
  if pretrained is not None and (config is not None or workdir):
    raise CLIError('give either --pretrained=DIR or --config=FILE:ARG with --workdir=ROOT, '
                   'not both')
  if pretrained is None and config is None:
    raise CLIError('give --pretrained=DIR (converted stages) or --config=FILE:ARG with '
                   '--workdir=ROOT, e.g. --config=configs/imagen.py:stage=cascade,size=tiny')
  if pretrained is None and not workdir:
    raise CLIError('--workdir is required: the ROOT that holds one directory per stage')
  if pretrained is None and sets:
    raise CLIError('--set is for --pretrained; with --config set sampler settings with '
                   '--config.stages.<stage>.<setting>=VALUE')
  if config is not None:
    validation.check_cascade_config(config)
  _check_numbers(num_images=num_images, eta=eta, clip_guidance_scale=clip_guidance_scale,
                 **({'num': num_interp} if mode == 'interpolate' else {}))
  if stages and config is not None:
    for name in stages:
      if name not in config.stages:
        raise CLIError(f'unknown stage {name!r}; the {config.family} cascade has '
                       f'{", ".join(config.stages.keys())}')
    config.order = tuple(stages)
  if mode == 'generate' and not prompts:
    raise CLIError('no prompts: pass --prompt="..." or --prompts_file=FILE')
  validation.check_writable_dir(out, '--out')
  overrides = {}
  if pretrained is not None:
    pipe = open_pretrained(pretrained)  # builds no stage yet: nothing loads or compiles
    if stages:
      _restrict_chain(pipe, stages)
    overrides = parse_sets(sets, pipe.config)
    run_stages = pipe.order if mode != 'inpaint' else config_util.get(
        pipe.config, 'inpaint_stages', ())
    _check_spacing(pipe.config, overrides, tuple(run_stages or ()))
  else:
    pipe = pipelines.load(config, workdir)  # a stage without a checkpoint: errors.InputError
  family, source = pipe.config.family, pretrained or workdir
  if mode == 'inpaint' and hasattr(pipe, 'inpaint') and not config_util.get(
      pipe.config, 'inpaint_stages'):
    raise CLIError(f'--mode=inpaint: {source} has no inpainting stage; convert them into it: '
                   f'python -m diffusion_jax.tools.convert_glide --kind=base-inpaint '
                   f'--out={source} (and --kind=upsample-inpaint)')
  if clip_guidance_scale > 0 and mode == 'generate' and not config_util.get(
      pipe.config, 'clip_stage'):
    raise CLIError(f'--clip_guidance_scale={clip_guidance_scale}: {source} has no noised CLIP '
                   f'stage to guide with (the {family} cascade); leave it at 0')
  bar = ProgressBar(enabled=progress)
  pipe.progress.listener = bar
  rng = jax.random.PRNGKey(seed)
  captions = []
  start = time.perf_counter()
  try:
    if mode == 'generate':
      rows = [p for p in prompts for _ in range(num_images)]
      extra = dict(overrides)
      if clip_guidance_scale > 0:
        extra['clip_guidance_scale'] = clip_guidance_scale
      images = pipe.generate(rows, rng, **extra)
      captions = rows
    elif mode == 'inpaint':
      if not hasattr(pipe, 'inpaint'):
        raise CLIError(f'--mode=inpaint needs the GLIDE cascade, not {family}')
      image, mask = _load_image(image), _load_image(mask)
      mask = (mask.mean(-1) > 127).astype(np.float32)
      prompt = prompts[0] if prompts else ''
      images = pipe.inpaint(np.repeat(image[None], num_images, 0), mask, prompt, rng,
                            **overrides)
      captions = [prompt] * num_images
    elif mode == 'variations':
      _need(pipe, 'variations')
      source_image = _load_image(image)
      images = pipe.variations(np.repeat(source_image[None], num_images, 0), rng, eta)
      captions = [f'variation {i} (eta={eta})' for i in range(num_images)]
    elif mode == 'interpolate':
      _need(pipe, 'interpolate')
      images = pipe.interpolate(_load_image(image), _load_image(image_b), num_interp, rng)
      captions = [f'interpolation {i}/{num_interp - 1}' for i in range(num_interp)]
    else:
      _need(pipe, 'text_diff')
      if not prompts or not new_prompt:
        raise CLIError('--mode=text_diff needs --prompt (the caption) and --new_prompt')
      try:
        weights = [float(w) for w in weights]
      except ValueError:
        raise CLIError(f'--weights={",".join(map(str, weights))}: give numbers, e.g. '
                       '0,0.25,0.5') from None
      images = pipe.text_diff(_load_image(image), prompts[0], new_prompt, weights, rng)
      captions = [f'{prompts[0]} -> {new_prompt} ({w})' for w in weights]
  finally:
    bar.close()
  total = time.perf_counter() - start
  timings = {k: round(v, 3) for k, v in pipe.timings.items()}
  used = _settings_used(pipe, timings, overrides)
  for name, seconds in timings.items():
    steps = f', {used[name]["steps"]} steps' if name in used else ''
    print(f'stage {name}: {seconds:.2f}s{steps}', file=sys.stderr)
  print(f'total: {total:.2f}s for {len(images)} images', file=sys.stderr)
  where = {'pretrained': pretrained} if pretrained is not None else {'workdir': workdir}
  write_outputs(out, images, captions, {'seed': seed, 'mode': mode, 'family': family,
                                        'stage_seconds': timings, 'settings': used, **where})
  print(f'wrote {len(images)} images, grid.png and captions.json to {out}')
  return images


def open_pretrained(path: str):
  """`pipelines.from_pretrained(path)`, a missing or empty directory a one-line error that
  names the converter."""
  from diffusion_jax import pipelines, pretrained
  convert = (f'python -m diffusion_jax.tools.convert_glide --checkpoint=base.pt --kind=base '
             f'--out={path}')
  if not os.path.isdir(path):
    raise CLIError(f'--pretrained={path}: no such directory; write one with {convert}')
  from diffusion_jax.diffusers_io import latent_pipeline
  if latent_pipeline.is_latent_dir(path):
    raise CLIError(f'--pretrained={path}: a diffusers latent pipeline (Stable Diffusion, DiT, '
                   'PixArt) samples from Python here: pipelines.from_pretrained(DIR).generate('
                   'prompts, key)')
  if not pretrained.stage_dirs(path):
    raise CLIError(f'--pretrained={path}: holds no pretrained stage (a subdirectory with '
                   f'{pretrained.CONFIG_FILE} and {pretrained.WEIGHTS_FILE}); write one with '
                   f'{convert}')
  return pipelines.from_pretrained(path)


def _restrict_chain(pipe, stages) -> None:
  """--stages with --pretrained: a prefix (or any ordered subset) of the text-to-image chain."""
  for name in stages:
    if name not in pipe.order:
      raise CLIError(f'--stages: unknown stage {name!r}; the chain of {pipe.root} is '
                     f'{", ".join(pipe.order)}')
  pipe.order = pipe.config.order = tuple(stages)


def parse_sets(sets, cascade_config) -> dict:
  """`--set` values -> the pipeline's overrides: KEY=VALUE applies to every stage
  ({KEY: value}), STAGE.KEY=VALUE to one ({STAGE: {KEY: value}}); values typed and checked
  as the sampler settings are (`pipelines.common.Settings`)."""
  from diffusion_jax.pipelines.common import SETTINGS, Settings
  overrides: dict = {}
  defaults = Settings()
  stage_names = list(cascade_config.stages.keys())
  for item in sets:
    left, eq, text = item.partition('=')
    stage, _, key = left.rpartition('.')
    if not eq or not key:
      raise CLIError(f'--set={item}: give KEY=VALUE or STAGE.KEY=VALUE, e.g. '
                     '--set=guidance_scale=3 or --set=base.spacing=50')
    if stage and stage not in stage_names:
      raise CLIError(f'--set={item}: no stage {stage!r}; the stages are '
                     f'{", ".join(stage_names)}')
    if key not in SETTINGS:
      raise CLIError(f'--set={item}: unknown setting {key!r}; the settings are '
                     f'{", ".join(SETTINGS)}')
    kind = type(getattr(defaults, key))
    try:
      value = kind(text.strip()) if kind is not str else text.strip()
    except ValueError:
      raise CLIError(f'--set={item}: {key} takes {"an integer" if kind is int else "a number"}'
                     ) from None
    try:
      defaults.replace(**{key: value})  # the settings' range checks (validation)
    except errors.InputError as e:
      raise CLIError(f'--set={item}: {e}') from None
    (overrides.setdefault(stage, {}) if stage else overrides)[key] = value
  return overrides


def _check_spacing(cascade_config, overrides, names) -> None:
  """A num_steps that a stage of the run (`names`) would ignore (its spacing is a
  glide-text2im respacing string, which fixes the steps) is an error, not a silent no-op."""
  from diffusion_jax.diffusion import schedules
  from diffusion_jax.pipelines.common import Settings
  for name in names:
    per = dict(overrides.get(name) or {})
    mine = {**{k: v for k, v in overrides.items() if not isinstance(v, dict)}, **per}
    if 'num_steps' not in mine:
      continue
    spacing = str(mine.get('spacing', Settings.from_entry(cascade_config.stages[name]).spacing))
    if schedules.is_glide_spacing(spacing):
      raise CLIError(f'--set num_steps={mine["num_steps"]}: stage {name!r} samples with '
                     f'glide-text2im\'s respacing spacing={spacing}, which fixes its steps; '
                     f'give --set={name}.spacing={mine["num_steps"]} (or ddimN, fast27) instead')


def _settings_used(pipe, timings, overrides) -> dict:
  """stage -> the settings it sampled with (and its model calls, `steps`), for the stages
  that ran."""
  out = {}
  for name in timings:
    if name in pipe.config.stages:
      s = pipe.settings(name, overrides)
      out[name] = {**dataclasses.asdict(s), 'steps': pipe.stage(name).num_steps(s)}
  return out


# The least value of each numeric flag of `run`.
_FLAG_MINIMA = {'num_images': 1, 'num': 2, 'eta': 0.0, 'clip_guidance_scale': 0.0}


def _check_numbers(**values) -> None:
  for name, value in values.items():
    if not value >= _FLAG_MINIMA[name]:
      raise CLIError(f'--{name}={value}: must be at least {_FLAG_MINIMA[name]}')


def _need(pipe, method: str):
  if not hasattr(pipe, method):
    raise CLIError(f'--mode={method} needs the unCLIP cascade')


def main(argv, F: flags.FlagValues = flags.FLAGS):
  del argv
  verbosity = F['verbosity'] if 'verbosity' in F else None
  if verbosity is None or not verbosity.present:
    logging.set_verbosity(logging.WARNING)  # keep checkpoint-library chatter off the bar
  prompts = read_prompts(F.prompt, F.prompts_file)
  run(F.config, F.workdir, prompts, pretrained=F.pretrained, sets=F.set,
      num_images=F.num_images, seed=F.seed, out=F.out,
      stages=F.stages, mode=F.mode, progress=not F.quiet, image=F.image, image_b=F.image_b,
      mask=F.mask, eta=F.eta, num_interp=F.num, new_prompt=F.new_prompt, weights=F.weights,
      clip_guidance_scale=F.clip_guidance_scale)


if __name__ == '__main__':
  from diffusion_jax import hugepages
  hugepages.reexec_with_huge_pages()
  define_flags()
  cli.run(main, config='cascade')
