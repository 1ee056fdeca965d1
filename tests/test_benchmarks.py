"""The benchmark scripts run end to end and end with the JSON line of the documented keys
(timings are not asserted: tests never time anything)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ('images_per_sec', 'step_ms_median', 'compile_s', 'peak_rss_mb', 'achieved_gflops')


def _run(script, *args):
  env = dict(os.environ)
  # The CPU devices the benchmark chooses, as a user runs it (conftest's 8 simulated devices
  # are for tests).
  env['XLA_FLAGS'] = env.get('XLA_FLAGS', '').replace(
      '--xla_force_host_platform_device_count=8', '').strip()
  env['JAX_PLATFORMS'] = 'cpu'
  out = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', script), *args],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize('script,extra,finite,devices', [
    # auto: one CPU device per core, as many as divide the batch of 2
    ('train_step.py', ('--model=configs/imagen.py:stage=base64,size=tiny',), 'loss_finite',
     min(2, os.cpu_count() or 1)),
    ('sample.py', ('--model=configs/glide.py:stage=up256,size=tiny', '--num_steps=3',
                   '--cpu_devices=1'), 'output_finite', 1),
])
def test_benchmark_json(script, extra, finite, devices):
  result = _run(script, *extra, '--steps=2', '--warmup=1', '--batch=2')
  for key in KEYS:
    assert key in result, key
    assert result[key] > 0, (key, result[key])
  assert result['batch'] == 2 and result['steps'] == 2 and result[finite] is True
  assert result['devices'] == devices, f'--cpu_devices gave {result["devices"]} devices'
  assert result['matmul_peak_gflops'] > 0 and result['dtype'] == 'float32'
  assert result['fraction_of_matmul_peak'] == pytest.approx(
      result['achieved_gflops'] / result['matmul_peak_gflops'])


def test_peer_process_answers_with_one_json_line():
  # Without imagen-pytorch (as in CI) the peer says so; with it, it times one step.
  result = _run('peer.py', '--kind=train', '--steps=1', '--warmup=0', '--batch=1')
  if 'peer_images_per_sec' in result:
    assert result['peer_images_per_sec'] > 0 and result['peer'] == 'imagen-pytorch'
  else:
    assert result == {'peer': 'imagen-pytorch not importable'}, result
