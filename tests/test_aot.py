"""Ahead-of-time compile tool (diffusion_jax.tools.aot) and the analytic FLOP counter."""
from __future__ import annotations

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import pytest

from diffusion_jax import cli, flops, models
from diffusion_jax.tools import aot

HAS_LIBTPU = importlib.util.find_spec('libtpu') is not None
KEYS = ('fits_hbm', 'argument_bytes_per_chip', 'temp_bytes_per_chip', 'hbm_bytes_per_chip',
        'flops_per_step_xla', 'flops_per_step_analytic')


def test_flops_closed_forms():
  a, b = jnp.ones((4, 8)), jnp.ones((8, 16))
  assert flops.count_flops(jnp.matmul, a, b) == 2 * 4 * 8 * 16
  x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 5))
  conv = lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  assert flops.count_flops(conv, x, w) == 2 * (2 * 8 * 8 * 5) * (3 * 3 * 3)
  # a scan body counts once per iteration; a value-and-grad counts forward + 2 backward
  loop = lambda x: jax.lax.scan(lambda c, _: (c @ c, None), x, None, length=7)[0]
  assert flops.count_flops(loop, jnp.ones((4, 4))) == 7 * 2 * 64
  vg = jax.value_and_grad(lambda x: jnp.sum(x @ x))
  assert flops.count_flops(vg, jnp.ones((4, 4))) == 3 * 2 * 64


def test_flops_agree_with_xla_on_a_loop_free_forward():
  cfg = aot.load_config('configs/imagen.py:stage=base64,size=tiny').model
  cfg.scan_layers = False
  module = models.build(cfg)
  x, t, cond = models.example_inputs(cfg, 4)
  params = jax.eval_shape(lambda: module.init(jax.random.key(0), x, t, cond))['params']
  # Inputs as arguments, not constants that XLA could fold away.
  fwd = lambda p, x, t, cond: module.apply({'params': p}, x, t, cond)
  analytic = flops.count_flops(fwd, params, x, t, cond)
  compiled = jax.jit(fwd).lower(params, x, t, cond).compile()
  xla = float(aot._first(compiled.cost_analysis())['flops'])
  # XLA also counts elementwise work (norms, activations, softmax) that the matmul/conv
  # count leaves out, but skips the zero-padded border taps of SAME convolutions (about 16%
  # of a 3x3 conv at 8x8), which the hardware computes and the analytic count includes.
  assert 0.8 * xla < analytic < 1.15 * xla


def _tiny(**kw):
  return aot.apply_overrides(aot.load_config('configs/imagen.py:stage=base64,size=tiny'), **kw)


def test_set_changes_config_fields(monkeypatch):
  base = aot.load_config('configs/imagen.py:stage=base64,size=tiny')
  config = aot.apply_overrides(base, settings=[
      'model.num_res_blocks=2', 'model.channel_mult=(1, 2, 2)',
      'model.remat_policy=nothing_saveable', 'optimizer.lr=3e-4'])
  assert config.model.num_res_blocks == 2 and config.model.channel_mult == (1, 2, 2)
  assert config.model.remat_policy == 'nothing_saveable', 'a bare word is a string'
  assert config.optimizer.lr == 3e-4
  assert base.model.num_res_blocks == 1, '--set must not change the loaded config in place'
  with pytest.raises(ValueError, match="no field 'model.num_blocks'"):
    aot.apply_overrides(base, settings=['model.num_blocks=2'])
  with pytest.raises(ValueError, match='KEY=VALUE'):
    aot.apply_overrides(base, settings=['model.num_res_blocks'])
  # The CLI hands every --set to the compile (and edits these two variables: restored after).
  monkeypatch.setenv('XLA_FLAGS', os.environ.get('XLA_FLAGS', ''))
  monkeypatch.setenv('JAX_PLATFORMS', os.environ.get('JAX_PLATFORMS', 'cpu'))
  seen = {}
  monkeypatch.setattr(aot, 'compile_train_step',
                      lambda config, topology, mfu: seen.update(config=config) or {})
  monkeypatch.setattr(aot, 'format_report', lambda report: '')
  cli.call(aot, ['--config=configs/imagen.py:stage=base64,size=tiny', '--topology=cpu:1',
                 '--set=model.num_res_blocks=3', '--set=model.dropout=0.1',
                 '--config.model.model_channels=8'])
  assert seen['config'].model.num_res_blocks == 3 and seen['config'].model.dropout == 0.1
  assert seen['config'].model.model_channels == 8, '--config.KEY=VALUE works beside --set'
  with pytest.raises(SystemExit):
    cli.call(aot, ['--config=configs/imagen.py:stage=base64,size=tiny', '--topology=cpu:1',
                   '--set=model.num_blocks=2'])


