"""The launch scripts' --dry_run output: the exact commands a pod or cluster run would execute."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = 'configs/imagen.py:stage=base64,size=paper'


def _dry_run(script, *args):
  out = subprocess.run([sys.executable, os.path.join(ROOT, 'launch', script), *args,
                        '--dry_run'], capture_output=True, text=True, check=True, cwd=ROOT)
  return [l for l in out.stdout.splitlines() if l.strip()]


def _commands(lines):
  return [shlex.split(l.rstrip(' &')) for l in lines if not l.startswith('#') and l != 'wait']


def _option(cmd, name):
  values = [a.split('=', 1)[1] for a in cmd if a.startswith(f'--{name}=')]
  assert len(values) == 1, (name, cmd)
  return values[0]


def test_tpu_pod_dry_run_prints_every_action_in_order():
  lines = _dry_run('tpu_pod.py', '--name=imagen-base', '--zone=us-central2-b',
                   '--accelerator=v4-512', '--project=proj', f'--config={CONFIG}',
                   '--workdir=gs://bucket/imagen/base64', '--override=total_steps=10',
                   '--log_dir=out/logs')
  cmds = _commands(lines)
  create = [c for c in cmds if c[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create']]
  assert len(create) == 1 and create[0][5] == 'imagen-base'
  assert _option(create[0], 'accelerator-type') == 'v4-512'
  assert _option(create[0], 'zone') == 'us-central2-b'
  assert _option(create[0], 'project') == 'proj'
  # install and train go to every worker with one ssh each
  ssh = [c for c in cmds if c[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh']]
  assert len(ssh) == 2 and all(_option(c, 'worker') == 'all' for c in ssh)
  assert "pip install -q -e '.[tpu]'" in _option(ssh[0], 'command')
  train = _option(ssh[1], 'command')
  train_cmd = shlex.split(train.split('nohup ', 1)[1].split(' > ', 1)[0])
  assert train_cmd == ['python3', '-m', 'diffusion_jax.train', f'--config={CONFIG}',
                       '--workdir=gs://bucket/imagen/base64', '--distributed',
                       '--config.total_steps=10']
  # v4-512 = 256 chips = 64 hosts of 4 chips: one log per worker
  logs = [c for c in cmds if c[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp']
          and c[-1].startswith('--worker=') and c[-1] != '--worker=all']
  assert [_option(c, 'worker') for c in logs] == [str(i) for i in range(64)]
  assert logs[5][6] == 'out/logs/worker-5.log'
  assert cmds[-1][:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'imagen-base']
  assert '--quiet' in cmds[-1]
  order = [c[4] for c in cmds if c[0] == 'gcloud']
  first = {v: order.index(v) for v in ('create', 'scp', 'ssh', 'delete')}
  assert first['create'] < first['scp'] < first['ssh'] < first['delete']


@pytest.mark.parametrize('accelerator,workers', [('v4-8', 1), ('v4-256', 32), ('v5p-256', 32),
                                                 ('v5litepod-8', 1), ('v5litepod-64', 16)])
def test_tpu_worker_count(accelerator, workers):
  lines = _dry_run('tpu_pod.py', '--name=n', '--zone=z', f'--accelerator={accelerator}',
                   f'--config={CONFIG}', '--workdir=gs://b/w', '--actions=logs')
  assert sum('--worker=' in l for l in lines) == workers


def test_tpu_pod_selected_actions_only():
  lines = _dry_run('tpu_pod.py', '--name=n', '--zone=z', f'--config={CONFIG}',
                   '--workdir=gs://b/w', '--actions=teardown')
  assert _commands(lines) == [['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'n', '--zone=z',
                               '--quiet']]


def test_gpu_ssh_dry_run_sets_the_distributed_environment():
  lines = _dry_run('gpu_multinode.py', 'ssh', '--hosts=gpu0,gpu1,gpu2', '--port=4321',
                   f'--config={CONFIG}', '--workdir=/shared/base64', '--override=total_steps=5')
  starts = [l for l in lines if l.endswith(' &')]
  assert len(starts) == 3 and 'wait' in lines
  for i, line in enumerate(starts):
    ssh = shlex.split(line[:-2])
    assert ssh[:2] == ['ssh', f'gpu{i}']
    remote = shlex.split(ssh[2].split(' && ')[-1].split(' > ')[0])
    assert remote[:4] == ['env', 'JAX_COORDINATOR_ADDRESS=gpu0:4321', 'JAX_NUM_PROCESSES=3',
                          f'JAX_PROCESS_ID={i}']
    assert remote[4:] == ['python3', '-m', 'diffusion_jax.train', f'--config={CONFIG}',
                          '--workdir=/shared/base64', '--config.total_steps=5']
  scps = [shlex.split(l) for l in lines if l.startswith('scp ')]
  assert [c[-1] for c in scps] == [f'logs/host-{i}.log' for i in range(3)]


def test_gpu_slurm_dry_run_prints_the_script_and_submission():
  lines = _dry_run('gpu_multinode.py', 'slurm', '--nodes=4', '--gpus_per_node=8',
                   '--partition=a100', f'--config={CONFIG}', '--workdir=/shared/base64')
  assert '#SBATCH --nodes=4' in lines and '#SBATCH --gpus-per-node=8' in lines
  assert '#SBATCH --ntasks-per-node=1' in lines and '#SBATCH --partition=a100' in lines
  assert 'export JAX_NUM_PROCESSES="$SLURM_NNODES"' in lines
  assert any(l.startswith('export JAX_COORDINATOR_ADDRESS="$COORDINATOR:12355"') for l in lines)
  srun = shlex.split(next(l for l in lines if l.startswith('srun ')))
  inner = srun[-1]
  assert inner.startswith('JAX_PROCESS_ID=$SLURM_PROCID exec ')
  assert shlex.split(inner)[3:] == ['-m', 'diffusion_jax.train', f'--config={CONFIG}',
                                    '--workdir=/shared/base64']
  assert lines[-1] == 'sbatch diffusion_jax.sbatch'


def test_dry_run_runs_nothing(tmp_path):
  # The slurm mode writes its script only when not dry-running.
  _dry_run('gpu_multinode.py', 'slurm', '--nodes=2', f'--config={CONFIG}', '--workdir=/w',
           f'--script={tmp_path}/x.sbatch', f'--log_dir={tmp_path}/logs')
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('script,args', [
    ('tpu_pod.py', ['--name=n', '--zone=z']), ('gpu_multinode.py', ['ssh', '--hosts=a,b'])])
@pytest.mark.parametrize('config,override,words', [
    ('configs/imagen.py:stage=base64,size=paper', '--override=total_steps=-5', 'total_steps=-5'),
    ('configs/nope.py:stage=base64', None, 'nope.py')])
def test_bad_train_config_is_refused_before_any_machine_is_touched(script, args, config,
                                                                   override, words):
  out = subprocess.run([sys.executable, os.path.join(ROOT, 'launch', script), *args,
                        f'--config={config}', '--workdir=/shared/w', *([override] if override else []),
                        '--dry_run'], capture_output=True, text=True, cwd=ROOT)
  assert out.returncode == 2 and out.stdout == '', (out.returncode, out.stdout)
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and words in lines[0], lines
