r"""The command lines' one library: absl flags, `--config=FILE:ARG` configs (ml_collections) with
`--config.a.b=v` overrides, a help text that names every family's stages and the config
fields, and bad input as one line on stderr with exit status 2 (`errors.InputError`, raised
anywhere in the library, included), checked before any compilation: a config is validated
(`validation`) as soon as its flag is parsed.

A CLI module is written

  def define_flags(flag_values=flags.FLAGS, sys_argv=None):   # its flags
    cli.define_config(flag_values, sys_argv)                   # where it takes a config
    flags.DEFINE_string('workdir', None, '...', flag_values=flag_values)

  def main(argv, F=flags.FLAGS):                               # thin: F's values to functions
    ...

  if __name__ == '__main__':
    define_flags()
    cli.run(main, config='stage')

Its flags are defined when it runs as a program, never when another module imports it for its
functions; `call(module, args)` runs the same in this process on a fresh FlagValues (tests).
`--help` (exit status 0) prints the module docstring (the run command at its top), the help
text of `config_help` and the flags. Importing this module imports absl, ml_collections and
`errors` only, neither jax nor TensorFlow: `--help` and a bad command line answer before
either loads.
"""
from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import os
import sys
from typing import Any, Callable, Sequence

from absl import app, flags
import ml_collections
from ml_collections import config_flags

from diffusion_jax import errors

# Flags defined through the helpers below belong to the CLI that calls them (its --help).
flags.disclaim_key_flags()

FAMILIES = ('imagen', 'glide', 'unclip', 'latent')
_HELP_FLAGS = ('help', '?', 'helpshort', 'helpfull', 'helpxml')

# (field, what it is) of a stage config, set with --config.FIELD=VALUE.
STAGE_FIELDS = (
    ('seed', 'random seed of the run (initialisation, data order, noise)'),
    ('total_steps', 'train steps'),
    ('ckpt_steps', 'steps between checkpoints (a killed run resumes from the last)'),
    ('log_steps', 'steps between logged metrics'),
    ('input.batch_size', 'global batch, over every process and device'),
    ('input.dataset', 'registered dataset: coco_captions, folder, or a project\'s (shapes)'),
    ('input.data_dir', 'TFDS data dir of the dataset'),
    ('input.image_size', 'training resolution (input.low_res_size: an SR stage\'s input)'),
    ('text_encoder.path', 'pretrained T5/CLIP directory (transformers layout); unset: random'),
    ('mesh.data, mesh.fsdp, mesh.tensor', 'device mesh axis sizes (-1: the rest)'),
    ('model.*', 'the network: model.model_channels, model.channel_mult, model.dtype, '
                'model.remat_policy, ...'),
    ('diffusion.*', 'diffusion.schedule, diffusion.parameterization, '
                    'diffusion.cond_drop_text, diffusion.noise_aug, ...'),
    ('sampler.*', 'sample grids while training: sampler.name, sampler.num_steps, '
                  'sampler.guidance_scale, sampler.threshold, ...'),
    ('optimizer.*', 'optimizer.lr, optimizer.warmup_steps, optimizer.ema_decay, ...'),
)
# (field, what it is) of a cascade config (stage=cascade).
CASCADE_FIELDS = (
    ('order', 'the stages sampled, in order'),
    ('stages.<stage>.num_steps', 'sampler steps of that stage'),
    ('stages.<stage>.sampler', 'ddpm, ddim or dpmpp_2m'),
    ('stages.<stage>.guidance_scale', 'classifier-free guidance scale'),
    ('stages.<stage>.eta', 'DDIM eta (DDPM: 1)'),
    ('stages.<stage>.threshold', 'none, static or dynamic (stages.<stage>.percentile)'),
    ('stages.<stage>.aug_level', 'noise-conditioning augmentation level of an SR stage'),
    ('stages.<stage>.dir', 'the stage\'s directory under --workdir (default: its name)'),
    ('stages.<stage>.use_ema', 'sample the EMA weights'),
)


# A bad command line, or an input it names that is missing: one line, exit status 2.
CLIError = errors.InputError


# The configs' stages, read without importing them (importing a config imports jax) ---------

def _configs_dir() -> str | None:
  spec = importlib.util.find_spec('configs')
  if spec is None or not spec.submodule_search_locations:
    return None
  return list(spec.submodule_search_locations)[0]


_ABSENT = object()


@functools.lru_cache(maxsize=None)
def _constant(module: str, name: str, default=_ABSENT):
  """`name` of configs/<module>.py: the literal assigned at its top level when the source is
  at hand (`default` when the source assigns none), else the imported module's attribute."""
  folder = _configs_dir()
  path = os.path.join(folder, f'{module}.py') if folder else None
  if path and os.path.isfile(path):
    with open(path, encoding='utf-8') as f:
      tree = ast.parse(f.read(), path)
    for node in tree.body:
      if isinstance(node, ast.Assign) and any(
          isinstance(t, ast.Name) and t.id == name for t in node.targets):
        return ast.literal_eval(node.value)
    if default is not _ABSENT:
      return default
  if default is _ABSENT:
    return getattr(importlib.import_module(f'configs.{module}'), name)
  return getattr(importlib.import_module(f'configs.{module}'), name, default)


