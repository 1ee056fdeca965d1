r"""Sampler throughput: images/s of a guided DDIM chain (default 50 steps), compile time,
peak RSS and achieved GFLOP/s.

  python benchmarks/sample.py [--model=matched_imagen_unet | --model=CONFIG:ARG]
      [--batch=8] [--steps=10] [--num_steps=50] [--guidance=5.0] [--cpu_devices=auto] [--peer]

One timed iteration is one whole chain: `--num_steps` denoiser calls, each a single batched
forward pass over the conditional and unconditional rows (classifier-free guidance), with
dynamic thresholding, inside one jitted `lax.scan` (no host round trip between steps).
The conditioning (text token states, low-res input, ...) is random and fixed, as if the
prompts had been encoded once. float32 on CPU, the batch sharded over one CPU device per
core (`--cpu_devices`), as the pipelines shard it over every device. With imagen-pytorch
importable the peer's Unet runs the same number of guided calls (`forward_with_cond_scale`,
which evaluates the conditional and null branches) plus the DDIM update, in the same process.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from absl import flags  # noqa: E402
import numpy as np  # noqa: E402


def random_cond(model_cfg, batch: int, seed: int = 0):
  import jax.numpy as jnp
  from diffusion_jax import models
  _, _, cond = models.example_inputs(model_cfg, batch)
  rng = np.random.default_rng(seed)

  def fill(x):
    if x.dtype == jnp.float32:
      return jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    if x.dtype == jnp.int32:
      return jnp.asarray(rng.integers(1, 20, x.shape), jnp.int32)
    return x  # masks all visible, drop flags off
  cond = {k: fill(v) for k, v in cond.items()}
  if 'low_res' in cond:
    cond['low_res'] = jnp.clip(cond['low_res'], -1, 1)
  return cond


def run_ours(cfg, steps: int, warmup: int, num_steps: int, guidance_scale: float) -> dict:
  import jax
  import jax.numpy as jnp
  from diffusion_jax import flops, models, parallel
  from diffusion_jax.diffusion import guidance, samplers, schedules
  mesh = parallel.create_mesh(cfg.mesh)
  model = models.build(cfg.model)
  b = int(cfg.input.batch_size)
  x, t, _ = models.example_inputs(cfg.model, 1)
  params = jax.jit(lambda k: model.init(k, x, t, random_cond(cfg.model, 1))['params'])(
      jax.random.PRNGKey(0))
  schedule = schedules.from_config(cfg.diffusion)
  learned = bool(cfg.model.get('learned_variance', False))
  # the batch over every device and the parameters replicated, as the pipelines sample
  params = jax.device_put(params, parallel.replicated(mesh))
  cond = {k: jax.device_put(v, parallel.batch_sharding(mesh, v.ndim))
          for k, v in random_cond(cfg.model, b).items()}
  shape = (b,) + tuple(x.shape[1:])

  def chain(params, x_T, rng, cond):
    denoise = lambda x_t, t_B, c: model.apply({'params': params}, x_t, t_B, c)
    guided = guidance.classifier_free(denoise, guidance_scale, learned_variance=learned)
    return samplers.sample(guided, x_T, rng, schedule=schedule, sampler='ddim',
                           num_steps=num_steps, eta=0.0, cond=cond,
                           parameterization=cfg.diffusion.parameterization,
                           learned_variance=learned, threshold='dynamic')

  x_T = jax.device_put(jax.random.normal(jax.random.key(1), shape, jnp.float32),
                       parallel.batch_sharding(mesh, len(shape)))
  rng = jax.random.key(2)
  t0 = time.perf_counter()
  compiled = jax.jit(chain).lower(params, x_T, rng, cond).compile()
  compile_s = time.perf_counter() - t0
  chain_flops = flops.count_flops(chain, params, x_T, rng, cond)
  out = {}

  def one():
    out['x'] = compiled(params, x_T, rng, cond)
    out['x'].block_until_ready()

  times = common.time_calls(one, steps, warmup)
  median = statistics.median(times)
  return {'chain_ms_median': median * 1e3, 'step_ms_median': median * 1e3 / num_steps,
          'chain_ms_min': min(times) * 1e3, 'chain_ms_max': max(times) * 1e3,
          'compile_s': compile_s, 'images_per_sec': b / median,
          'flops_per_chain': chain_flops, 'achieved_gflops': chain_flops / median / 1e9,
          'output_finite': bool(np.isfinite(np.asarray(out['x'])).all())}


def define_flags(flag_values: flags.FlagValues = flags.FLAGS, sys_argv=None) -> None:
  del sys_argv
  fv = dict(flag_values=flag_values)
  common.define_model_flags(flag_values)
  flags.DEFINE_integer('warmup', 1, 'untimed chains first', **fv)
  flags.DEFINE_integer('num_steps', 50, 'DDIM steps per chain', **fv)
  flags.DEFINE_float('guidance', 5.0, 'classifier-free guidance scale', **fv)


def main(argv, F: flags.FlagValues = flags.FLAGS):
  del argv
  matched = F.model == common.MATCHED
  cfg = common.configure(F)
  peak = common.matmul_peak_gflops()
  result = {'benchmark': 'sample', 'model': F.model, 'batch': int(cfg.input.batch_size),
            'image_size': int(cfg.model.get('image_size', 0)), 'sampler': 'ddim',
            'num_steps': F.num_steps, 'guidance': F.guidance, 'dtype': 'float32',
            'steps': F.steps, **common.machine(), 'matmul_peak_gflops': peak}
  result.update(run_ours(cfg, F.steps, F.warmup, F.num_steps, F.guidance))
  result['fraction_of_matmul_peak'] = result['achieved_gflops'] / peak
  if F.peer == 'yes' or (F.peer == 'auto' and matched):
    common.add_peer(result, 'sample', batch=int(cfg.input.batch_size), steps=F.steps,
                    warmup=F.warmup, num_steps=F.num_steps, guidance=F.guidance)
  result['peak_rss_mb'] = common.peak_rss_mb()
  print(f"{F.model}: {result['images_per_sec']:.3f} images/s ({F.num_steps}-step guided "
        f"DDIM, chain {result['chain_ms_median'] / 1e3:.2f} s median of {F.steps}), compile "
        f"{result['compile_s']:.1f} s, {result['achieved_gflops']:.1f} GFLOP/s = "
        f"{result['fraction_of_matmul_peak']:.0%} of the measured matmul peak, peak RSS "
        f"{result['peak_rss_mb']:.0f} MB", flush=True)
  common.emit(result)


if __name__ == '__main__':
  from diffusion_jax import hugepages
  hugepages.reexec_with_huge_pages()
  define_flags()
  common.run(main)
