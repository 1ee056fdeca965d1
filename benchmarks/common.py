"""Shared pieces of the benchmarks: the machine's measured matmul peak, timing, peak RSS,
the models (`matched_imagen_unet` or any `CONFIG:ARG`) and the one-line JSON result.

Conventions (docs and DESIGN section 8): float32 on CPU, the median of >= 10 timed
iterations after warm-up, compile time reported separately, FLOP/s counted analytically
(`diffusion_jax.flops`) and compared with a matmul peak measured on this machine in the
same run. Timings on a shared machine are noisy: run the peer in the same process/run.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

# The flags defined below belong to the benchmark that asks for them (its --help).
flags.disclaim_key_flags()

MATCHED = 'matched_imagen_unet'
# imagen-pytorch: Unet(dim=64, dim_mults=(1, 2, 4), num_resnet_blocks=2,
#   layer_attns=(False, True, True), layer_cross_attns=(False, True, True), text_embed_dim=128)
# at 64 px, batch 8, 16 text tokens (attn_heads=8, attn_dim_head=64, ff_mult=2, attention in
# the middle: the peer's defaults).
MATCHED_PEER_KW = dict(dim=64, dim_mults=(1, 2, 4), num_resnet_blocks=2,
                       layer_attns=(False, True, True), layer_cross_attns=(False, True, True),
                       text_embed_dim=128)
MATCHED_BATCH, MATCHED_TEXT_LEN, MATCHED_TEXT_DIM, MATCHED_SIZE = 8, 16, 128, 64


def matmul_peak_gflops(n: int = 2048, reps: int = 10, rounds: int = 3) -> float:
  """This machine's float32 matmul throughput (GFLOP/s): the fastest of `rounds` medians of
  `reps` n x n matmuls, a second apart. One median alone read as low as half the usual peak
  when something else briefly had a core, which put a run above "100% of peak"."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  f = jax.jit(jnp.matmul)
  f(a, b).block_until_ready()
  medians = []
  for r in range(rounds):
    if r:
      time.sleep(1.0)
    times = []
    for _ in range(reps):
      t0 = time.perf_counter()
      f(a, b).block_until_ready()
      times.append(time.perf_counter() - t0)
    medians.append(statistics.median(times))
  return 2 * n**3 / min(medians) / 1e9