def family_stages(family: str) -> tuple[str, ...]:
  """`configs/<family>.py`'s STAGES, `cascade` (the sampling chain) last."""
  return tuple(_constant(family, 'STAGES'))


def sizes() -> tuple[str, ...]:
  return tuple(_constant('common', 'SIZES'))


def family_sizes(family: str) -> tuple[str, ...]:
  """`configs/<family>.py`'s own SIZES where it has them, else the common ones."""
  own = _constant(family, 'SIZES', None)
  return sizes() if own is None else tuple(own)


def config_help(kind: str = 'stage', flag: str = 'config') -> str:
  """The help text of a `--config` flag: every family's stages and sizes, and the fields
  that `--config.FIELD=VALUE` sets. kind: 'stage' (a stage to train), 'cascade' (the
  sampling chain, stage=cascade) or 'any'."""
  cascade = kind == 'cascade'
  arg = 'stage=cascade,size=SIZE' if cascade else 'stage=STAGE,size=SIZE'
  lines = [f'Configs: --{flag}=FILE:{arg}, FILE one of']
  width = max(len(f'configs/{f}.py') for f in FAMILIES)
  for family in FAMILIES:
    stages = family_stages(family)
    if cascade:
      if 'cascade' not in stages:
        continue
      names = ' '.join(s for s in stages if s != 'cascade')
      lines.append(f'  {f"configs/{family}.py":<{width}}  cascade of stages {names}')
    else:
      own = family_sizes(family)
      also = f' (sizes {" ".join(own)})' if own != sizes() else ''
      lines.append(f'  {f"configs/{family}.py":<{width}}  stages {" ".join(stages)}{also}')
  lines.append(f'  sizes: {" ".join(sizes())}; projects/shapes/configs/<family>.py: the same '
               'stages at size shapes.')
  if not cascade and flag == 'config':
    lines.append('  stage=cascade is the sampling chain (python -m diffusion_jax.sample); '
                 'the other stages train.')
  if flag != 'config':
    return '\n'.join(lines) + '\n'
  groups = []
  if kind in ('stage', 'any'):
    groups.append(('Stage config fields', 'total_steps=100', STAGE_FIELDS))
  if kind in ('cascade', 'any'):
    groups.append(('Cascade config fields (stage=cascade)', 'stages.base64.num_steps=32',
                   CASCADE_FIELDS + (('seed', 'random seed'),)))
  for title, example, fields in groups:
    lines += ['', f'{title}: set any with --config.FIELD=VALUE (e.g. --config.{example})']
    width = max(len(f) for f, _ in fields)
    lines += [f'  {f:<{width}}  {what}' for f, what in fields]
  return '\n'.join(lines) + '\n'


def define_config(flag_values: flags.FlagValues = flags.FLAGS, sys_argv=None, *,
                  kind: str = 'stage', required: bool = False, lock_config: bool = True):
  """The `--config=FILE:ARG` flag (`--config.a.b=v` overrides; `sys_argv`: the command line
  they are read from, default sys.argv)."""
  example = ('configs/imagen.py:stage=cascade,size=tiny' if kind == 'cascade' else
             'configs/imagen.py:stage=base64,size=tiny')
  holder = config_flags.DEFINE_config_file(
      'config', None, f'{"cascade" if kind == "cascade" else "stage"} config FILE:ARG, e.g. '
      f'{example}; the stages and fields: above', flag_values=flag_values,
      lock_config=lock_config, sys_argv=sys_argv)
  if required:
    flags.mark_flag_as_required('config', flag_values=flag_values)
  flag_values['config'].config_kind = kind  # which checks its config gets once parsed
  return holder


# Parsing, errors, running --------------------------------------------------------------------

def fail(message: Any, status: int = errors.INPUT_EXIT_STATUS):
  """`error: MESSAGE` as one line on stderr, then exit with `status`."""
  text = ' '.join(line.strip() for line in str(message).splitlines() if line.strip())
  print(f'error: {text or type(message).__name__}', file=sys.stderr, flush=True)
  sys.exit(status)


def error_line(e: BaseException) -> str:
  """The line that says what is wrong in absl's (possibly nested) flag error."""
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  if not lines:
    return repr(e)
  reason = next((line for line in reversed(lines) if 'Error: ' in line), lines[-1])
  return reason.split('Error: ', 1)[-1]


def _asked_for_help(argv: Sequence[str]) -> bool:
  for arg in argv[1:]:
    if arg == '--':
      break
    if arg.startswith('-') and arg.lstrip('-').split('=', 1)[0] in _HELP_FLAGS:
      return True
  return False


