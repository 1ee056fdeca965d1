"""Every command line answers `--help` (exit status 0, the stages of each family and the config
fields named, without loading jax) and a bad flag with one line on stderr and status 2."""
from __future__ import annotations

import os
import subprocess
import sys

from absl import flags
import pytest

from configs import glide, imagen, unclip
from diffusion_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 90  # seconds; an answer takes about one, on a busy 2-core host a few

STAGE_FIELDS = ('seed', 'total_steps', 'ckpt_steps', 'log_steps', 'input.batch_size',
                'input.dataset', 'input.data_dir', 'text_encoder.path', 'mesh.data',
                'mesh.fsdp', 'mesh.tensor', 'model.', 'diffusion.', 'sampler.')
CASCADE_FIELDS = ('stages.<stage>.num_steps', 'stages.<stage>.guidance_scale',
                  'stages.<stage>.sampler', 'order', 'seed')
# How each CLI runs, the config it takes ('stage', 'cascade', 'model' for a benchmark's
# --model=CONFIG:ARG, or None) and flags its help must name.
CLIS = [
    ('-m', 'diffusion_jax.train', 'stage', ('--workdir', '--distributed')),
    ('-m', 'diffusion_jax.sample', 'cascade', ('--workdir', '--prompt', '--mode')),
    ('-m', 'diffusion_jax.evaluate', 'cascade', ('--inception_weights', '--compare')),
    ('-m', 'diffusion_jax.tools.aot', 'stage', ('--topology', '--batch', '--mesh', '--remat',
                                                '--set', '--mfu')),
    ('-m', 'diffusion_jax.tools.param_count', 'stage', ('--paper',)),
    ('-m', 'diffusion_jax.tools.export_clip', None, ('--workdir', '--out', '--raw')),
    ('-m', 'diffusion_jax.tools.convert_inception', None, ('--src', '--out')),
    ('-m', 'diffusion_jax.tools.gaussian_demo', None, ('--schedule', '--samplers')),
    ('-m', 'projects.shapes.demo', None, ('--workdir', '--family', '--steps', '--[no]verbose')),
    ('-m', 'projects.shapes.claims', None, ('--workdir', '--out', '--noaug_steps')),
    ('-m', 'projects.shapes.evaluate', 'cascade', ('--guidance', '--train_examples')),
    ('', 'benchmarks/train_step.py', 'model', ('--model', '--batch', '--cpu_devices')),
    ('', 'benchmarks/sample.py', 'model', ('--model', '--num_steps', '--guidance')),
    ('', 'benchmarks/data_pipeline.py', None, ('--batch_size', '--threads')),
    ('', 'benchmarks/peer.py', None, ('--kind', '--steps')),
]
IDS = [c[1] for c in CLIS]
# Loaded by no --help of the library's and the project's CLIs.
HEAVY = ('jax', 'jaxlib', 'flax', 'tensorflow', 'orbax', 'torch', 'grain', 'transformers')


def _run(runner, target, *args, importtime=False):
  cmd = [sys.executable] + (['-X', 'importtime'] if importtime else [])
  cmd += ([runner, target] if runner else [os.path.join(REPO, target)]) + list(args)
  # No huge-pages restart: one process, whose imports -X importtime lists.
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT, env=env)


def _imported(stderr: str) -> set[str]:
  """Top-level packages in `python -X importtime`'s report."""
  out = set()
  for line in stderr.splitlines():
    if line.startswith('import time:') and '|' in line:
      out.add(line.rsplit('|', 1)[-1].strip().split('.')[0])
  return out


