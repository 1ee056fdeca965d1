"""The benchmark scripts run end to end and end with the JSON line of the documented keys
(timings are not asserted: tests never time anything)."""
from __future__ import annotations

import importlib.util
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


# glide-text2im's option names: networks a few thousand times smaller than the released ones.
_GLIDE_TINY = dict(num_channels=32, num_res_blocks=1, num_head_channels=16, text_ctx=8,
                   attention_resolutions='8', xf_width=32, xf_layers=1, xf_heads=2)


def test_glide_release_json():
  # The released-size benchmark's whole path (random-weight release written, from_pretrained,
  # two generates), tiny and with two steps per stage; the peer only with --glide_text2im.
  base = dict(_GLIDE_TINY, image_size=16, channel_mult='1,2')
  up = dict(_GLIDE_TINY, image_size=32, channel_mult='1,1,2', low_res_size=16)
  result = _run('glide_release.py', f'--options={json.dumps(base)}',
                f'--up_options={json.dumps(up)}', '--base_steps=2', '--up_steps=2')
  for key in ('load_s', 'compile_s', 's_per_image', 'peak_rss_mb', 'first_generate_s'):
    assert result[key] > 0, (key, result[key])
  assert result['order'] == ['base', 'upsample'] and result['batch'] == 1
  assert result['base_spacing'] == '2' and result['up_spacing'] == 'ddim2'
  assert set(result['timings_second']) == {'base', 'upsample'}
  assert result['output_shape'] == [1, 32, 32, 3] and result['output_dtype'] == 'uint8'
  assert result['params']['base'] > 0 and result['params']['upsample'] > 0
  assert 'peer' not in result


def test_glide_peer_answers_with_one_json_line(tmp_path):
  # Without glide-text2im (as in CI) the peer says so in its one line; with it installed, it
  # samples the tiny networks once.
  base = dict(_GLIDE_TINY, image_size=16, channel_mult='1,2')
  up = dict(_GLIDE_TINY, image_size=32, channel_mult='1,1,2')
  result = _run('glide_peer.py', f'--glide_text2im={tmp_path}', '--base_steps=1',
                '--up_steps=1', '--repeats=1', f'--options={json.dumps(base)}',
                f'--up_options={json.dumps(up)}')
  if 'peer_s_per_image' in result:
    assert result['peer_s_per_image'] > 0 and result['peer_output_shape'] == [1, 3, 32, 32]
  else:
    assert result == {'peer': 'glide-text2im not importable'}, result


def test_diffusers_peer_json():
  # Ours beside diffusers' own Karlo decoder (its text projection, masked tokens and null image
  # embedding), tiny, one guided step: the documented keys, and the two outputs agree.
  if not all(importlib.util.find_spec(m) for m in ('torch', 'diffusers')):
    pytest.skip('needs torch and diffusers')
  result = _run('diffusers_peer.py', '--quick', '--model=karlo')
  assert result['quick'] is True and result['steps'] == 1 and result['batch'] == 1
  assert 'if1' not in result
  r = result['karlo']
  for key in ('ours_s_per_image', 'theirs_s_per_image', 'ratio', 'ours_compile_s',
              'ours_train_ms', 'theirs_train_ms', 'train_ratio'):
    assert r[key] > 0, (key, r[key])
  assert r['max_abs_diff'] < 1e-3 * max(1.0, r['output_scale']), r['max_abs_diff']
  assert r['output_finite'] and r['ours_loss_finite'] and r['theirs_loss_finite']
  assert r['config']['sample_size'] == 8 and 'text_proj' in r['config'] and r['params'] > 0