def _missing_field(argv: Sequence[str], e: BaseException) -> str | None:
  """`--config.a.b: ...` for the override that names a field the config lacks."""
  name = str(e.args[0] if e.args else e).strip('"\'')
  for arg in argv[1:]:
    key = arg.split('=', 1)[0]
    if arg.startswith('--') and '.' in key and name in key.lstrip('-').split('.')[1:]:
      return f'{key}: the config has no field {name!r}'
  return None


def _config_load_error(flag_values: flags.FlagValues) -> str | None:
  """A config file that did not load: config_flags reports it only when the config is read."""
  error_type = getattr(getattr(config_flags, 'config_flags', None), '_ErrorConfig', None)
  if error_type is None:
    return None
  for name in flag_values:
    value = flag_values[name].value
    if isinstance(value, error_type):
      return f'--{name}={flag_values[name].serialize().split("=", 1)[-1]}: ' + error_line(
          object.__getattribute__(value, '_error'))
  return None


def parse_flags(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """absl's parser: `--help` exits 0, a bad flag or config (`validation`) is one line and
  status 2."""
  try:
    rest = flag_values(list(argv))
  except SystemExit as e:
    if e.code not in (0, None) and _asked_for_help(argv):
      sys.exit(0)  # absl's --help exits 1
    raise
  except BrokenPipeError:  # --help | head
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(0 if _asked_for_help(argv) else 1)
  except KeyboardInterrupt:
    fail('interrupted', errors.INTERRUPTED_EXIT_STATUS)
  except flags.Error as e:
    fail(error_line(e))
  except (AttributeError, KeyError) as e:  # an override of a field the config lacks
    fail(_missing_field(argv, e) or error_line(e))
  except Exception as e:  # noqa: BLE001 - whatever parsing the command line raised
    fail(error_line(e))
  problem = _config_load_error(flag_values)
  if problem:
    fail(problem)
  for config, kind in _configs(flag_values):
    try:
      _validate(config, kind)
    except errors.InputError as e:
      fail(e)
  return rest


def _configs(flag_values: flags.FlagValues) -> list[tuple[ml_collections.ConfigDict, str]]:
  """(config, kind) of each config flag: what it loaded and the kind `define_config` gave
  it ('any' for a config flag defined otherwise)."""
  found = [flag_values[name] for name in flag_values]
  return [(f.value, getattr(f, 'config_kind', 'any')) for f in found
          if isinstance(f.value, ml_collections.ConfigDict)]


def _validate(config, kind: str) -> None:
  """The checks of the config a CLI takes (kind 'stage' or 'cascade'; 'any': the kind the
  config says it is): errors.InputError."""
  from diffusion_jax import validation  # noqa: PLC0415 - after the config loaded jax
  if kind == 'cascade' or (kind == 'any' and config.get('stage') == 'cascade'):
    validation.check_cascade_config(config)
  else:
    validation.check_stage_config(config)


def _run_main(main: Callable, argv: Sequence[str], *args):
  if len(argv) > 1:
    fail(f'unexpected arguments {list(argv[1:])}: every option is a --flag (see --help)')
  try:
    return main(argv, *args)
  except (errors.InputError, app.UsageError) as e:
    fail(e)
  except KeyboardInterrupt:
    fail('interrupted', errors.INTERRUPTED_EXIT_STATUS)


def _aliased(argv: Sequence[str], aliases: dict[str, str] | None) -> list[str]:
  return [argv[0]] + [(aliases or {}).get(a, a) for a in argv[1:]]


def run(main: Callable, *, config: str | None = None, config_flag: str = 'config',
        aliases: dict[str, str] | None = None) -> None:
  """`app.run(main)` with `parse_flags`; an errors.InputError (CLIError) or app.UsageError
  that `main` raises is one line and status 2, Ctrl-C `error: interrupted` and status 130.
  `config` ('stage', 'cascade' or 'any'): the CLI takes a config of that kind,
  whose help text (`config_help`) follows the module docstring in `--help`. `aliases`:
  arguments spelled otherwise before parsing (e.g. {'-v': '--verbose'})."""
  module = sys.modules['__main__']
  if config:
    doc = (module.__doc__ or '').rstrip('\n')
    module.__doc__ = f'{doc}\n\n{config_help(config, config_flag)}'
  sys.argv = _aliased(sys.argv, aliases)
  app.run(functools.partial(_run_main, main), flags_parser=parse_flags)


def call(module, args: Sequence[str] = (), *, aliases: dict[str, str] | None = None):
  """Runs `module`'s command line in this process, as `python -m <module> ARGS` would, on a
  fresh FlagValues (tests): its `define_flags`, `parse_flags` and `main`; returns main's
  result. Bad command lines exit as they would (SystemExit, one line on stderr)."""
  argv = _aliased([module.__name__, *args], aliases)
  values = flags.FlagValues()
  module.define_flags(values, sys_argv=argv)
  rest = parse_flags(argv, values)
  return _run_main(module.main, rest, values)
