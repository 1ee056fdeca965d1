"""Shared helpers of the launch scripts: the train command line, and running or printing
commands (--dry_run prints every command, one per line, and runs nothing).

The scripts use only the standard library: they run on a laptop or a login node where the
package itself need not be installed.
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
  return cmd


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
