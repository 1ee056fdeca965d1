"""The training loop: one for every stage of every cascade.

    train(config, workdir)

builds the mesh, the network, the frozen encoder, the tokenizer and the input pipeline from
the config, restores the newest readable checkpoint (or initialises the state directly into
its shardings), then runs the jitted train step, writing metrics (clu: TensorBoard events in
`workdir` and the log, process 0 only), progress (steps/s, ETA), checkpoints (state + data
iterator + config) and periodic sample grids. SIGTERM (preemption) saves the current step,
waits for the save and returns; a run of `max_nonfinite_steps` consecutive non-finite steps
stops with an error and leaves the last good checkpoint intact.

Fine-tuning: `config.init_from` names a pretrained stage directory (`pretrained`:
config.json + model.safetensors [+ tokenizer/], e.g. written by tools/convert_glide) or a
trained stage directory ROOT/<stage> (its newest readable checkpoint's EMA parameters). A
fresh run (no checkpoint in `workdir`) then starts at step 0 with parameters and EMA equal to
those weights and a fresh optimizer; the fields that say what the weights mean (`ADOPTED_FIELDS`:
network, diffusion, text encoder, objective, target, the input sizes and caption rewrite) come
from the source's config with a warning listing each one replaced, execution leaves (dtype,
remat, cpu_kernels, batch sizes) and the local encoder/tokenizer paths where set stay the
run's, and the stage keeps the source's tokenizer. A run that finds a checkpoint resumes it
and never reads `init_from`; the checkpoint's config records it, and its adopted fields are
taken from there again, so resuming needs neither the flag nor the source directory.

Cached text: with `config.input.text_cache` (a directory written once by
`python -m diffusion_jax.tools.cache_text`, `train/text_cache.py`) no frozen text encoder is
built; batches carry its cached outputs and the cached empty-prompt encoding is the step's
`frozen` argument, so the step computes what it computes with the encoder.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
import shutil
import signal
from typing import Any, Callable

from clu import metric_writers, parameter_overview, periodic_actions
import flax.linen as nn
import jax
import ml_collections
import numpy as np

from diffusion_jax import checkpoint as ckpt_lib
from diffusion_jax import conditioning, config_util, errors, models, parallel, pretrained
from diffusion_jax import validation
from diffusion_jax.data import pipeline as data_pipeline
from diffusion_jax.train import sampling
from diffusion_jax.train import state as state_lib
from diffusion_jax.train import step as step_lib
from diffusion_jax.train import text_cache as text_cache_lib

log = logging.getLogger(__name__)

# Test hook: SIGKILL this process right after the given step (after pending saves finish),
# to exercise resume after a hard kill.
KILL_AT_STEP_ENV = 'DIFFUSION_JAX_KILL_AT_STEP'


class NonFiniteError(RuntimeError):
  """Too many consecutive steps with a non-finite loss, gradient or update."""


class ConfigChangeError(errors.InputError):
  """Resuming with a config that changes what the saved weights mean."""


# Building blocks ------------------------------------------------------------------------------

@dataclasses.dataclass
class Trainer:
  """Everything a stage's training needs, built from its config."""
  config: Any
  workdir: str
  mesh: Any
  rules: Any
  model: nn.Module
  encoder: Any
  tokenizer: Any
  train_step: Callable
  tx: Any
  state_shardings: Any
  abstract_state: Any
  init_fn: Callable
  text_cache: Any = None   # input.text_cache: the opened store (then no encoder is built)
  null_text: Any = None    # its empty-prompt encoding on the devices: the step's `frozen`
  codec: Any = None        # a latent stage's frozen autoencoder (conditioning.build_codec)

  @property
  def frozen_params(self):
    text = self.null_text if self.encoder is None else self.encoder.params
    if self.codec is None:
      return text
    return conditioning.latent_frozen(self.codec.params, text)

  @property
  def frozen_shardings(self):
    if self.encoder is None:
      text = None if self.null_text is None else jax.tree.map(lambda a: a.sharding,
                                                              self.null_text)
    else:
      text = self.encoder.param_shardings
    if self.codec is None:
      return text
    return conditioning.latent_frozen(jax.tree.map(lambda a: a.sharding, self.codec.params),
                                      text)


