r"""Ahead-of-time compile of a stage's real train step for a TPU topology, on any host.

  python -m diffusion_jax.tools.aot --config=configs/imagen.py:stage=base64,size=paper \
      --topology=v4:8x8x4 [--batch=2048] [--remat=POLICY] [--mesh=DATA,FSDP,TENSOR] [--mfu=0.4] \
      [--set=model.num_res_blocks=2 ...] [--config.model.num_res_blocks=2 ...]

`--topology` is `GEN:AxBxC` (v4, v5p: 3-d chip grids; v5e, v6e: 2-d), compiled with libtpu
through `jax.experimental.topologies` (no TPU needed: `pip install -e '.[tpu]'`), or `cpu:N`
for N local CPU devices (the same code path, runnable anywhere). Nothing is allocated: the
train state, the batch and the frozen encoder's weights are ShapeDtypeStructs carrying their
NamedShardings on the topology's mesh, and the train step is `jax.jit(...).lower().compile()`d
exactly as the trainer jits it (same in/out shardings, state donated). With
`--config.input.text_cache=DIR` (any value: the cache is not read) the step is the cached-text
one: the batch carries the encoder's outputs and no encoder weights are on the chips.

Printed: per-chip argument / output / temp memory from `compiled.memory_analysis()` and
whether it fits the chip's HBM; XLA's FLOPs (`cost_analysis()`, which counts a scanned
layer stack's body once) and the analytic count (`diffusion_jax.flops`: matmuls and
convolutions of the whole step's jaxpr, backward and remat recomputation included); a step
time PROJECTED from the analytic FLOPs at an assumed MFU (not a measurement). The last line
is one JSON object. `--set=KEY=VALUE` (repeatable) changes any config field before the
compile, as `--config.KEY=VALUE` does here and in the trainer, so a variant can be sized
before it is trained.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Any

from absl import flags

from diffusion_jax import cli, config_util, validation

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
  hbm_bytes: int
  peak_bf16_flops: float  # per chip, dense
  chip_config: str        # libtpu's chip_config_name: one device per chip


# Public spec sheets (bf16 dense peak per chip).
CHIPS = {
    'v4': Chip(32 * GIB, 275e12, 'megacore'),
    'v5p': Chip(95 * GIB, 459e12, 'megacore'),
    'v5e': Chip(16 * GIB, 197e12, 'default'),
    'v6e': Chip(32 * GIB, 918e12, 'default'),
}


# The most memory libtpu's compile of a paper stage has taken on a 2-core host (unCLIP
# decoder64 for 256 v4 chips: resident + swapped, docs/AOT.md). A host with less RAM + swap
# has its compile OOM-killed.
PAPER_COMPILE_PEAK_BYTES = int(28.5e9)


def host_memory_bytes(meminfo: str = '/proc/meminfo') -> tuple[int, int]:
  """(RAM, swap) of this host in bytes; (0, 0) where /proc/meminfo cannot be read."""
  fields = {}
  try:
    with open(meminfo) as f:
      for line in f:
        key, _, rest = line.partition(':')
        fields[key] = int(rest.split()[0]) * 1024  # kB
  except (OSError, ValueError, IndexError):
    return 0, 0
  return fields.get('MemTotal', 0), fields.get('SwapTotal', 0)


def host_memory_warning(size: str, topology: str, ram: int, swap: int) -> str | None:
  """A one-line warning when a paper stage's libtpu compile will likely not fit this host."""
  if topology.startswith('cpu') or size != 'paper' or not ram:
    return None
  if ram + swap >= 1.2 * PAPER_COMPILE_PEAK_BYTES:
    return None
  return (f'warning: this host has {ram / GIB:.0f} GiB of RAM and {swap / GIB:.0f} GiB of swap; '
          f'libtpu\'s compile of a paper stage has peaked at '
          f'{PAPER_COMPILE_PEAK_BYTES / 1e9:.1f} GB and is killed when it runs out: add swap '
          f'to make about {1.2 * PAPER_COMPILE_PEAK_BYTES / 1e9:.0f} GB (docs/AOT.md)')