@pytest.mark.parametrize('runner,target,config,names', CLIS, ids=IDS)
def test_help_exits_0_and_names_stages_and_fields(runner, target, config, names):
  proc = _run(runner, target, '--help', importtime=True)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  text = proc.stdout
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  shown = f'python -m {target}' if runner else f'python {target}'
  assert shown in text.split('flags:')[0], f'the docstring names no run command: {text[:500]}'
  for name in names:
    assert name in text, f'{target} --help does not name {name}'
  if config:
    for module in (imagen, glide, unclip):
      stages = [s for s in module.STAGES if config != 'cascade' or s != 'cascade']
      assert ' '.join(stages) in text, f'{target} --help lacks the {module.__name__} stages'
    assert 'cascade' in text
  if config == 'stage':
    for field in STAGE_FIELDS:
      assert field in text, f'{target} --help does not name the field {field}'
  if config == 'cascade':
    assert 'stage=cascade' in text
    for field in CASCADE_FIELDS:
      assert field in text, f'{target} --help does not name the field {field}'
  if runner:  # the benchmarks are jax programs; a CLI's --help loads none of it
    heavy = sorted(_imported(proc.stderr) & set(HEAVY))
    assert not heavy, f'{target} --help imported {heavy}'


@pytest.mark.parametrize('runner,target,config,names', CLIS, ids=IDS)
def test_bad_flag_is_one_line_and_status_2(runner, target, config, names):
  del config, names
  proc = _run(runner, target, '--no_such_flag=1')
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert lines == ["error: Unknown command line flag 'no_such_flag'"], proc.stderr[-3000:]


def test_bad_config_lines():
  """A config that fails to load or an override of a field it lacks: one line each."""
  for args, want in [
      (('--config=configs/imagen.py:stage=sr512,size=tiny',),
       "error: stage='sr512' is not one of base64, sr256, sr1024, cascade"),
      (('--config=configs/none.py:stage=base64',),
       "error: --config=configs/none.py:stage=base64: [Errno 2] No such file or directory: "
       "'configs/none.py'"),
      (('--config=configs/imagen.py:stage=base64,size=tiny', '--config.model.no_field=2'),
       "error: --config.model.no_field: the config has no field 'no_field'"),
      (('--config=configs/imagen.py:stage=base64,size=tiny', '--config.total_steps=x'),
       "error: flag --config.total_steps=x: invalid literal for int() with base 10: 'x'"),
  ]:
    proc = _run('-m', 'diffusion_jax.tools.param_count', *args)
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith('error:')]
    assert proc.returncode == 2 and lines == [want], proc.stderr[-3000:]
    assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]


def test_stages_are_read_from_the_configs():
  for module in (imagen, glide, unclip):
    family = module.__name__.split('.')[-1]
    assert cli.family_stages(family) == tuple(module.STAGES)
  from configs import common
  assert cli.sizes() == tuple(common.SIZES)
  text = cli.config_help('cascade')
  assert 'configs/unclip.py  cascade of stages clip prior decoder64 up256 up1024' in text


class _Tool:
  """A CLI module in the layout cli.call runs."""
  __name__ = 'tool'

  @staticmethod
  def define_flags(flag_values, sys_argv=None):
    cli.define_config(flag_values, sys_argv)
    flags.DEFINE_integer('n', 1, 'a number', flag_values=flag_values)

  @staticmethod
  def main(argv, F):
    del argv
    if F.n < 0:
      raise cli.CLIError('--n must be positive\n(it counts)')
    return F.n, F.config


def test_call_parses_a_fresh_flag_set_each_time(capsys):
  n, config = cli.call(_Tool, ['--n=3', '--config=configs/imagen.py:stage=base64,size=tiny',
                               '--config.total_steps=7'])
  assert n == 3 and config.total_steps == 7
  assert cli.call(_Tool, ['--n=4']) == (4, None), 'the flags of one call leak into the next'
  for args, want in [(['--n=-1'], 'error: --n must be positive (it counts)'),
                     (['--n=x'], "error: flag --n=x: invalid literal for int() with base 10: "
                                 "'x'"),
                     (['extra'], "error: unexpected arguments ['extra']: every option is a "
                                 "--flag (see --help)")]:
    with pytest.raises(SystemExit) as exit_:
      cli.call(_Tool, args)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [want]