def build_trainer(config, workdir: str, source: InitSource | None = None) -> Trainer:
  """`source`: the weights a fresh run starts from; its tokenizer becomes the stage's."""
  crop = config_util.get(config.input, 'train_crop_size', None)
  if crop and not config_util.get(config.input, 'low_res_size', None):
    raise ValueError(f'input.train_crop_size={crop}: only super-resolution stages (with '
                     'input.low_res_size) train on crops; a base stage learns whole scenes. '
                     'Unset input.train_crop_size.')
  mesh = parallel.create_mesh(config.mesh)
  rules = parallel.logical_rules(config.mesh)
  model = models.build(config.model)
  text_cache = null_text = None
  if config_util.get(config.input, 'text_cache'):  # the encoder's outputs are read, not run
    text_cache = text_cache_lib.open_for_run(config)
    null_text = text_cache_lib.null_text_on_devices(text_cache, mesh)
    encoder = None
  else:
    encoder = conditioning.build_encoder(config, mesh, rules)
  if source is not None and source.tokenizer_dir:
    _keep_source_tokenizer(source.tokenizer_dir, workdir)
  if text_cache is not None and text_cache.tokenizer_dir:
    kept = os.path.isfile(os.path.join(workdir, 'tokenizer', 'tokenizer_config.json'))
    conditioning.sync_processes('text_cache_tokenizer')  # every process looked before a write
    if not kept:
      _keep_source_tokenizer(text_cache.tokenizer_dir, workdir)  # the ids the cache was made of
  tokenizer = conditioning.build_tokenizer(config, encoder, workdir, keep=True)
  codec = conditioning.build_codec(config, workdir, mesh)
  train_step, tx = step_lib.make_train_step(config, model, encoder, mesh=mesh, rules=rules,
                                            codec=codec)
  init, abstract = step_lib.abstract_state(config, model, tx, jax.random.PRNGKey(config.seed))
  parallelism = config_util.get(config, 'parallelism', 'gspmd')
  shardings = step_lib.state_shardings(abstract, mesh, rules, parallelism)
  # Advice only for FSDP: data parallelism and the shard_map variant replicate by design.
  if parallelism != 'shard_map' and mesh.shape['fsdp'] > 1:
    _warn_unsharded_state(parallel.state_placement(abstract, dict(mesh.shape), rules))
  unboxed = nn.meta.unbox(abstract)
  abstract_sharded = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), unboxed, shardings)
  return Trainer(config, workdir, mesh, rules, model, encoder, tokenizer, train_step, tx,
                 shardings, abstract_sharded, init, text_cache, null_text, codec)


def _warn_unsharded_state(placement: dict[str, Any]) -> None:
  """One line when another (data, fsdp) split of the devices would hold much less state."""
  better = parallel.better_state_mesh(placement)
  if better is None:
    return
  data, fsdp, _ = better
  log.warning('train state: %.3g GiB per device, %.3g GiB of it in %d arrays that the fsdp axis '
              'divides in no dimension (largest: %s); --config.mesh.data=%d '
              '--config.mesh.fsdp=%d would hold %.3g GiB per device',
              placement['state_bytes_per_chip'] / 2**30,
              placement['state_unsharded_bytes_per_chip'] / 2**30,
              placement['state_unsharded_arrays'], placement['state_largest_unsharded'], data,
              fsdp, placement['state_best_bytes_per_chip'] / 2**30)


def init_state(trainer: Trainer, source: InitSource | None = None):
  """A step-0 state: freshly initialised, or (`source`) parameters and EMA equal to the
  source's weights with a fresh optimizer, laid out in the trainer's shardings."""
  rng = jax.random.PRNGKey(trainer.config.seed)
  if source is None:
    return step_lib.init_into(trainer.init_fn, trainer.state_shardings, rng)
  params = source_params(source, trainer.abstract_state.params)
  create = jax.jit(lambda p, key: state_lib.create(p, trainer.tx, key),
                   out_shardings=trainer.state_shardings, donate_argnums=0)
  return create(params, rng)


# Starting from pretrained weights (config.init_from) --------------------------------------------

# What the weights mean (network, diffusion, encoder, objective) and the input sizes the network
# is built for: with init_from these come from the source's config. The data stays the run's.
ADOPTED_FIELDS = tuple(f for f in conditioning.WEIGHT_FIELDS
                       if f not in ('input.dataset', 'input.modules'))
# Where this machine keeps the frozen encoder and tokenizer: the run's value wins where set.
LOCATION_LEAVES = ('text_encoder.path', 'text_encoder.tokenizer_path',
                   'text_encoder.image_path')