load_config = config_util.load_config


def topology_devices(topology: str):
  """(devices, chip spec or None) of 'v4:8x8x4' (compile-only TPU devices) or 'cpu:8'."""
  import jax
  gen, _, shape = topology.partition(':')
  if gen == 'cpu':
    n = int(shape) if shape else len(jax.devices('cpu'))
    devices = jax.devices('cpu')
    if len(devices) < n:
      raise ValueError(f'topology {topology!r}: only {len(devices)} CPU devices (set XLA_FLAGS='
                       f'--xla_force_host_platform_device_count={n})')
    return devices[:n], None
  if gen not in CHIPS:
    raise ValueError(f'topology {topology!r}: generation must be one of {sorted(CHIPS)} or cpu')
  # libtpu takes a host-wide lock unless told otherwise; compile-only use needs no TPU, so
  # several compiles (or a test beside a CLI run) may share the host.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  from jax.experimental import topologies
  dims = [int(d) for d in shape.split('x')]
  host = tuple(min(d, 2) for d in dims) + (1,) * (3 - len(dims))  # 4 chips per host
  try:
    topo = topologies.get_topology_desc(
        platform='tpu', topology_name=topology, chip_config_name=CHIPS[gen].chip_config,
        chips_per_host_bounds=host, num_slices=1)
  except Exception as e:  # noqa: BLE001 - libtpu missing or refusing: say what to do.
    raise RuntimeError(f'libtpu could not describe topology {topology!r} ({type(e).__name__}: '
                       f"{e}); install it with pip install -e '.[tpu]'") from e
  return list(topo.devices), CHIPS[gen]


def topology_device_count(topology: str) -> int:
  """The devices of 'v4:8x8x4' (one per chip) or 'cpu:8' (default 8), without building them."""
  gen, _, shape = topology.partition(':')
  if gen == 'cpu':
    return int(shape or 8)
  return math.prod(int(d) for d in shape.split('x'))


def apply_overrides(config, *, batch=None, remat=None, mesh=None, settings=()):
  """A copy of `config` with the CLI's changes; `settings` are `KEY=VALUE` strings (dotted
  keys of existing fields, Python literals or else plain strings)."""
  config = config.copy_and_resolve_references()
  for item in settings:
    key, sep, raw = item.partition('=')
    if not sep or not key:
      raise ValueError(f'--set={item!r}: give KEY=VALUE, e.g. --set=model.num_res_blocks=2')
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = raw
    node, walked = config, []
    for name in key.split('.'):
      walked.append(name)
      if not hasattr(node, 'keys') or name not in node:
        raise ValueError(f'--set={item!r}: the config has no field {".".join(walked)!r}')
      parent, node = node, node[name]
    parent[name] = value
  if batch:
    config.input.batch_size = int(batch)
  if remat:
    config.model.remat_policy = remat
  if mesh:
    try:
      sizes = [int(s) for s in mesh.split(',')]
    except ValueError:
      sizes = []
    if len(sizes) != 3:
      raise ValueError(f'--mesh={mesh!r}: give DATA,FSDP,TENSOR sizes, e.g. 1,-1,1')
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = sizes
  return config


