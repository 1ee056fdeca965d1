r"""Train-step throughput: images/s, step time, compile time, peak RSS, achieved GFLOP/s.

  python benchmarks/train_step.py [--model=matched_imagen_unet | --model=CONFIG:ARG]
      [--batch=8] [--steps=10] [--warmup=2] [--cpu_devices=auto] [--peer]

`matched_imagen_unet` is our U-Net laid out like imagen-pytorch's
`Unet(dim=64, dim_mults=(1, 2, 4), num_resnet_blocks=2, layer_attns=(False, True, True),
layer_cross_attns=(False, True, True), text_embed_dim=128)` at 64 px, batch 8, 16 text
tokens, given precomputed text embeddings as the peer is. Any `CONFIG:ARG` (e.g.
`projects/shapes/configs/glide.py:stage=base64`) runs that stage's full train step, frozen
encoder included. float32 on CPU, the batch sharded over one CPU device per core
(`--cpu_devices`; see benchmarks/README.md for why).

The whole trainer step is timed (conditioning, loss, gradients, optimizer, EMA, non-finite
guard) with the state donated, as `diffusion_jax.train` runs it. With imagen-pytorch
importable (`--peer`, on by default for the matched model) its Unet runs the same step
(MSE on eps, Adam) in the same process, and the ratio is printed. The last line is JSON.
"""
from __future__ import annotations

import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from absl import flags  # noqa: E402
import numpy as np  # noqa: E402


def build(cfg, matched: bool):
  import jax
  from diffusion_jax import conditioning, models, parallel
  from diffusion_jax.train import step as step_lib
  mesh = parallel.create_mesh(cfg.mesh)
  rules = parallel.logical_rules(cfg.mesh)
  model = models.build(cfg.model)
  if matched:
    table = common.TokenTable(64, cfg.model.text_dim)
    # replicated over the mesh, as the trainer places a frozen encoder's parameters
    encoder, frozen = table, jax.device_put(table.params(), parallel.replicated(mesh))
  else:
    encoder = conditioning.build_encoder(cfg, mesh, rules)
    frozen = None if encoder is None else encoder.params
  train_step, tx = step_lib.make_train_step(cfg, model, encoder, mesh=mesh, rules=rules)
  state, state_sh = step_lib.init_state(cfg, model, tx, mesh, rules, jax.random.PRNGKey(0))
  batch = parallel.shard_batch(common.random_batch(cfg), mesh)
  frozen_sh = jax.tree.map(lambda x: x.sharding, frozen) if frozen is not None else None
  step_fn = step_lib.jit_train_step(train_step, state_sh,
                                    step_lib.batch_shardings(batch, mesh), frozen_sh, mesh)
  return mesh, rules, train_step, step_fn, state, batch, frozen


def run_ours(cfg, matched: bool, steps: int, warmup: int) -> dict:
  import flax.linen as nn
  import jax
  from diffusion_jax import flops
  mesh, rules, train_step, step_fn, state, batch, frozen = build(cfg, matched)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch, frozen).compile()
    compile_s = time.perf_counter() - t0
    step_flops = flops.count_flops(train_step, state, batch, frozen)
  holder = {'state': state}

  def one():
    holder['state'], metrics = compiled(holder['state'], batch, frozen)
    jax.block_until_ready(metrics['loss'])

  common.time_calls(one, 0, warmup)
  usage_before = resource.getrusage(resource.RUSAGE_SELF)
  times = common.time_calls(one, steps, 0)
  usage = resource.getrusage(resource.RUSAGE_SELF)
  loss = float(jax.device_get(compiled(holder['state'], batch, frozen)[1]['loss']))
  median = statistics.median(times)
  return {'step_ms_median': median * 1e3, 'step_ms_min': min(times) * 1e3,
          'step_ms_max': max(times) * 1e3, 'compile_s': compile_s,
          'images_per_sec': int(cfg.input.batch_size) / median,
          'flops_per_step': step_flops, 'achieved_gflops': step_flops / median / 1e9,
          'loss_finite': bool(np.isfinite(loss)),
          # the kernel's share of a step: page faults on freshly mapped buffers (hugepages.py)
          'page_faults_per_step': (usage.ru_minflt - usage_before.ru_minflt) / steps,
          'kernel_ms_per_step': (usage.ru_stime - usage_before.ru_stime) / steps * 1e3}


def define_flags(flag_values: flags.FlagValues = flags.FLAGS, sys_argv=None) -> None:
  del sys_argv
  common.define_model_flags(flag_values)
  flags.DEFINE_integer('warmup', 2, 'untimed steps first', flag_values=flag_values)


def main(argv, F: flags.FlagValues = flags.FLAGS):
  del argv
  matched = F.model == common.MATCHED
  cfg = common.configure(F)
  from diffusion_jax.tools import param_count
  peak = common.matmul_peak_gflops()
  result = {'benchmark': 'train_step', 'model': F.model, 'batch': int(cfg.input.batch_size),
            'image_size': int(cfg.input.image_size),
            'train_crop_size': cfg.input.get('train_crop_size'), 'dtype': 'float32',
            'steps': F.steps,
            'params': param_count.count_params(cfg.model), **common.machine(),
            'matmul_peak_gflops': peak}
  result.update(run_ours(cfg, matched, F.steps, F.warmup))
  result['fraction_of_matmul_peak'] = result['achieved_gflops'] / peak
  if F.peer == 'yes' or (F.peer == 'auto' and matched):
    common.add_peer(result, 'train', batch=int(cfg.input.batch_size), steps=F.steps,
                    warmup=F.warmup)
  result['peak_rss_mb'] = common.peak_rss_mb()
  print(f"{F.model}: {result['images_per_sec']:.2f} images/s, step "
        f"{result['step_ms_median']:.1f} ms (median of {F.steps}), compile "
        f"{result['compile_s']:.1f} s, {result['achieved_gflops']:.1f} GFLOP/s = "
        f"{result['fraction_of_matmul_peak']:.0%} of the measured matmul peak "
        f"{peak:.1f} GFLOP/s, peak RSS {result['peak_rss_mb']:.0f} MB", flush=True)
  common.emit(result)


if __name__ == '__main__':
  from diffusion_jax import hugepages
  hugepages.reexec_with_huge_pages()
  define_flags()
  common.run(main)
