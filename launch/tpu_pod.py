r"""Train one stage on a Cloud TPU VM pod slice: create, install, train, logs, teardown.

  python launch/tpu_pod.py --name=imagen-base --zone=us-central2-b --accelerator=v4-512 \
      --config=configs/imagen.py:stage=base64,size=paper --workdir=gs://BUCKET/imagen/base64 \
      [--project=P] [--spot] [--override=total_steps=1000 ...] [--actions=all] [--dry_run]

Actions (run in this order; pick a subset with --actions=create,install,...):
  create    gcloud compute tpus tpu-vm create (one pod slice, every worker)
  install   copy this checkout (git archive of HEAD) to every worker and pip install it
            with the [tpu] extra
  train     start `python -m diffusion_jax.train ... --distributed` on every worker at once
            (one ssh --worker=all); each worker logs to ~/diffusion_jax_logs/train.log.
            jax.distributed.initialize() finds its peers from the TPU metadata, so no
            coordinator address is needed. With --wait the command blocks until training ends.
  logs      copy every worker's log to --log_dir/worker-<i>.log
  teardown  delete the TPU VM

--dry_run prints every command and runs nothing. The workdir should be a GCS path (or a
filesystem every worker mounts): checkpoints are written by all processes together.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

ACTIONS = ('create', 'install', 'train', 'logs', 'teardown')
REMOTE_DIR = '~/diffusion_jax'
REMOTE_LOG_DIR = '~/diffusion_jax_logs'
# Chips per host of multi-host slices, and TensorCores per chip as counted in the
# accelerator-type name (v4-N and v5p-N count TensorCores; v5litepod-N counts chips).
_GENERATIONS = {'v4': (4, 2), 'v5p': (4, 2), 'v5litepod': (4, 1), 'v6e': (4, 1)}


def num_workers(accelerator: str) -> int:
  """Hosts of a slice from its accelerator type, e.g. v4-512 -> 256 chips -> 64 hosts."""
  gen, _, n = accelerator.rpartition('-')
  if gen not in _GENERATIONS or not n.isdigit():
    raise ValueError(f'accelerator {accelerator!r}: expected one of '
                     f'{", ".join(g + "-N" for g in _GENERATIONS)} (or pass --num_workers)')
  chips_per_host, cores_per_chip = _GENERATIONS[gen]
  chips = int(n) // cores_per_chip
  if gen in ('v5litepod', 'v6e') and chips <= 8:
    return 1  # single-host slices of up to 8 chips
  return max(1, chips // chips_per_host)


def _gcloud(args, verb: list[str], *extra: str) -> list[str]:
  cmd = ['gcloud', 'compute', 'tpus', 'tpu-vm', *verb, f'--zone={args.zone}']
  if args.project:
    cmd.append(f'--project={args.project}')
  return cmd + list(extra)


def _ssh_all(args, remote: str) -> list[str]:
  return _gcloud(args, ['ssh', args.name], '--worker=all', f'--command={remote}')


def commands(args) -> list[tuple[str, list[list[str]], bool]]:
  """[(comment, commands, parallel)] for the requested actions, in order."""
  workers = args.num_workers or num_workers(args.accelerator)
  out = []
  actions = ACTIONS if args.actions == 'all' else tuple(args.actions.split(','))
  unknown = set(actions) - set(ACTIONS)
  if unknown:
    raise SystemExit(f'unknown action(s) {sorted(unknown)}; choose from {",".join(ACTIONS)}')
  if 'create' in actions:
    extra = [f'--accelerator-type={args.accelerator}', f'--version={args.runtime_version}']
    if args.spot:
      extra.append('--spot')
    out.append((f'create {args.name}: {args.accelerator}, {workers} workers',
                [_gcloud(args, ['create', args.name], *extra)], False))
  if 'install' in actions:
    tarball = f'/tmp/{args.name}-src.tar.gz'
    remote_tar = f'~/{os.path.basename(tarball)}'
    out.append(('install: this checkout (HEAD) on every worker', [
        ['git', 'archive', '--format=tar.gz', f'--output={tarball}', 'HEAD'],
        _gcloud(args, ['scp', tarball, f'{args.name}:{remote_tar}'], '--worker=all'),
        _ssh_all(args, f'mkdir -p {REMOTE_DIR} {REMOTE_LOG_DIR} && tar -xzf {remote_tar} -C '
                       f'{REMOTE_DIR} && cd {REMOTE_DIR} && python3 -m pip install -q -e '
                       f"'.[tpu]'"),
    ], False))
  if 'train' in actions:
    train = _common.join(_common.train_command(args.config, args.workdir, args.override,
                                               distributed=True))
    log = f'{REMOTE_LOG_DIR}/train.log'
    if args.wait:
      remote = f'cd {REMOTE_DIR} && {train} 2>&1 | tee {log}'
    else:
      # Detached, so that a dropped ssh connection does not kill the run.
      remote = (f'cd {REMOTE_DIR} && nohup {train} > {log} 2>&1 < /dev/null & '
                f'echo $! > {REMOTE_LOG_DIR}/train.pid')
    out.append((f'train on all {workers} workers', [_ssh_all(args, remote)], False))
  if 'logs' in actions:
    cmds = [['mkdir', '-p', args.log_dir]]
    cmds += [_gcloud(args, ['scp', f'{args.name}:{REMOTE_LOG_DIR}/train.log',
                            os.path.join(args.log_dir, f'worker-{i}.log')], f'--worker={i}')
             for i in range(workers)]
    out.append((f'logs of {workers} workers into {args.log_dir}', cmds, False))
  if 'teardown' in actions:
    out.append((f'teardown {args.name}', [_gcloud(args, ['delete', args.name], '--quiet')], False))
  return out


def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--name', required=True, help='TPU VM name')
  p.add_argument('--zone', required=True)
  p.add_argument('--project', default=None)
  p.add_argument('--accelerator', default='v4-8', help='accelerator type, e.g. v4-512')
  p.add_argument('--runtime_version', default='tpu-ubuntu2204-base')
  p.add_argument('--num_workers', type=int, default=0, help='hosts (default: from --accelerator)')
  p.add_argument('--spot', action='store_true')
  p.add_argument('--config', required=True, help='FILE:ARG, e.g. configs/imagen.py:stage=base64')
  p.add_argument('--workdir', required=True, help='ROOT/<stage>, a path every worker sees')
  p.add_argument('--override', action='append', default=[],
                 help='config override, e.g. total_steps=1000 (repeatable)')
  p.add_argument('--actions', default='all', help=f'comma list of {",".join(ACTIONS)} or all')
  p.add_argument('--log_dir', default='logs')
  p.add_argument('--wait', action='store_true', help='block until training ends')
  p.add_argument('--dry_run', action='store_true', help='print the commands, run nothing')
  return p.parse_args(argv)


def main(argv=None):
  args = parse(argv)
  runner = _common.Runner(args.dry_run)
  for comment, cmds, parallel in commands(args):
    if parallel:
      runner.run_parallel(cmds, comment=comment)
    else:
      for i, cmd in enumerate(cmds):
        runner.run(cmd, comment=comment if i == 0 else None)


if __name__ == '__main__':
  main()