_PICKLE_SUFFIXES = ('.pt', '.pth', '.bin', '.ckpt', '.pkl')


@dataclasses.dataclass
class InitSource:
  """The weights a fresh run starts from and the config that says what they mean."""
  path: str
  config: ml_collections.ConfigDict
  tokenizer_dir: str | None     # the tokenizer of whatever reads its token ids, if it has one
  stage: Any = None             # a trained stage's restored EMA (TrainedStage); None: safetensors


def read_init_source(path: str) -> InitSource:
  """The pretrained stage directory or trained ROOT/<stage> that `path` names; one-line
  errors.InputError for anything else. A trained stage's EMA parameters are restored here."""
  flag = f'--config.init_from={path}'
  want = ('name a pretrained stage directory (config.json + model.safetensors, e.g. written by '
          'python -m diffusion_jax.tools.convert_glide) or a trained stage directory ROOT/<stage>')
  if os.path.isfile(path):
    how = (f'; convert a glide-text2im .pt once: python -m diffusion_jax.tools.convert_glide '
           f'--checkpoint={path} --kind=KIND --out=DIR, then --config.init_from=DIR/KIND'
           if path.endswith(_PICKLE_SUFFIXES) else '')
    raise errors.InputError(f'{flag}: is a file; {want}{how}')
  if not os.path.isdir(path):
    raise errors.InputError(f'{flag}: no such directory; {want}')
  if pretrained.is_stage_dir(path):
    config = conditioning.config_from_saved(pretrained.read_config(path))
    return InitSource(path, config, _tokenizer_dir(os.path.join(path, pretrained.TOKENIZER_DIR)))
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    try:
      stage = conditioning.restore_stage(path, use_ema=True)
    except FileNotFoundError:
      raise errors.InputError(f'{flag}: its checkpoints/ holds no checkpoint; train that stage '
                              f'first, or {want}') from None
    return InitSource(path, stage.config, _tokenizer_dir(os.path.join(path, 'tokenizer')), stage)
  stages = pretrained.stage_dirs(path)
  if stages:
    raise errors.InputError(f'{flag}: holds the pretrained stages {", ".join(stages)}; name '
                            f'one, e.g. --config.init_from={next(iter(stages.values()))}')
  names = sorted(os.listdir(path))
  missing = ' and '.join(n for n in (pretrained.CONFIG_FILE, pretrained.WEIGHTS_FILE)
                         if n not in names)
  pickles = [n for n in names if n.endswith(_PICKLE_SUFFIXES)]
  how = (f' ({pickles[0]} is a pickle: convert it once with python -m '
         'diffusion_jax.tools.convert_glide)' if pickles else '')
  raise errors.InputError(f'{flag}: has no {missing} and no checkpoints/{how}; {want}')


def _tokenizer_dir(path: str) -> str | None:
  return path if os.path.isfile(os.path.join(path, 'tokenizer_config.json')) else None


def adopt_weight_fields(config, source_config, origin: str) -> ml_collections.ConfigDict:
  """`config` with `ADOPTED_FIELDS` taken from `source_config` (execution leaves and set
  locations kept); a warning names `origin` and lists every field replaced."""
  run, source = config.to_dict(), source_config.to_dict()
  out = copy.deepcopy(run)
  for field in ADOPTED_FIELDS:
    *parents, leaf = field.split('.')
    src, dst = source, out
    for key in parents:
      src, dst = src.get(key, {}), dst.setdefault(key, {})
    if leaf in src:
      dst[leaf] = copy.deepcopy(src[leaf])
    else:
      dst.pop(leaf, None)
  run_flat = config_util.flatten(run)
  for key, value in run_flat.items():
    keep = (key.rsplit('.', 1)[-1] in conditioning.EXECUTION_LEAVES or
            (key in LOCATION_LEAVES and value is not None))
    if keep and _adopted(key):
      _set_if_parent(out, key, value)
  adopted = ml_collections.ConfigDict(out)
  out_flat = config_util.flatten(adopted)
  replaced = [f'{k}: {run_flat.get(k)!r} -> {out_flat.get(k)!r}'
              for k in sorted(set(run_flat) | set(out_flat))
              if _adopted(k) and run_flat.get(k) != out_flat.get(k)]
  if replaced:
    log.warning('%s: the fields that say what its weights mean come from its config; '
                'replaced %d of the given config: %s', origin, len(replaced), '; '.join(replaced))
  return adopted


