"""Mesh creation, logical-axis rules and shardings of parameters, state and batches.

Modules name their parameter and activation axes logically (`embed`, `mlp`, `heads`, ...,
`act_batch`, ...); the config's `mesh.rules` alone maps those names to the mesh axes
('data', 'fsdp', 'tensor'). A mesh axis that does not divide its parameter dimension moves to
another dimension the rules shard (the 3 RGB channels of a first conv: to its output
channels; a U-Net decoder's concatenated 2240 input channels on fsdp=128: to the 1280
outputs), and only where no such dimension exists is the parameter replicated along it.
"""
from __future__ import annotations

import math
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')

# Logical axis name -> mesh axes. Parameters are sharded FSDP-style over 'fsdp' on their
# largest "embed"/"conv_in" dimension and tensor-parallel over 'tensor'; activations are
# sharded over the batch only. A mesh axis that does not divide its dimension moves to another
# dimension the rules shard, or else is replicated (`logical_shardings`).
DEFAULT_LOGICAL_RULES = (
    # parameters
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv', None),
    ('conv_in', 'fsdp'),
    ('conv_out', 'tensor'),
    ('vocab', 'tensor'),
    ('layers', None),
    ('norm', None),
    # activations
    ('act_batch', ('data', 'fsdp')),
    ('act_len', None),
    ('act_height', None),
    ('act_width', None),
    ('act_channels', None),
    ('act_embed', None),
    ('act_heads', 'tensor'),
    ('act_mlp', 'tensor'),
)


def use_cpu_devices(count: int | None = None) -> int:
  """Before JAX starts in this process: split the CPU into `count` devices (default one per
  core) for a mesh to shard the batch over. XLA's CPU runtime leaves much of a second core
  idle inside one device's step; one device per core fills it (on 2 cores: the demo's
  cascade samples in 31 s instead of 45, the same images). Returns the count; XLA_FLAGS's
  --xla_force_host_platform_device_count, when given, wins and -1 is returned."""
  count = int(os.cpu_count() or 1) if count is None else int(count)
  if count < 1:
    raise ValueError(f'--cpu_devices={count}: give a positive device count')
  if 'xla_force_host_platform_device_count' in os.environ.get('XLA_FLAGS', ''):
    return -1
  jax.config.update('jax_num_cpu_devices', count)
  return count


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
  """Resolves the ('data', 'fsdp', 'tensor') sizes; at most one -1 fills the rest."""
  sizes = [int(mesh_cfg.get(name, 1)) for name in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))} does not divide {num_devices} devices')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(
        f'mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but {num_devices} '
        'are available; set one axis to -1 to fill')
  return tuple(sizes)


def create_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(jax.devices()) if devices is None else list(devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  try:
    device_array = jax.experimental.mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # noqa: BLE001 - non-TPU topologies without a physical layout.
    device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, MESH_AXES)


def logical_rules(mesh_cfg) -> tuple[tuple[str, Any], ...]:
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes)
               for name, axes in mesh_cfg.rules)


def _mesh_axes_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  if isinstance(axes, str):
    return mesh.shape[axes]
  return math.prod(mesh.shape[a] for a in axes)


def spec_for_shape(shape: Sequence[int], logical: P | None, mesh: Mesh, rules) -> P:
  """Maps a logical PartitionSpec to a mesh one for an array of `shape`.

  Each dimension keeps the longest prefix of its mesh axes whose product divides it. An axis
  that does not fit there moves to the largest other dimension that the rules shard and that
  it still divides; only without one is the array replicated along it (which would cost a
  full copy of the parameter and its optimizer state on every device of that axis)."""
  if logical is None:
    return P()
  mesh_spec = tuple(nn.logical_to_mesh_axes(tuple(logical), rules))[:len(shape)]
  mesh_spec += (None,) * (len(shape) - len(mesh_spec))
  fixed: list[tuple[str, ...]] = []
  used: set[str] = set()
  dropped: list[str] = []
  for dim, axes in zip(shape, mesh_spec):
    names: tuple[str, ...] = ()
    if axes is not None:
      wanted = tuple(a for a in ((axes,) if isinstance(axes, str) else axes) if a not in used)
      names = wanted
      while names and dim % _mesh_axes_size(mesh, names):
        names = names[:-1]
      dropped += [a for a in wanted if a not in names]
      used.update(names)
    fixed.append(names)
  sharded_dims = sorted((i for i, axes in enumerate(mesh_spec) if axes is not None),
                        key=lambda i: -shape[i])
  for axis in dropped:
    for i in sharded_dims:
      if shape[i] % (_mesh_axes_size(mesh, fixed[i]) * mesh.shape[axis]) == 0:
        fixed[i] += (axis,)
        break
  return P(*(None if not names else names[0] if len(names) == 1 else names
             for names in fixed))