def define_cpu_devices_flag(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  flags.DEFINE_string(
      'cpu_devices', 'auto',
      'split the CPU into N JAX devices and shard the batch over them (data parallel). '
      'auto: one per core, at most the batch and dividing it; 1: one device. XLA_FLAGS '
      'with --xla_force_host_platform_device_count takes precedence', flag_values=flag_values)


def define_model_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """--model, --batch, --steps, --warmup, --peer and --cpu_devices of train_step and sample."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string('model', MATCHED, f'{MATCHED} or a stage CONFIG:ARG, e.g. '
                      'configs/imagen.py:stage=base64,size=tiny (the stages: above)', **fv)
  flags.DEFINE_integer('batch', None, f"default: {MATCHED_BATCH} ({MATCHED}) or the config's",
                       **fv)
  flags.DEFINE_integer('steps', 10, 'timed iterations (median reported)', **fv)
  flags.DEFINE_enum('peer', 'auto', ('auto', 'yes', 'no'),
                    f'also run imagen-pytorch (auto: for {MATCHED}, when importable)', **fv)
  define_cpu_devices_flag(flag_values)


def run(main) -> None:
  """The benchmark's command line (diffusion_jax.cli: absl flags, one-line errors)."""
  from diffusion_jax import cli
  cli.run(main, config='stage', config_flag='model')


def set_cpu_devices(flag: str, batch: int) -> None:
  """Before the first JAX computation: the CPU devices the benchmark shards its batch over
  (`diffusion_jax.parallel.use_cpu_devices`; auto: one per core, as many as divide the
  batch). Train step 1.94 -> 2.15 images/s and sampler 0.145 -> 0.197 on 2 cores."""
  from diffusion_jax import parallel
  if flag == 'auto':
    cores = os.cpu_count() or 1
    n = max(d for d in range(1, min(cores, batch) + 1) if batch % d == 0)
  else:
    try:
      n = int(flag)
    except ValueError:
      n = 0
    if n < 1:
      raise ValueError(f'--cpu_devices={flag}: give auto or a positive device count')
  parallel.use_cpu_devices(n)


def configure(F):
  """The config of --model and --batch, and the CPU devices of --cpu_devices, before the first
  JAX computation; a bad value is one line (diffusion_jax.cli.CLIError)."""
  from diffusion_jax import cli
  try:
    cfg = model_config(F.model, F.batch)
  except (ValueError, OSError, ImportError, AttributeError) as e:
    raise cli.CLIError(f'--model={F.model}: {e}') from None
  try:
    set_cpu_devices(F.cpu_devices, int(cfg.input.batch_size))
  except ValueError as e:
    raise cli.CLIError(e) from None
  return cfg


def time_calls(fn: Callable[[], Any], steps: int, warmup: int = 2) -> list[float]:
  """Wall times (s) of `steps` calls after `warmup` untimed ones; fn blocks until done."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return times


def run_peer(kind: str, **flags) -> dict | None:
  """imagen-pytorch's numbers from `benchmarks/peer.py` in a child process (same machine, run
  right after ours); None when the peer is not importable or its process fails."""
  import subprocess
  cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'peer.py'),
         f'--kind={kind}'] + [f'--{k}={v}' for k, v in flags.items()]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('{')]
  if proc.returncode != 0 or not lines:
    tail = (proc.stderr.strip().splitlines() or ['no output'])[-1]
    print(f'peer process failed (exit {proc.returncode}): {tail}', file=sys.stderr)
    return None
  out = json.loads(lines[-1])
  return out if 'peer_images_per_sec' in out else None


def add_peer(result: dict, kind: str, **flags) -> None:
  """Runs the peer (`run_peer`) and adds its numbers and our speed-up over it to `result`."""
  peer = run_peer(kind, **flags)
  if peer is None:
    result['peer'] = 'imagen-pytorch not importable'
  else:
    result.update(peer)
    result['speedup_vs_peer'] = result['images_per_sec'] / peer['peer_images_per_sec']
    if result.get('achieved_gflops') and peer.get('peer_achieved_gflops'):
      # Throughput per unit of work: the two networks' FLOPs differ by a few percent.
      result['flops_rate_vs_peer'] = result['achieved_gflops'] / peer['peer_achieved_gflops']


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def load_config(spec: str):
  """`configs/imagen.py:stage=base64,size=tiny` (or a project's config file) -> ConfigDict."""
  from diffusion_jax import config_util
  return config_util.load_config(spec)


def matched_config():
  """Our ADM U-Net laid out like the imagen-pytorch Unet above, as an Imagen base config."""
  cfg = load_config('configs/imagen.py:stage=base64,size=tiny')
  m = cfg.model
  # One self-/cross-attention and feed-forward per level (layer_attns), convolutional
  # resampling: a forward pass of 154 GFLOP at batch 8 against the peer's 162.
  m.update(image_size=MATCHED_SIZE, model_channels=64, channel_mult=(1, 2, 4), num_res_blocks=2,
           attention_resolutions=(32, 16), attention_per='level', resblock_updown=False,
           mid_attention=True, text_attention='cross',
           ff_mult=2, num_heads=8, head_channels=64, text_len=MATCHED_TEXT_LEN,
           text_dim=MATCHED_TEXT_DIM, context_dim=MATCHED_TEXT_DIM, dtype='float32',
           remat_policy='none')
  cfg.input.image_size = MATCHED_SIZE
  cfg.input.batch_size = MATCHED_BATCH
  cfg.input.text_max_len = MATCHED_TEXT_LEN
  cfg.optimizer.warmup_steps = 0
  # The peer takes precomputed text embeddings: so does this benchmark (see TokenTable).
  cfg.text_encoder.name = ''
  return cfg


class TokenTable:
  """Stand-in frozen encoder: precomputed token embeddings looked up by id (the peer is
  given text embeddings directly; a table lookup costs nothing measurable)."""

  def __init__(self, vocab: int, dim: int):
    self.vocab, self.dim = vocab, dim

  def params(self):
    import jax
    import jax.numpy as jnp
    return {'table': jax.random.normal(jax.random.key(7), (self.vocab, self.dim), jnp.float32)}

  def text_forward(self, params, ids_BL, mask_BL):
    import jax.numpy as jnp
    tokens = params['table'][ids_BL] * mask_BL[..., None].astype(jnp.float32)
    return tokens, jnp.mean(tokens, axis=1)


def model_config(spec: str, batch: int | None):
  cfg = matched_config() if spec == MATCHED else load_config(spec)
  cfg = cfg.copy_and_resolve_references()
  if batch:
    cfg.input.batch_size = int(batch)
  cfg.model.dtype = 'float32'  # fp32 on CPU: the peer and the matmul peak are fp32 too
  if 'text_encoder' in cfg and cfg.text_encoder.get('name'):
    cfg.text_encoder.dtype = 'float32'
  return cfg


def random_batch(cfg, seed: int = 0) -> dict[str, np.ndarray]:
  """A batch of the train step's shapes (SR stages at their training crop size)."""
  from diffusion_jax.data import pipeline
  rng = np.random.default_rng(seed)
  batch = {}
  for name, (shape, dtype) in pipeline.batch_shapes(cfg.input).items():
    if name == 'text_ids':
      batch[name] = rng.integers(1, 20, shape).astype(dtype)
    elif name == 'text_mask':
      batch[name] = np.ones(shape, dtype)
    else:
      batch[name] = rng.uniform(-1, 1, shape).astype(dtype)
  return batch


def machine() -> dict[str, Any]:
  import jax
  return {'cpu_count': os.cpu_count(), 'jax': jax.__version__,
          'backend': jax.default_backend(), 'devices': jax.device_count(),
          'glibc_tunables': os.environ.get('GLIBC_TUNABLES')}


def emit(result: dict[str, Any]):
  """The benchmark's last line: one JSON object."""
  print(json.dumps(result), flush=True)