def test_host_memory_warning_for_paper_compiles_on_small_hosts(tmp_path):
  meminfo = tmp_path / 'meminfo'
  meminfo.write_text('MemTotal:       24576000 kB\nMemFree:  1000 kB\nSwapTotal:  2048 kB\n')
  ram, swap = aot.host_memory_bytes(str(meminfo))
  assert (ram, swap) == (24576000 * 1024, 2048 * 1024), 'meminfo is in kB'
  assert aot.host_memory_bytes(str(tmp_path / 'missing')) == (0, 0)
  warning = aot.host_memory_warning('paper', 'v4:8x8x4', ram, swap)
  assert warning and '23 GiB of RAM' in warning and '\n' not in warning
  assert aot.host_memory_warning('paper', 'v4:8x8x4', ram, 16 * aot.GIB) is None, 'swap counts'
  assert aot.host_memory_warning('tiny', 'v4:2x2x1', ram, 0) is None, 'small configs are cheap'
  assert aot.host_memory_warning('paper', 'cpu:8', ram, 0) is None, 'no libtpu compile'
  assert aot.host_memory_warning('paper', 'v4:8x8x4', 0, 0) is None, 'unknown host: no claim'


def test_cpu_topology_report(num_devices):
  report = aot.compile_train_step(_tiny(batch=16, mesh='4,2,1'), f'cpu:{num_devices}')
  json.loads(json.dumps(report))  # the CLI's last line
  for key in KEYS:
    assert key in report
  assert report['chips'] == 8 and report['mesh'] == {'data': 4, 'fsdp': 2, 'tensor': 1}
  assert report['batch'] == 16 and report['fits_hbm'] is True
  assert report['hbm_bytes_per_chip'] == (
      report['argument_bytes_per_chip'] + report['output_bytes_per_chip'] -
      report['alias_bytes_per_chip'] + report['temp_bytes_per_chip'] +
      report['code_bytes_per_chip'])
  # the donated state aliases the new state: most of the output reuses argument buffers
  assert report['alias_bytes_per_chip'] > 0.9 * report['output_bytes_per_chip']
  # params/EMA/optimizer live in the arguments: at least 4 float32 copies, sharded 2-way by fsdp
  assert report['argument_bytes_per_chip'] > 4 * 4 * report['params'] / 2 * 0.5
  # the tiny config scans nothing heavy: the two counts agree within elementwise overhead
  ratio = report['flops_per_step_analytic'] / report['flops_per_step_xla']
  assert 0.6 < ratio < 1.1, ratio
  assert 'projected_step_s' not in report  # no peak for a CPU 'topology'
  assert 'FITS' in aot.format_report(report)
  # the state is part of the arguments (with the batch and the frozen encoder)
  assert 0.5 * report['argument_bytes_per_chip'] < report['state_bytes_per_chip'] <= (
      report['argument_bytes_per_chip'])


def test_state_placement_finds_arrays_fsdp_leaves_whole():
  import flax.linen as nn
  from configs import common
  from diffusion_jax import parallel
  box = lambda shape, names: nn.Partitioned(jax.ShapeDtypeStruct(shape, jnp.float32), names)
  # 'odd': neither 12 nor 6 splits 8 ways, so fsdp=8 leaves it whole (288 B per chip); 'even'
  # splits (16/8 x 16 x 4 B = 128 B). fsdp=4 splits both: 72 + 256 = 328 B, the least.
  state = {'odd': box((12, 6), ('embed', 'mlp')), 'even': box((16, 16), ('embed', 'mlp'))}
  rules = parallel.logical_rules(common.mesh_config())
  got = parallel.state_placement(state, {'data': 1, 'fsdp': 8, 'tensor': 1}, rules)
  assert got['state_bytes_per_chip'] == 288 + 128, got
  assert got['state_unsharded_bytes_per_chip'] == 288 and got['state_unsharded_arrays'] == 1
  assert got['state_largest_unsharded'] == 'odd (12, 6)', got
  assert got['state_best_mesh'] == [2, 4, 1] and got['state_best_bytes_per_chip'] == 328, got
  dp = parallel.state_placement(state, {'data': 8, 'fsdp': 1, 'tensor': 1}, rules)
  assert dp['state_best_mesh'] == [8, 1, 1], 'pure data parallelism replicates by choice'
  report = {'family': 'f', 'stage': 's', 'size': 'paper', 'params': 264, 'batch': 8,
            'dtype': 'float32', 'remat': 'none', 'topology': 'cpu:8', 'chips': 8,
            'device_kind': 'cpu', 'mesh': {'data': 1, 'fsdp': 8, 'tensor': 1}, 'lower_s': 0.0,
            'compile_s': 0.0, 'argument_bytes_per_chip': 0, 'output_bytes_per_chip': 0,
            'alias_bytes_per_chip': 0, 'temp_bytes_per_chip': 0, 'hbm_bytes_per_chip': 0,
            'hbm_capacity_bytes': 1, 'fits_hbm': True, 'flops_per_step_xla': 0.0,
            'flops_per_step_analytic': 0, **got}
  assert '--mesh=2,4,1 would hold' in aot.format_report(report)