def _adopted(key: str) -> bool:
  return any(key == f or key.startswith(f + '.') for f in ADOPTED_FIELDS)


def _set_if_parent(tree: dict, key: str, value) -> None:
  """tree[a][b][c] = value for key 'a.b.c' where tree[a][b] exists."""
  *parents, leaf = key.split('.')
  for p in parents:
    tree = tree.get(p) if isinstance(tree, dict) else None
    if tree is None:
      return
  if isinstance(tree, dict):
    tree[leaf] = value


def resolve_init_from(config, checkpointer: ckpt_lib.Checkpointer
                      ) -> tuple[ml_collections.ConfigDict, InitSource | None]:
  """(the config the run trains with, the source a fresh run starts from or None).

  With a checkpoint in the workdir nothing is read from `init_from`: a run that was started
  from pretrained weights (its saved config names them) takes the adopted fields from the
  saved config again, so a resume is bit-exact with or without the flag."""
  given = config_util.get(config, 'init_from')
  steps = checkpointer.all_steps()
  if steps:
    if given:
      log.info('checkpoint step %d in %s: resuming it; --config.init_from=%s only starts a '
               'fresh run and is not read', steps[-1], checkpointer.directory, given)
    saved, step = _newest_saved_config(checkpointer, steps)
    started_from = config_util.get(saved or {}, 'init_from')
    if not started_from:
      return config, None
    adopted = adopt_weight_fields(config, conditioning.config_from_saved(saved),
                                  f'checkpoint step {step} (started from {started_from})')
    adopted.init_from = started_from
    return adopted, None
  if not given:
    return config, None
  source = read_init_source(given)
  adopted = adopt_weight_fields(config, source.config, f'--config.init_from={given}')
  adopted.init_from = os.path.abspath(given)  # recorded in every checkpoint's config
  try:
    validation.check_stage_config(adopted, num_devices=jax.device_count())
  except errors.InputError as e:
    raise errors.InputError(f'{e} (with the fields adopted from --config.init_from={given})'
                            ) from None
  needs_ids = 'text_ids' in models.example_inputs(adopted.model, 1)[2]
  if (source.tokenizer_dir is None and needs_ids and source.stage is None
      and not config_util.get(config_util.get(adopted, 'text_encoder'), 'tokenizer_path')):
    raise errors.InputError(
        f'--config.init_from={given}: has no tokenizer/ but its network reads token ids: '
        'convert it with --tokenizer, or set --config.text_encoder.tokenizer_path to the '
        'tokenizer it was trained with')
  log.info('initialising from %s: parameters and EMA from its weights, a fresh optimizer',
           given)
  return adopted, source


def _newest_saved_config(checkpointer, steps) -> tuple[dict | None, int]:
  """The config saved with the newest step that has a readable one."""
  for step in reversed(steps):
    try:
      return checkpointer.saved_config(step), step
    except Exception:  # noqa: BLE001 - a corrupt step: restore_newest moves it aside
      continue
  return None, steps[-1]


def source_params(source: InitSource, abstract_params):
  """The source's parameters in `abstract_params`' shapes, dtypes and shardings (every tensor
  present, of its shape and finite; one-line errors naming the file and key)."""
  if source.stage is not None:
    return jax.tree.map(
        lambda a, s: jax.device_put(a if a.dtype == s.dtype else a.astype(s.dtype), s.sharding),
        source.stage.params, abstract_params)
  host = pretrained.read_params(source.path, abstract_params, source.config.model.to_dict())
  return jax.tree.map(
      lambda a, s: jax.make_array_from_callback(
          s.shape, s.sharding, lambda index: np.asarray(a[index], s.dtype)),
      host, abstract_params)


def _keep_source_tokenizer(source_dir: str, workdir: str) -> None:
  """The source's tokenizer becomes the stage's (`ROOT/<stage>/tokenizer`), whole or not."""
  out = os.path.join(workdir, 'tokenizer')
  if jax.process_index() == 0:
    tmp = f'{out}.tmp{os.getpid()}'
    if os.path.isdir(tmp):
      shutil.rmtree(tmp)
    shutil.copytree(source_dir, tmp)
    if os.path.isdir(out):  # a fresh run's: no checkpoint reads it
      shutil.rmtree(out)
    os.replace(tmp, out)
  conditioning.sync_processes('init_from_tokenizer')


# The loop -------------------------------------------------------------------------------------

