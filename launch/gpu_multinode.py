r"""Train one stage on several GPU hosts: one process per host, joined by jax.distributed.

Plain ssh (every host reachable by ssh, the checkout at --remote_dir on each):

  python launch/gpu_multinode.py ssh --hosts=gpu0,gpu1,gpu2,gpu3 --port=12355 \
      --config=configs/imagen.py:stage=sr256,size=paper --workdir=/shared/imagen/sr256 [--dry_run]

SLURM (writes an sbatch script and submits it; one task per node):

  python launch/gpu_multinode.py slurm --nodes=4 --gpus_per_node=8 --partition=gpu \
      --config=... --workdir=... [--script=train.sbatch] [--dry_run]

Each process runs `python -m diffusion_jax.train` with JAX_COORDINATOR_ADDRESS (the first
host and --port), JAX_NUM_PROCESSES and JAX_PROCESS_ID set; the train CLI reads them and
calls jax.distributed.initialize(). Every process sees all GPUs of its host and feeds its
share of the global batch. ssh mode waits for every host and then copies the logs into
--log_dir/host-<i>.log. --dry_run prints every command (and the sbatch script) and runs nothing.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def shell_path(path: str) -> str:
  """Quotes a path for a remote shell while keeping a leading ~ expandable."""
  if path == '~' or path.startswith('~/'):
    rest = path[2:]
    return '"$HOME"' + ('/' + shlex.quote(rest) if rest else '')
  return shlex.quote(path)


def env_prefix(coordinator: str, num_processes: int, process_id) -> list[str]:
  return ['env', f'JAX_COORDINATOR_ADDRESS={coordinator}', f'JAX_NUM_PROCESSES={num_processes}',
          f'JAX_PROCESS_ID={process_id}']


def ssh_commands(args) -> list[tuple[str, list[list[str]], bool]]:
  hosts = [h for h in args.hosts.split(',') if h]
  if not hosts:
    raise SystemExit('--hosts: give at least one host')
  args.remote_dir = args.remote_dir or '~/diffusion_jax'
  coordinator = f'{args.coordinator or hosts[0]}:{args.port}'
  train = _common.train_command(args.config, args.workdir, args.override, python=args.python)
  log = f'{args.remote_log_dir}/train.log'
  start = []
  for i, host in enumerate(hosts):
    remote = (f'mkdir -p {shell_path(args.remote_log_dir)} && cd {shell_path(args.remote_dir)} && '
              f'{_common.join(env_prefix(coordinator, len(hosts), i) + train)} > {shell_path(log)} 2>&1')
    start.append(['ssh', *args.ssh_option, host, remote])
  logs = [['mkdir', '-p', args.log_dir]]
  logs += [['scp', *args.ssh_option, f'{host}:{log}', os.path.join(args.log_dir, f'host-{i}.log')]
           for i, host in enumerate(hosts)]
  return [(f'train on {len(hosts)} hosts, coordinator {coordinator}', start, True),
          (f'logs of {len(hosts)} hosts into {args.log_dir}', logs, False)]


def sbatch_script(args) -> str:
  train = _common.join(_common.train_command(args.config, args.workdir, args.override,
                                             python=args.python))
  lines = [
      '#!/bin/bash',
      f'#SBATCH --job-name={args.job_name}',
      f'#SBATCH --nodes={args.nodes}',
      '#SBATCH --ntasks-per-node=1',
      f'#SBATCH --gpus-per-node={args.gpus_per_node}',
      f'#SBATCH --time={args.time}',
      f'#SBATCH --output={args.log_dir}/%x-%j.log',
  ]
  if args.partition:
    lines.append(f'#SBATCH --partition={args.partition}')
  lines += [
      'set -euo pipefail',
      'COORDINATOR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
      f'export JAX_COORDINATOR_ADDRESS="$COORDINATOR:{args.port}"',
      'export JAX_NUM_PROCESSES="$SLURM_NNODES"',
      'cd ' + (shell_path(args.remote_dir) if args.remote_dir else '"$SLURM_SUBMIT_DIR"'),
      # JAX_PROCESS_ID must be the task's own rank: expand it inside each task.
      f'srun --output={args.log_dir}/%x-%j-%t.log bash -c '
      + shlex.quote(f'JAX_PROCESS_ID=$SLURM_PROCID exec {train}'),
  ]
  return '\n'.join(lines) + '\n'


def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest='mode', required=True)
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument('--config', required=True)
  common.add_argument('--workdir', required=True, help='ROOT/<stage> on a filesystem all hosts share')
  common.add_argument('--override', action='append', default=[],
                      help='config override, e.g. total_steps=1000 (repeatable)')
  common.add_argument('--port', type=int, default=12355, help='coordinator port')
  common.add_argument('--remote_dir', default=None,
                      help='the checkout on each host (ssh: ~/diffusion_jax; slurm: the '
                           'directory sbatch was called from)')
  common.add_argument('--python', default='python3')
  common.add_argument('--log_dir', default='logs')
  common.add_argument('--dry_run', action='store_true', help='print the commands, run nothing')
  s = sub.add_parser('ssh', parents=[common])
  s.add_argument('--hosts', required=True, help='comma list; the first is the coordinator')
  s.add_argument('--coordinator', default=None, help='address of the first host if it differs')
  s.add_argument('--remote_log_dir', default='~/diffusion_jax_logs')
  s.add_argument('--ssh_option', action='append', default=[],
                 help='extra ssh/scp argument, e.g. -oStrictHostKeyChecking=no (repeatable)')
  s = sub.add_parser('slurm', parents=[common])
  s.add_argument('--nodes', type=int, required=True)
  s.add_argument('--gpus_per_node', type=int, default=8)
  s.add_argument('--partition', default=None)
  s.add_argument('--time', default='72:00:00')
  s.add_argument('--job_name', default='diffusion_jax')
  s.add_argument('--script', default='diffusion_jax.sbatch', help='where to write the script')
  return p.parse_args(argv)


def main(argv=None):
  args = parse(argv)
  runner = _common.Runner(args.dry_run)
  if args.mode == 'ssh':
    worst = 0
    for comment, cmds, parallel in ssh_commands(args):
      if parallel:
        worst = runner.run_parallel(cmds, comment=comment)
      else:
        for i, cmd in enumerate(cmds):
          runner.run(cmd, check=False, comment=comment if i == 0 else None)
    if worst:
      raise SystemExit(f'a host exited with status {worst}; see {args.log_dir}')
    return
  script = sbatch_script(args)
  if args.dry_run:
    print(f'# sbatch script ({args.script}):')
    print(script, end='')
  else:
    with open(args.script, 'w') as f:
      f.write(script)
  runner.run(['mkdir', '-p', args.log_dir], comment='slurm writes the logs here')
  runner.run(['sbatch', args.script], comment=f'submit {args.nodes} nodes')


if __name__ == '__main__':
  main()