def _abstract_encoder(config, mesh, rules):
  """The stage's frozen encoder without weights: (encoder, abstract sharded params) or
  (None, None). Only the architecture is read (the preset), never a weights file."""
  from diffusion_jax import encoders, parallel
  import flax.linen as nn
  import jax
  import numpy as np
  te = config_util.get(config, 'text_encoder')
  if te is None or not config_util.get(te, 'name'):
    return None, None
  cfg = encoders.encoder_config(te.name, config_util.get(te, 'preset', 'tiny'), None,
                                dtype=config_util.get(te, 'dtype', 'float32'))
  name, module, _, abstract = encoders._module_and_params(cfg)  # noqa: SLF001
  cls = encoders.TextEncoder if name == 't5' else encoders.CLIPEncoder
  # The pure forwards read only the module (and CLIP's normalisation constants).
  enc = object.__new__(cls)
  enc.name, enc.module = name, module
  enc.zero_padding = bool(config_util.get(te, 'zero_padding', True))
  enc.image_mean, enc.image_std = encoders.CLIP_MEAN, encoders.CLIP_STD
  # The empty prompt a network without a learned null reads is tokenized while tracing: any
  # ids of the stage's text length trace the same program.
  length = int(config_util.get(te, 'max_length', 0) or config.input.text_max_len)
  enc.tokenizer = lambda prompts: (np.zeros((len(prompts), length), np.int32),
                                   np.ones((len(prompts), length), bool))
  shardings = parallel.logical_shardings(abstract, mesh, rules)
  unboxed = nn.meta.unbox(abstract)
  return enc, jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                           unboxed, shardings)


def _abstract_codec(config, mesh):
  """A latent stage's frozen autoencoder without weights: (codec, abstract replicated params,
  where its architecture came from), or (None, None, ''). The architecture is that of
  autoencoder.path's config.json when it names a diffusers AutoencoderKL folder (or a
  pipeline directory with vae/), else Stable Diffusion's VAE (`diffusers_io.vae.SD_CONFIG`)."""
  import jax
  from diffusion_jax import conditioning, convert, latent
  from diffusion_jax.diffusers_io import vae as dio_vae
  if not conditioning.is_latent_stage(config):
    return None, None, ''
  path = config_util.get(config.autoencoder, 'path')
  folder = latent.autoencoder_folder(path) if path and os.path.isdir(path) else ''
  config_file = os.path.join(folder, dio_vae.CONFIG_NAME) if folder else ''
  if config_file and os.path.isfile(config_file):
    kw, source = dio_vae.vae_kwargs(convert.read_json_object(config_file)), folder
  else:
    kw, source = dio_vae.vae_kwargs(dio_vae.SD_CONFIG), "Stable Diffusion's VAE"
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                        dio_vae.abstract_params(kw))
  module = dio_vae.AutoencoderKL(**kw)
  return latent.Codec(module, params, latent.LatentSpace.of(module)), params, source


def _abstract_batch(config, mesh):
  import jax
  from diffusion_jax import parallel
  from diffusion_jax.data import pipeline
  return {k: jax.ShapeDtypeStruct(shape, dtype,
                                  sharding=parallel.batch_sharding(mesh, len(shape)))
          for k, (shape, dtype) in pipeline.batch_shapes(config.input).items()}


def _cached_text(config, encoder, batch, mesh):
  """(batch, frozen) of a run with `input.text_cache`: the batch carries the encoder's
  outputs in place of token ids, and `frozen` only the cached empty-prompt encoding (when the
  network reads it); no encoder runs and none of its weights are on the chips."""
  import jax
  import numpy as np
  from diffusion_jax import models, parallel
  b, length = batch['text_ids'].shape
  f32 = np.dtype(np.float32)
  shapes = {'text_tokens': ((b, length, encoder.token_dim), f32),
            'text_mask': ((b, length), np.dtype(bool)),
            'text_pooled': ((b, encoder.embed_dim), f32)}
  out = {k: v for k, v in batch.items() if k not in ('text_ids', 'text_mask')}
  out.update({k: jax.ShapeDtypeStruct(shape, dtype,
                                      sharding=parallel.batch_sharding(mesh, len(shape)))
              for k, (shape, dtype) in shapes.items()})
  if not any(k.startswith('null_text_') for k in models.example_inputs(config.model, 1)[2]):
    return out, None
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  null = {'tokens': (1, length, encoder.token_dim), 'mask': (1, length),
          'pooled': (1, encoder.embed_dim)}
  return out, {k: jax.ShapeDtypeStruct(shape, np.dtype(bool) if k == 'mask' else f32,
                                       sharding=replicated) for k, shape in null.items()}