def test_hbm_verdict_follows_capacity(num_devices):
  report = aot.compile_train_step(_tiny(), f'cpu:{num_devices}', hbm_bytes=1024)
  assert report['fits_hbm'] is False
  assert 'DOES NOT FIT' in aot.format_report(report)


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu]')")
def test_tpu_topology_compiles_on_a_cpu_host():
  report = aot.compile_train_step(_tiny(), 'v4:2x2x1')
  assert report['chips'] == 4 and report['device_kind'] == 'TPU v4'
  assert report['hbm_capacity_bytes'] == 32 * 1024**3 and report['fits_hbm'] is True
  assert report['projected_step_s'] > 0 and report['assumed_mfu'] == 0.4
  for key in KEYS:
    assert key in report


def test_compiler_hbm_refusal_becomes_a_report(num_devices, monkeypatch):
  """libtpu stops a compile whose temporaries exceed HBM; the tool reports it as not fitting."""
  import jax.stages

  def refuse(self):
    raise RuntimeError('RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required '
                       'for HLO temporaries (67.40G) exceeds available HBM (30.75G).')
  monkeypatch.setattr(jax.stages.Lowered, 'compile', refuse)
  report = aot.compile_train_step(_tiny(), f'cpu:{num_devices}')
  assert report['compiled'] is False and report['fits_hbm'] is False
  assert report['temp_bytes_per_chip'] == int(67.40 * 1024**3)
  assert report['argument_bytes_per_chip'] > 4 * 4 * report['params'] * 0.9  # replicated state
  assert report['flops_per_step_xla'] < 0 and report['flops_per_step_analytic'] > 0
  assert 'REFUSED' in aot.format_report(report)


def test_text_cache_compiles_the_cached_step_without_the_encoder(num_devices):
  """With input.text_cache the compiled step reads the encoder's outputs from the batch: the
  encoder's forward leaves the FLOPs and its weights leave the arguments."""
  from diffusion_jax import parallel
  plain = aot.compile_train_step(_tiny(batch=8), f'cpu:{num_devices}')
  config = _tiny(batch=8, settings=['input.text_cache="/nonexistent/cache"'])
  cached = aot.compile_train_step(config, f'cpu:{num_devices}')
  mesh = parallel.create_mesh(config.mesh, jax.devices()[:num_devices])
  encoder, frozen = aot._abstract_encoder(config, mesh, parallel.logical_rules(config.mesh))
  b, length = config.input.batch_size, config.input.text_max_len
  ids = jax.ShapeDtypeStruct((b, length), jnp.int32)
  mask = jax.ShapeDtypeStruct((b, length), jnp.bool_)
  encoder_flops = flops.count_flops(encoder.text_forward, frozen, ids, mask)
  assert encoder_flops > 0
  saved = plain['flops_per_step_analytic'] - cached['flops_per_step_analytic']
  print(f'encoder forward {encoder_flops:,} FLOPs; the cached step {saved:,} fewer')
  assert saved == encoder_flops
  assert cached['argument_bytes_per_chip'] < plain['argument_bytes_per_chip']


def test_latent_stage_compiles_with_its_frozen_autoencoder(num_devices, tmp_path):
  """A latent stage's step encodes its pixel batch with the frozen autoencoder: the
  architecture is read from autoencoder.path's config.json (no weights needed), its
  parameters are replicated arguments, and its encoder's forward is in the step's FLOPs."""
  from diffusion_jax import parallel
  from diffusion_jax.diffusers_io import vae as dio_vae
  vae_config = dict(dio_vae.SD_CONFIG, block_out_channels=[8, 16], norm_num_groups=4,
                    layers_per_block=1, down_block_types=[dio_vae.DOWN_TYPE] * 2,
                    up_block_types=[dio_vae.UP_TYPE] * 2, sample_size=16)
  (tmp_path / 'config.json').write_text(json.dumps(vae_config))
  config = aot.apply_overrides(aot.load_config('configs/latent.py:stage=unet,size=tiny'),
                               batch=8, settings=[f'autoencoder.path="{tmp_path}"'])
  report = aot.compile_train_step(config, f'cpu:{num_devices}')
  kw = dio_vae.vae_kwargs(vae_config)
  assert report['autoencoder'] == str(tmp_path)
  assert report['autoencoder_params'] == dio_vae.param_count(kw)
  mesh = parallel.create_mesh(config.mesh, jax.devices()[:num_devices])
  codec, params, _ = aot._abstract_codec(config, mesh)
  images = jax.ShapeDtypeStruct((8, 16, 16, 3), jnp.float32)
  encode_flops = flops.count_flops(lambda p, x: codec.encode(p, x), params, images)
  assert encode_flops > 0 and report['flops_per_step_analytic'] > encode_flops
  assert report['argument_bytes_per_chip'] > 4 * report['autoencoder_params']
