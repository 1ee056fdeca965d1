"""Shared helpers of the launch scripts: the train command line, and running or printing
commands (--dry_run prints every command, one per line, and runs nothing).

The scripts use only the standard library: they run on a laptop or a login node where the
package itself need not be installed. Where it is, the train command is parsed here first as
every host will parse it, so a bad config is one line and exit status 2 before any machine is
touched.
"""
from __future__ import annotations

import shlex
import subprocess
import sys
from typing import Sequence

TRAIN_MODULE = 'diffusion_jax.train'


def train_command(config: str, workdir: str, overrides: Sequence[str] = (),
                  distributed: bool = False, python: str = 'python3') -> list[str]:
  """`python -m diffusion_jax.train --config=... --workdir=... [--config.a=b ...]`."""
  cmd = [python, '-m', TRAIN_MODULE, f'--config={config}', f'--workdir={workdir}']
  if distributed:
    cmd.append('--distributed')
  for o in overrides:
    # Accept both "total_steps=10" and "--config.total_steps=10".
    o = o if o.startswith('--') else f'--config.{o}'
    cmd.append(o)
  check_train_command(cmd)
  return cmd


def check_train_command(cmd: Sequence[str]) -> None:
  """Parses the train command's flags (the config file, its overrides, validation) where the
  package is importable; a bad one exits with one line and status 2. Elsewhere: nothing."""
  try:
    from absl import flags
    from diffusion_jax import cli
    from diffusion_jax.train import __main__ as train_main
  except ImportError:
    return
  argv = [TRAIN_MODULE, *cmd[3:]]
  values = flags.FlagValues()
  train_main.define_flags(values, sys_argv=argv)
  cli.parse_flags(argv, values)


def join(cmd: Sequence[str]) -> str:
  return shlex.join(list(cmd))


class Runner:
  """Runs commands in order, stopping at the first failure; in dry-run mode prints them."""

  def __init__(self, dry_run: bool, out=None):
    self.dry_run = dry_run
    self.out = out or sys.stdout

  def run(self, cmd: Sequence[str], *, check: bool = True, comment: str | None = None) -> int:
    if comment:
      print(f'# {comment}', file=self.out, flush=True)
    print(join(cmd) if self.dry_run else f'+ {join(cmd)}', file=self.out, flush=True)
    if self.dry_run:
      return 0
    rc = subprocess.call(list(cmd))
    if check and rc:
      raise SystemExit(f'command failed with exit status {rc}: {join(cmd)}')
    return rc

  def run_parallel(self, cmds: Sequence[Sequence[str]], *, comment: str | None = None) -> int:
    """Starts every command at once and waits for all; returns the worst exit status."""
    if comment:
      print(f'# {comment}', file=self.out, flush=True)
    for cmd in cmds:
      print(join(cmd) + (' &' if self.dry_run else ''), file=self.out, flush=True)
    if self.dry_run:
      print('wait', file=self.out, flush=True)
      return 0
    procs = [subprocess.Popen(list(c)) for c in cmds]
    codes = [p.wait() for p in procs]
    return max(codes, default=0)