_UNITS = {'': 1, 'K': 1024, 'M': 1024**2, 'G': 1024**3, 'T': 1024**4}
# libtpu refuses to finish a compile whose temporaries exceed the chip's HBM.
_HBM_REFUSAL = re.compile(r'HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM '
                          r'\(([\d.]+)([KMGT]?)\)')


def _shard_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
  import numpy as np
  return int(sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                 for x in __import__('jax').tree.leaves(tree)))


def _first(cost):
  return cost[0] if isinstance(cost, (list, tuple)) else (cost or {})


def compile_train_step(config, topology: str = 'cpu:8', *, mfu: float = 0.4,
                       hbm_bytes: int | None = None) -> dict[str, Any]:
  """Lowers and compiles the stage's train step for `topology`; returns the report dict."""
  import flax.linen as nn
  import jax
  from diffusion_jax import conditioning, models, parallel
  from diffusion_jax import flops as flops_lib
  from diffusion_jax.train import step as step_lib

  devices, chip = topology_devices(topology)
  mesh = parallel.create_mesh(config.mesh, devices)
  rules = parallel.logical_rules(config.mesh)
  model = models.build(config.model)
  encoder, frozen = _abstract_encoder(config, mesh, rules)
  batch = _abstract_batch(config, mesh)
  if encoder is not None and config_util.get(config.input, 'text_cache'):
    batch, frozen = _cached_text(config, encoder, batch, mesh)
    encoder = None
  codec, codec_params, codec_source = _abstract_codec(config, mesh)
  if codec is not None:
    frozen = conditioning.latent_frozen(codec_params, frozen)
  train_step, tx = step_lib.make_train_step(config, model, encoder, mesh=mesh, rules=rules,
                                            codec=codec)
  _, abstract = step_lib.abstract_state(config, model, tx, jax.random.PRNGKey(0))
  parallelism = config_util.get(config, 'parallelism', 'gspmd')
  state_sh = step_lib.state_shardings(abstract, mesh, rules, parallelism)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                       nn.meta.unbox(abstract), state_sh)
  batch_sh = jax.tree.map(lambda x: x.sharding, batch)
  frozen_sh = None if frozen is None else jax.tree.map(lambda x: x.sharding, frozen)
  step_fn = step_lib.jit_train_step(train_step, state_sh, batch_sh, frozen_sh, mesh)

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    t0 = time.perf_counter()
    lowered = step_fn.lower(state, batch, frozen)
    lower_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    refused = None
    # Compile-only TPU executables cannot be loaded back from a persistent cache on this
    # host: keep them out of a shared cache (jax would warn on every later read).
    cache_was = jax.config.jax_enable_compilation_cache
    if chip is not None:
      jax.config.update('jax_enable_compilation_cache', False)
    try:
      compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - only libtpu's out-of-HBM refusal is a result
      refused = _HBM_REFUSAL.search(str(e))
      if refused is None:
        raise
      compiled = None
    finally:
      jax.config.update('jax_enable_compilation_cache', cache_was)
    compile_s = time.perf_counter() - t0
    analytic = flops_lib.count_flops(train_step, state, batch, frozen)

  n = len(devices)
  if hbm_bytes is None:
    hbm_bytes = chip.hbm_bytes if chip else (os.sysconf('SC_PAGE_SIZE') *
                                             os.sysconf('SC_PHYS_PAGES')) // n
  if compiled is not None:
    mem = compiled.memory_analysis()
    arg, out = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
    alias, temp = int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes)
    code = int(mem.generated_code_size_in_bytes)
    xla_per_chip = float(_first(compiled.cost_analysis()).get('flops', -1.0))
  else:
    # The compiler stopped at its HBM check: temporaries from its message, arguments from
    # the shardings; the (donated) outputs alias the state; XLA's FLOPs are unknown (-1).
    arg = _shard_bytes((state, batch, frozen))
    out = alias = _shard_bytes(state)
    temp = int(float(refused.group(1)) * _UNITS[refused.group(2)])
    code, xla_per_chip = 0, -1.0
  # Donated state: outputs that alias arguments take no extra memory.
  hbm = arg + out - alias + temp + code
  params = sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))
  report = {
      'family': config.family, 'stage': config.stage, 'size': config.size,
      'topology': topology, 'chips': n, 'device_kind': devices[0].device_kind,
      'mesh': dict(zip(parallel.MESH_AXES, (int(s) for s in mesh.devices.shape))),
      'batch': int(config.input.batch_size), 'remat': config_util.get(config.model, 'remat_policy', 'none'),
      'dtype': config_util.get(config.model, 'dtype', 'float32'), 'params': int(params),
      'argument_bytes_per_chip': arg, 'output_bytes_per_chip': out, 'alias_bytes_per_chip': alias,
      'temp_bytes_per_chip': temp, 'code_bytes_per_chip': code, 'hbm_bytes_per_chip': hbm,
      'hbm_capacity_bytes': int(hbm_bytes), 'fits_hbm': bool(hbm <= hbm_bytes),
      'flops_per_chip_xla': xla_per_chip,
      'flops_per_step_xla': xla_per_chip * n if xla_per_chip >= 0 else -1.0,
      'flops_per_step_analytic': int(analytic),
      'lower_s': round(lower_s, 2), 'compile_s': round(compile_s, 2),
      'compiled': compiled is not None,
  }
  if codec is not None:  # the frozen autoencoder encodes every batch inside the step
    report['autoencoder'] = codec_source
    report['autoencoder_params'] = int(sum(math.prod(x.shape)
                                           for x in jax.tree.leaves(codec_params)))
  if parallelism != 'shard_map':  # the shard_map variant replicates the state by design
    report.update(parallel.state_placement(abstract, report['mesh'], rules))
  if refused is not None:
    report['compile_error'] = refused.group(0)
    report['fits_hbm'] = False
  if chip is not None:
    report['assumed_mfu'] = mfu
    report['projected_step_s'] = analytic / (n * chip.peak_bf16_flops * mfu)
    report['projected_images_per_s_per_chip'] = (
        int(config.input.batch_size) / report['projected_step_s'] / n)
  return report