class _Preemption:
  """Turns SIGTERM and a first Ctrl-C (SIGINT) into a request checked between steps: the
  loop saves the current step and returns. A second Ctrl-C abandons the save."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signal = 0
    self._previous = {}

  @property
  def requested(self) -> bool:
    return bool(self.signal)

  def __enter__(self):
    def handler(signum, frame):
      del frame
      if signum == signal.SIGINT and self.signal:
        raise KeyboardInterrupt
      log.warning('received signal %d: saving a checkpoint at the end of this step, then '
                  'exiting%s', signum,
                  ' (Ctrl-C again abandons the save)' if signum == signal.SIGINT else '')
      self.signal = signum
    for signum in self.SIGNALS:
      try:
        self._previous[signum] = signal.signal(signum, handler)
      except ValueError:  # not the main thread: leave signals to the caller
        pass
    return self

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}


def _any_process(flag: bool) -> bool:
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def check_config_change(saved: dict, config, step: int, allow: bool) -> None:
  """Lists what differs from the config saved with checkpoint `step`; raises
  ConfigChangeError for what changes the meaning of the weights unless `allow`."""
  saved_config = conditioning.config_from_saved(saved)
  fields = tuple(sorted(set(saved_config.keys()) | set(config.keys())))
  changed = conditioning.config_differences(saved_config, config, fields)
  if not changed:
    return
  meaning = conditioning.meaning_changes(saved_config, config)
  log.warning('resuming checkpoint step %d with a changed config: %s', step, '; '.join(changed))
  if meaning and not allow:
    raise ConfigChangeError(
        f'resuming checkpoint step {step} with a config that changes what its weights mean '
        f'({"; ".join(meaning)}): use the config it was trained with, or another --workdir, '
        'or --allow_config_change to fine-tune from it')


def train(config, workdir: str, *, hooks: tuple[Callable, ...] = (),
          allow_config_change: bool = False) -> dict[str, Any]:
  """Trains one stage in `workdir`; returns the last step's metrics (host floats), with
  'step' and, when SIGTERM or Ctrl-C stopped the run early, 'signal' (its number).

  `hooks`: callables `hook(step, state, trainer, metrics)` run after every step (e.g.
  evaluations); `metrics` are the step's, on the device (reading one waits for the step).
  `allow_config_change`: resume even when the config changes what the saved weights mean
  (fine-tuning from them); the changes are listed either way.
  `config.init_from`: a fresh run starts from those weights (module docstring).
  Raises errors.InputError (bad config, unusable workdir, another run holding it) before any
  compilation.
  """
  validation.check_stage_config(config, num_devices=jax.device_count())
  validation.check_writable_dir(workdir, '--workdir')
  os.makedirs(workdir, exist_ok=True)
  with ckpt_lib.WorkdirLock(workdir):
    return _train(config, workdir, hooks, allow_config_change)


def _train(config, workdir: str, hooks, allow_config_change: bool) -> dict[str, Any]:
  checkpointer = ckpt_lib.Checkpointer(
      os.path.join(workdir, 'checkpoints'), max_to_keep=int(config_util.get(config, 'keep_checkpoints', 3)),
      keep_period=int(config_util.get(config, 'keep_every_steps', 0)) or None)
  config, source = resolve_init_from(config, checkpointer)
  trainer = build_trainer(config, workdir, source)
  data = data_pipeline.make_train_iterator(config.input, tokenizer=trainer.tokenizer,
                                           seed=int(config.seed), text_cache=trainer.text_cache)

  def restore(step):
    saved = checkpointer.saved_config(step)
    if saved is not None:
      check_config_change(saved, config, step, allow_config_change)
    return checkpointer.restore(step, trainer.abstract_state, data), step

  restored = checkpointer.restore_newest(restore)
  if restored is None:
    state = init_state(trainer, source)
    log.info('no checkpoint in %s: initialised a fresh state%s', workdir,
             f' from {source.path}' if source else '')
  else:
    state, step = restored
    log.info('restored checkpoint step %d from %s', step, workdir)
  start_step = int(jax.device_get(state.step))

  is_lead = jax.process_index() == 0
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_lead)
  if start_step == 0 and is_lead:
    parameter_overview.log_parameter_overview(jax.device_get(state.params))
    writer.write_hparams({k: v for k, v in config_util.flatten(config).items()
                          if isinstance(v, (int, float, str, bool))})

  total = int(config.total_steps)
  log_steps = max(int(config_util.get(config, 'log_steps', 50)), 1)
  ckpt_steps = max(int(config_util.get(config, 'ckpt_steps', 500)), 1)
  max_nonfinite = int(config_util.get(config, 'max_nonfinite_steps', 20))
  kill_at = int(os.environ.get(KILL_AT_STEP_ENV, '0') or 0)
  report = periodic_actions.ReportProgress(num_train_steps=total, writer=writer,
                                           every_steps=log_steps)
  sample_steps = int(config_util.get(config, 'sample_steps', 0))
  sample_grid = None
  if sample_steps > 0:
    sample_grid = sampling.SampleGrid(trainer, seed=int(config.seed))
  skipped_so_far = [int(jax.device_get(state_lib.nonfinite_counts(state.opt_state)[1]))]

  def check_finite(at_step: int, metrics_at_step) -> int:
    """Warns about a skipped step, stops a run of them; returns the current streak."""
    consecutive, skipped = (int(x) for x in jax.device_get(
        (metrics_at_step['nonfinite_consecutive'], metrics_at_step['nonfinite_total'])))
    if skipped > skipped_so_far[0]:
      log.warning('step %d skipped: its loss, gradients or updated parameters were not finite '
                  '(%d in a row, %d in this run; the run stops at %d in a row)', at_step,
                  consecutive, skipped, max_nonfinite)
    skipped_so_far[0] = skipped
    if consecutive >= max_nonfinite:
      checkpointer.wait()
      raise NonFiniteError(
          f'{consecutive} consecutive steps had a non-finite loss, gradient or update (step '
          f'{at_step}); the last good checkpoint in {checkpointer.directory} is intact. Lower '
          'the learning rate or check the data, then resume.')
    return consecutive

  batch_shardings = None
  step_fn = None
  unchecked = None  # (step, metrics) whose non-finite count is not read yet
  metrics_host: dict[str, Any] = {}
  step = start_step
  with _Preemption() as preemption, jax.set_mesh(trainer.mesh), \
      nn.logical_axis_rules(trainer.rules):
    while step < total:
      batch = next(data)
      global_batch = parallel.shard_batch(batch, trainer.mesh)
      if step_fn is None:
        batch_shardings = step_lib.batch_shardings(global_batch, trainer.mesh)
        step_fn = step_lib.jit_train_step(trainer.train_step, trainer.state_shardings,
                                          batch_shardings, trainer.frozen_shardings,
                                          trainer.mesh)
      state, metrics = step_fn(state, global_batch, trainer.frozen_params)
      step += 1
      # The previous step's non-finite count is read with this step already queued, so the
      # host never waits for the device between steps (on a 2-core CPU that wait cost the
      # demo's base 27 ms of its 470 ms step).
      if unchecked is not None:
        check_finite(*unchecked)
      unchecked = (step, metrics)
      for hook in hooks:
        hook(step, state, trainer, metrics)
      if sample_grid is not None and (step % sample_steps == 0 or step == total):
        grid = sample_grid(step, state)
        if grid is not None:
          writer.write_images(step, {'samples': grid[None]})
      report(step)
      if step % log_steps == 0 or step == total:
        metrics_host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        for k, v in data.metrics().items():
          metrics_host[k] = float(v)
        writer.write_scalars(step, metrics_host)
      stop = _any_process(preemption.requested) or checkpointer.reached_preemption(step)
      if step % ckpt_steps == 0 or step == total or stop:
        streak = check_finite(*unchecked)  # a step that ends the run is never saved
        unchecked = None
        if streak:
          log.warning('step %d not checkpointed: the last %d step(s) were skipped as '
                      'non-finite; the last checkpoint is kept', step, streak)
        else:
          checkpointer.save(step, state, data, config, force=True)
      if stop:
        log.warning('preempted at step %d: %s, exiting', step,
                    'not saved (non-finite steps)' if streak else 'checkpoint saved')
        break
      if kill_at and step == kill_at:
        checkpointer.wait()
        os.kill(os.getpid(), signal.SIGKILL)
  if unchecked is not None:
    check_finite(*unchecked)
  checkpointer.wait()
  checkpointer.close()
  writer.flush()
  if not metrics_host and step > start_step:
    metrics_host = {k: float(v) for k, v in jax.device_get(metrics).items()}
  metrics_host['step'] = step
  if preemption.signal:
    metrics_host['signal'] = preemption.signal
  return metrics_host
