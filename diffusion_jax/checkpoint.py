"""Checkpoints: orbax's CheckpointManager wired for the train state, the data iterator and the
config, with restore-or-init and loud fallbacks.

Layout (any orbax user can open it without this library):

  WORKDIR/checkpoints/<step>/state    the TrainState pytree (StandardSave)
  WORKDIR/checkpoints/<step>/data     the grain iterator state (one JSON per process)
  WORKDIR/checkpoints/<step>/config   the config and the library version (JSON)
  WORKDIR/checkpoints/<step>/checksums  a fingerprint of every array of the state (JSON)

Saves are asynchronous; orbax writes each step into a temporary directory and renames it
when complete, so a run killed mid-save leaves no step behind that looks finished. A step
that is finished but unreadable (truncated files, or arrays whose fingerprint differs from
the one saved with them) is skipped with an error in the log, moved aside to
WORKDIR/checkpoints_corrupt/ (a trainer; readers leave it in place) and the previous one
restored: never a silent restart from scratch, never garbage restored. A checkpoint whose
shapes differ from the config's fails with the first mismatched key.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import time
from typing import Any, Callable

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

import diffusion_jax
from diffusion_jax import errors
from diffusion_jax.data import pipeline as data_pipeline

log = logging.getLogger(__name__)

STATE, DATA, CONFIG, CHECKSUMS = 'state', 'data', 'config', 'checksums'
CORRUPT_DIR = 'checkpoints_corrupt'  # beside the checkpoints directory


class CheckpointShapeError(errors.InputError):
  """The checkpoint's arrays do not fit the config's state."""


class CorruptCheckpointError(RuntimeError):
  """A restored array's fingerprint differs from the one saved with it."""


class NoReadableCheckpointError(RuntimeError):
  """Checkpoints exist but none could be restored."""


class WorkdirLockedError(errors.InputError):
  """Another run holds the workdir."""


class WorkdirLock:
  """An exclusive lock on WORKDIR/.lock for one training run, held by process 0 (the others
  learn the outcome from it). It is an flock: the kernel drops it when the holder exits or
  is killed, so a SIGKILLed run never leaves it stuck. The file names the holder."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, '.lock')
    self._fd = None

  def _acquire(self) -> str | None:
    """None when held, else who holds it."""
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.read(fd, 4096).decode('utf-8', 'replace').strip()
      os.close(fd)
      return holder or 'unknown holder'
    except OSError as e:  # a filesystem without locks: say so, do not refuse
      log.warning('cannot lock %s (%s): two runs on this workdir are not prevented',
                  self.path, e.strerror)
      os.close(fd)
      return None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({'pid': os.getpid(), 'host': socket.gethostname(),
                             'since': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}
                            ).encode())
    self._fd = fd
    return None

  def __enter__(self):
    holder = self._acquire() if jax.process_index() == 0 else None
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      held = multihost_utils.broadcast_one_to_all(np.int32(holder is None))
      holder = None if int(held) else (holder or 'another run (see process 0)')
    if holder is not None:
      raise WorkdirLockedError(
          f'{self.workdir} is being trained by another run ({holder}): two writers would '
          'corrupt its checkpoints; wait for that run or stop it, or train in another --workdir')
    return self

  def __exit__(self, *exc):
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None


def _path_str(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def check_shapes(saved_metadata, abstract_state, step: int) -> None:
  """Raises CheckpointShapeError naming the first key whose shape differs (or is missing)."""
  saved = {_path_str(p): tuple(getattr(m, 'shape', ()) or ())
           for p, m in jax.tree_util.tree_flatten_with_path(saved_metadata)[0]}
  for p, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
    key = _path_str(p)
    want = tuple(getattr(leaf, 'shape', np.shape(leaf)))
    if key not in saved:
      raise CheckpointShapeError(
          f'checkpoint step {step} has no key {key!r} that the config\'s state needs; '
          'the config does not match the run that wrote this workdir (use a new --workdir)')
    if saved[key] != want:
      raise CheckpointShapeError(
          f'checkpoint step {step}: {key!r} has shape {saved[key]} but the config expects '
          f'{want}; the config does not match the run that wrote this workdir '
          '(use a new --workdir or the original config)')


# Fingerprints: two uint32 sums per array, exact on any sharding (integer sums wrap) ---------

def _bits_uint32(x: jax.Array) -> jax.Array:
  """The array's bits as uint32 (8-byte dtypes gain a trailing axis of 2)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)