def format_report(r: dict[str, Any]) -> str:
  g = lambda b: f'{b / GIB:8.2f} GiB'
  lines = [
      f"{r['family']} {r['stage']} ({r['size']}): {r['params'] / 1e6:.1f}M params, batch "
      f"{r['batch']}, {r['dtype']}, remat={r['remat']}",
      f"topology {r['topology']}: {r['chips']} x {r['device_kind']}, mesh {r['mesh']}",
  ]
  if 'autoencoder' in r:
    lines.append(f"frozen autoencoder in the step: {r['autoencoder']}, "
                 f"{r['autoencoder_params'] / 1e6:.1f}M params (replicated)")
  lines += [
      f"compile: lower {r['lower_s']:.1f} s, compile {r['compile_s']:.1f} s" +
      ('' if r.get('compiled', True) else f"  -- REFUSED by the compiler: {r['compile_error']}"),
      'per-chip memory (compiled.memory_analysis):',
      f"  arguments {g(r['argument_bytes_per_chip'])}",
      f"  outputs   {g(r['output_bytes_per_chip'])}  (aliased to donated arguments: "
      f"{g(r['alias_bytes_per_chip']).strip()})",
      f"  temp      {g(r['temp_bytes_per_chip'])}",
      f"  total     {g(r['hbm_bytes_per_chip'])}  of {g(r['hbm_capacity_bytes']).strip()}: "
      f"{'FITS' if r['fits_hbm'] else 'DOES NOT FIT'}",
      f"FLOPs per step: XLA cost_analysis {r['flops_per_step_xla']:.3e} (scanned bodies once), "
      f"analytic {r['flops_per_step_analytic']:.3e} (matmul + conv, fwd + bwd + remat)",
  ]
  if 'state_bytes_per_chip' in r:
    lines.append(f"train state (params, EMA, optimizer): {g(r['state_bytes_per_chip']).strip()} "
                 f"per chip")
    from diffusion_jax import parallel
    better = parallel.better_state_mesh(r)
    if better:
      mesh = ','.join(str(v) for v in better)
      lines.append(
          f"  {g(r['state_unsharded_bytes_per_chip']).strip()} of it in "
          f"{r['state_unsharded_arrays']} arrays that fsdp={r['mesh']['fsdp']} divides in no "
          f"dimension (largest: {r['state_largest_unsharded']}); --mesh={mesh} would hold "
          f"{g(r['state_best_bytes_per_chip']).strip()} per chip")
  if 'projected_step_s' in r:
    lines.append(f"PROJECTION (not measured): {r['projected_step_s']:.3f} s/step, "
                 f"{r['projected_images_per_s_per_chip']:.1f} images/s/chip at an assumed "
                 f"MFU of {r['assumed_mfu']:.0%} of the bf16 peak")
  return '\n'.join(lines)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS, sys_argv=None) -> None:
  fv = dict(flag_values=flag_values)
  cli.define_config(flag_values, sys_argv, required=True)
  flags.DEFINE_string('topology', 'v4:8x8x4', 'e.g. v4:8x8x4, v5e:16x16, cpu:8', **fv)
  flags.DEFINE_integer('batch', None, "global batch (default: the config's input.batch_size)",
                       **fv)
  flags.DEFINE_string('remat', None, 'model.remat_policy, e.g. nothing_saveable', **fv)
  flags.DEFINE_string('mesh', None, 'DATA,FSDP,TENSOR sizes (-1 fills), e.g. 1,-1,1', **fv)
  flags.DEFINE_float('mfu', 0.4, 'assumed MFU of the projected step time', **fv)
  flags.DEFINE_multi_string('set', [], 'KEY=VALUE: change a config field, e.g. '
                            '--set=model.num_res_blocks=2 (repeatable; as --config.KEY=VALUE)',
                            **fv)


