"""Checkpoints: orbax's CheckpointManager wired for the train state, the data iterator and the
config, with restore-or-init and loud fallbacks.

Layout (any orbax user can open it without this library):

  WORKDIR/checkpoints/<step>/state    the TrainState pytree (StandardSave)
  WORKDIR/checkpoints/<step>/data     the grain iterator state (one JSON per process)
  WORKDIR/checkpoints/<step>/config   the config and the library version (JSON)

Saves are asynchronous; orbax writes each step into a temporary directory and renames it
when complete, so a run killed mid-save leaves no step behind that looks finished. A step
that is finished but unreadable (truncated or corrupted files) is skipped with an error in
the log and the previous one restored: never a silent restart from scratch. A checkpoint
whose shapes differ from the config's fails with the first mismatched key.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

import diffusion_jax
from diffusion_jax.data import pipeline as data_pipeline

log = logging.getLogger(__name__)

STATE, DATA, CONFIG = 'state', 'data', 'config'


class CheckpointShapeError(ValueError):
  """The checkpoint's arrays do not fit the config's state."""


class NoReadableCheckpointError(RuntimeError):
  """Checkpoints exist but none could be restored."""


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
                  CONFIG: ocp.JsonCheckpointHandler()}
    else:
      options = ocp.CheckpointManagerOptions(
          max_to_keep=max_to_keep, keep_period=keep_period, create=True,
          enable_async_checkpointing=async_save)
      handlers = {STATE: ocp.StandardCheckpointHandler(), DATA: grain.checkpoint.CheckpointHandler(),
                  CONFIG: ocp.JsonCheckpointHandler()}
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator=None, config=None, *, force: bool = False,
           save_args_fn: Callable | None = None) -> bool:
    """Saves (asynchronously) if the step is due per the options, or always with force."""
    items: dict[str, Any] = {STATE: ocp.args.StandardSave(state)}
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
    return restored[STATE]

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
    return restored[STATE][key]

  def restore_newest(self, restore_fn: Callable[[int], Any]):
    """`restore_fn(step)` of the newest step it reads, or None when there is no checkpoint.

    Unreadable steps are skipped loudly, newest first. Shape mismatches are raised at once
    (an older step of the same run would not fit either). If every step is unreadable the
    run stops with NoReadableCheckpointError rather than starting over.
    """
    steps = self.all_steps()
    if not steps:
      return None
    failures = []
    for step in reversed(steps):
      try:
        out = restore_fn(step)
      except CheckpointShapeError:
        raise
      except Exception as e:  # noqa: BLE001 - any read failure means "this step is corrupt".
        msg = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'
        log.error('checkpoint step %d in %s is unreadable (%s); falling back to an older one',
                  step, self.directory, msg)
        failures.append((step, msg))
        continue
      if failures:
        log.error('restored checkpoint step %d after skipping unreadable step(s) %s',
                  step, [s for s, _ in failures])
      return out
    raise NoReadableCheckpointError(
        f'no checkpoint in {self.directory} could be restored ({failures}); refusing to start '
        'from scratch over them: move the directory away to start a new run')

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