def _fingerprint(x: jax.Array) -> jax.Array:
  """uint32[2]: sums of the bits weighted by odd position-dependent factors, so that any
  change of one element (and almost any of several) changes the result."""
  bits = _bits_uint32(x)
  position = jnp.zeros(bits.shape, jnp.uint32)
  for axis, size in enumerate(bits.shape):
    position = position * jnp.uint32(size) + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis)
  first = jnp.sum(bits * (position * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
  mixed = (bits ^ (bits >> jnp.uint32(15))) * jnp.uint32(0x85EBCA77) + position
  second = jnp.sum(mixed * (position * jnp.uint32(0x9E3779B2) + jnp.uint32(1)), dtype=jnp.uint32)
  return jnp.stack([first, second])


_fingerprints_jit = jax.jit(lambda tree: jax.tree.map(_fingerprint, tree))


def fingerprints(tree) -> dict[str, dict[str, str]]:
  """{path: {'dtype', 'fingerprint'}} of every array leaf of `tree` (device arrays stay put)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  arrays = {_path_str(p): x for p, x in leaves if hasattr(x, 'dtype') and hasattr(x, 'shape')}
  sums = jax.device_get(_fingerprints_jit(arrays))
  return {k: {'dtype': str(arrays[k].dtype), 'fingerprint': f'{int(v[0]):08x}{int(v[1]):08x}'}
          for k, v in sums.items()}


def fingerprint_mismatches(saved: dict, restored_tree, prefix: str = '') -> list[str]:
  """Paths of `restored_tree` (under `prefix` in `saved`) whose fingerprint differs from the
  saved one; arrays restored into another dtype are not compared."""
  now = fingerprints(restored_tree)
  bad = []
  for key, value in now.items():
    want = saved.get(f'{prefix}/{key}' if prefix else key)
    if want is not None and want['dtype'] == value['dtype'] and \
        want['fingerprint'] != value['fingerprint']:
      bad.append(f'{prefix}/{key}' if prefix else key)
  return bad


# Replica-parallel saving slices every replicated array on device first, one compiled slice
# per shape; below 1 MiB per slice that costs more than it saves (hundreds of compiles for a
# small model), so only large arrays are split across replicas.
ocp.type_handlers.register_type_handler(
    jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=1 << 20),
    override=True)


class Checkpointer:
  """A thin owner of one orbax CheckpointManager (composition, not inheritance)."""

  def __init__(self, directory: str, *, max_to_keep: int | None = 3,
               keep_period: int | None = None, async_save: bool = True,
               read_only: bool = False):
    """`read_only`: a reader of the state's subtrees and the config (sampling, export)."""
    self.directory = os.path.abspath(directory)
    if read_only:
      options = ocp.CheckpointManagerOptions(read_only=True)
      handlers = {STATE: ocp.PyTreeCheckpointHandler(), DATA: grain.checkpoint.CheckpointHandler(),
                  CONFIG: ocp.JsonCheckpointHandler(), CHECKSUMS: ocp.JsonCheckpointHandler()}
    else:
      if max_to_keep is not None and max_to_keep < 1:
        raise errors.InputError(
            f'keep_checkpoints={max_to_keep} would delete every checkpoint, the last one '
            'included: keep at least 1 (--config.keep_checkpoints=1)')
      options = ocp.CheckpointManagerOptions(
          max_to_keep=max_to_keep, keep_period=keep_period, create=True,
          enable_async_checkpointing=async_save)
      handlers = {STATE: ocp.StandardCheckpointHandler(), DATA: grain.checkpoint.CheckpointHandler(),
                  CONFIG: ocp.JsonCheckpointHandler(), CHECKSUMS: ocp.JsonCheckpointHandler()}
    self.read_only = read_only
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator=None, config=None, *, force: bool = False,
           save_args_fn: Callable | None = None) -> bool:
    """Saves (asynchronously) if the step is due per the options, or always with force."""
    items: dict[str, Any] = {STATE: ocp.args.StandardSave(state),
                             CHECKSUMS: ocp.args.JsonSave(fingerprints(state))}
    if data_iterator is not None:
      items[DATA] = (save_args_fn or data_pipeline.save_args)(data_iterator)
    if config is not None:
      payload = {'config': config.to_dict() if hasattr(config, 'to_dict') else dict(config),
                 'library_version': diffusion_jax.__version__}
      items[CONFIG] = ocp.args.JsonSave(_jsonable(payload))
    return self.manager.save(int(step), args=ocp.args.Composite(**items), force=force)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(int(step))

  def restore(self, step: int, abstract_state, data_iterator=None, *,
              restore_args_fn: Callable | None = None):
    """Restores one step into `abstract_state`'s shapes, dtypes and shardings."""
    meta = self.manager.item_metadata(step)
    saved = meta[STATE] if meta is not None and STATE in meta else None
    if saved is None:
      raise ValueError(f'checkpoint step {step} has no readable {STATE!r} metadata')
    check_shapes(saved, abstract_state, step)
    items: dict[str, Any] = {STATE: ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items[DATA] = (restore_args_fn or data_pipeline.restore_args)(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    self._verify(step, restored[STATE])
    return restored[STATE]

  def _verify(self, step: int, restored_tree, prefix: str = '') -> None:
    """Raises CorruptCheckpointError if a restored array differs from its saved fingerprint
    (checkpoints written before fingerprints existed are not checked)."""
    meta = self.manager.item_metadata(step)
    if meta is None or CHECKSUMS not in meta:
      return
    saved = self.manager.restore(int(step), args=ocp.args.Composite(
        **{CHECKSUMS: ocp.args.JsonRestore()}))[CHECKSUMS]
    bad = fingerprint_mismatches(saved, restored_tree, prefix)
    if bad:
      raise CorruptCheckpointError(
          f'checkpoint step {step}: {len(bad)} array(s) differ from the fingerprints saved '
          f'with them (first: {bad[0]}); its files are corrupt')

  def saved_config(self, step: int) -> dict | None:
    """The config the run saved with `step` (a dict), or None if it saved none."""
    meta = self.manager.item_metadata(step)  # the JSON item's own metadata is None
    if meta is None or CONFIG not in meta:
      return None
    restored = self.manager.restore(int(step), args=ocp.args.Composite(
        **{CONFIG: ocp.args.JsonRestore()}))
    return restored[CONFIG]['config']

  def restore_subtree(self, step: int, key: str, abstract_subtree):
    """One subtree of the saved state (e.g. 'ema_params') into `abstract_subtree`'s shapes,
    dtypes and shardings; nothing else is read (no optimizer state). Read-only readers."""
    meta = self.manager.item_metadata(step)
    saved = meta[STATE] if meta is not None and STATE in meta else None
    saved = getattr(saved, 'tree', saved)
    if saved is None or key not in saved:
      raise ValueError(f'checkpoint step {step} has no readable {STATE}/{key}')
    check_shapes({key: saved[key]}, {key: abstract_subtree}, step)
    item = {key: abstract_subtree}
    restored = self.manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True)}))
    self._verify(step, restored[STATE][key], prefix=key)
    return restored[STATE][key]

  def restore_newest(self, restore_fn: Callable[[int], Any]):
    """`restore_fn(step)` of the newest step it reads, or None when there is no checkpoint.

    Unreadable steps are skipped loudly, newest first; a writer moves each aside
    (`move_aside`) so that the run saves that step again later. Input errors (a shape
    mismatch, a refused config change) are raised at once: an older step of the same run
    would not fit either. If every step is unreadable the run stops with
    NoReadableCheckpointError rather than starting over.
    """
    steps = self.all_steps()
    if not steps:
      return None
    failures = []
    for step in reversed(steps):
      try:
        out = restore_fn(step)
      except errors.InputError:
        raise
      except Exception as e:  # noqa: BLE001 - any read failure means "this step is corrupt".
        msg = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'
        log.error('checkpoint step %d in %s is unreadable (%s); falling back to an older one',
                  step, self.directory, msg)
        failures.append((step, msg))
        if not self.read_only:
          self.move_aside(step, 'unreadable')
        continue
      if failures:
        log.error('restored checkpoint step %d after skipping unreadable step(s) %s',
                  step, [s for s, _ in failures])
      return out
    raise NoReadableCheckpointError(
        f'no checkpoint in {self.directory} could be restored ({failures}); refusing to start '
        'from scratch over them: move the directory away to start a new run')

  def move_aside(self, step: int, why: str) -> str:
    """Moves step `step` out of the manager's sight, to CORRUPT_DIR/<step>-<why>-<UTC time>
    beside the checkpoints directory (process 0 moves, every process reloads); returns the
    destination. Nothing is deleted: a user can inspect or move it back."""
    stamp = time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())
    dest = os.path.join(os.path.dirname(self.directory), CORRUPT_DIR, f'{step}-{why}-{stamp}')
    source = os.path.join(self.directory, str(step))
    if jax.process_index() == 0 and os.path.isdir(source):
      os.makedirs(os.path.dirname(dest), exist_ok=True)
      n = 1
      while os.path.exists(dest):
        dest, n = f'{dest.rsplit("~", 1)[0]}~{n}', n + 1
      shutil.move(source, dest)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f'checkpoint_move_aside_{step}')
    self.manager.reload()
    log.error('moved checkpoint step %d (%s) aside to %s', step, why, dest)
    return dest

  def restore_latest(self, abstract_state, data_iterator=None, **kw):
    """(state, step) from the newest readable step (`restore_newest`), or None."""
    return self.restore_newest(
        lambda step: (self.restore(step, abstract_state, data_iterator, **kw), step))


def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (str, int, float, bool)) or x is None:
    return x
  if isinstance(x, np.generic):
    return x.item()
  return str(x)