def main(argv, F: flags.FlagValues = flags.FLAGS):
  del argv
  topology = F.topology
  gen, _, shape = topology.partition(':')
  if gen != 'cpu' and gen not in CHIPS:
    raise cli.CLIError(f'--topology={topology}: the generation must be one of '
                       f'{", ".join(sorted(CHIPS))} or cpu')
  if not all(d.isdigit() and int(d) > 0
             for d in (shape.split('x') if gen != 'cpu' else [shape or '8'])):
    raise cli.CLIError(f'--topology={topology}: give GEN:AxBxC with sizes >= 1 (e.g. v4:8x8x4) '
                       'or cpu:N')
  if gen == 'cpu':
    n = shape or '8'
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               f' --xla_force_host_platform_device_count={n}').strip()
  # Compile-only TPU devices need no TPU backend: keep jax's own backend on the CPU.
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  import jax
  jax.config.update('jax_threefry_partitionable', True)
  try:
    config = apply_overrides(F.config, batch=F.batch, remat=F.remat, mesh=F.mesh,
                             settings=F.set)
  except (ValueError, TypeError) as e:
    raise cli.CLIError(e) from None
  validation.check_stage_config(config, num_devices=topology_device_count(topology))
  warning = host_memory_warning(str(config_util.get(config, 'size', '')), topology,
                                *host_memory_bytes())
  if warning:
    print(warning, file=sys.stderr, flush=True)
  report = compile_train_step(config, topology, mfu=F.mfu)
  print(format_report(report), flush=True)
  print(json.dumps(report), flush=True)


if __name__ == '__main__':
  # Before the config loads (and imports jax): compile-only TPU devices need no TPU backend.
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  define_flags()
  cli.run(main, config='stage')