def logical_shardings(abstract_boxed_tree, mesh: Mesh, rules):
  """NamedShardings for a tree that may hold flax `LogicallyPartitioned` boxes.

  `abstract_boxed_tree` is what `jax.eval_shape(init)` returns; the result has the same
  structure as the *unboxed* tree (`nn.meta.unbox`).
  """
  logical_specs = nn.get_partition_spec(abstract_boxed_tree)
  unboxed = nn.meta.unbox(abstract_boxed_tree)
  return jax.tree.map(
      lambda leaf, spec: NamedSharding(mesh, spec_for_shape(leaf.shape, spec, mesh, rules)),
      unboxed, logical_specs,
      is_leaf=lambda x: isinstance(x, P) or x is None)


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def state_placement(abstract_state, sizes: dict[str, int], rules) -> dict[str, Any]:
  """Where the train state (params, EMA, optimizer moments) lives on a ('data', 'fsdp',
  'tensor') mesh of `sizes`, from the logical names alone (nothing is compiled).

  Returns the state's bytes per chip; the part of them in arrays that the fsdp axis divides in
  no dimension (each chip holds those whole); the largest such array; and, among the fsdp
  sizes that divide this one (data making up the same chips), the mesh that holds the least
  state per chip: a smaller fsdp that divides those arrays can beat one that leaves them
  whole. A mesh without fsdp (pure data parallelism) replicates the state by choice."""
  leaves = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(abstract_state))[0]

  def place(data, fsdp):
    mesh = jax.sharding.AbstractMesh((data, fsdp, sizes['tensor']), MESH_AXES)
    shardings = jax.tree.leaves(logical_shardings(abstract_state, mesh, rules))
    total, whole = 0, []
    for (path, leaf), sharding in zip(leaves, shardings):
      nbytes = math.prod(sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
      total += nbytes
      axes = {a for entry in sharding.spec if entry
              for a in ((entry,) if isinstance(entry, str) else entry)}
      if fsdp > 1 and 'fsdp' not in axes and math.prod(leaf.shape) > 1:
        whole.append((nbytes, jax.tree_util.keystr(path, simple=True, separator='/'),
                      tuple(leaf.shape)))
    return total, whole

  batch_chips = sizes['data'] * sizes['fsdp']
  placed = {f: place(batch_chips // f, f) for f in _divisors(sizes['fsdp'])}
  total, whole = placed[sizes['fsdp']]
  best_fsdp = min(placed, key=lambda f: (placed[f][0], -f))  # ties: the larger fsdp
  largest = max(whole, default=None)
  return {
      'state_bytes_per_chip': int(total),
      'state_unsharded_bytes_per_chip': int(sum(b for b, _, _ in whole)),
      'state_unsharded_arrays': len(whole),
      'state_largest_unsharded': None if largest is None else f'{largest[1]} {largest[2]}',
      'state_best_mesh': [batch_chips // best_fsdp, best_fsdp, sizes['tensor']],
      'state_best_bytes_per_chip': int(placed[best_fsdp][0]),
  }


def better_state_mesh(placement: dict[str, Any]) -> list[int] | None:
  """The (data, fsdp, tensor) sizes worth advising: those of `state_placement` when they hold
  under 80% of the current mesh's state per chip; else None."""
  if placement['state_best_bytes_per_chip'] < 0.8 * placement['state_bytes_per_chip']:
    return placement['state_best_mesh']
  return None


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading dimension over ('data', 'fsdp'), the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shard_batch(batch, mesh: Mesh):
  """Turns this process's slice of the global batch (numpy) into global jax.Arrays."""
  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)
  return jax.tree.map(put, batch)
