"""The trainer: sharding invariance, non-finite guard, checkpoints (resume, preemption,
corruption, other meshes) and learning on Shapes."""
import glob
import logging
import os
import signal
import subprocess
import sys

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import glide, imagen, unclip
from diffusion_jax import checkpoint as ckpt_lib
from diffusion_jax import conditioning, errors, parallel
from diffusion_jax.train import loop, step as step_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(module=glide, stage='base64', **overrides):
  cfg = module.get_config(f'stage={stage},size=tiny')
  cfg.total_steps = 6
  cfg.ckpt_steps = 3
  cfg.log_steps = 2
  cfg.input.batch_size = 8
  cfg.optimizer.warmup_steps = 0
  cfg.optimizer.lr = 1e-3
  for key, value in overrides.items():
    node = cfg
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg


def _batch(cfg, seed=0):
  rng = np.random.default_rng(seed)
  B, S, L = cfg.input.batch_size, cfg.input.image_size, cfg.input.text_max_len
  batch = {'image': rng.uniform(-1, 1, (B, S, S, 3)).astype(np.float32),
           'text_ids': rng.integers(1, 20, (B, L)).astype(np.int32),
           'text_mask': np.arange(L)[None, :] < rng.integers(2, L, (B, 1))}
  if cfg.input.get('low_res_size'):
    s = cfg.input.low_res_size
    batch['low_res'] = rng.uniform(-1, 1, (B, s, s, 3)).astype(np.float32)
  return batch


def _loss_and_grads(cfg, mesh_shape=None, devices=None):
  """Loss and gradients of one step on a mesh (float32), from the same initial state."""
  cfg = cfg.copy_and_resolve_references()
  if mesh_shape is not None:
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = mesh_shape
  mesh = parallel.create_mesh(cfg.mesh, devices)
  rules = parallel.logical_rules(cfg.mesh)
  from diffusion_jax import models
  model = models.build(cfg.model)
  encoder = conditioning.build_encoder(cfg, mesh, rules)
  train_step, tx = step_lib.make_train_step(cfg, model, encoder, mesh=mesh, rules=rules)
  state, _ = step_lib.init_state(cfg, model, tx, mesh, rules, jax.random.PRNGKey(0))
  batch = parallel.shard_batch(_batch(cfg), mesh)
  frozen = None if encoder is None else encoder.params
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    loss, _, grads, _ = jax.jit(train_step.loss_and_grads)(state, batch, frozen)
  return float(loss), jax.tree.map(np.asarray, grads)


@pytest.fixture(scope='module')
def reference_grads():
  cfg = tiny_config(imagen, 'base64')
  return cfg, _loss_and_grads(cfg, (1, 1, 1), jax.devices()[:1])


@pytest.mark.parametrize('mesh_shape,parallelism', [
    ((8, 1, 1), 'gspmd'), ((2, 4, 1), 'gspmd'), ((2, 2, 2), 'gspmd'), ((4, 2, 1), 'shard_map')])
def test_step_is_invariant_to_sharding(reference_grads, mesh_shape, parallelism):
  cfg, (ref_loss, ref_grads) = reference_grads
  cfg = cfg.copy_and_resolve_references()
  cfg.parallelism = parallelism
  loss, grads = _loss_and_grads(cfg, mesh_shape)
  assert loss == pytest.approx(ref_loss, rel=1e-6), f'{mesh_shape}/{parallelism}: loss differs'
  ref_norm = np.sqrt(sum(np.sum(g**2) for g in jax.tree.leaves(ref_grads)))
  diff = np.sqrt(sum(np.sum((a - b)**2) for a, b in zip(jax.tree.leaves(grads),
                                                       jax.tree.leaves(ref_grads))))
  assert diff <= 1e-5 * ref_norm, f'{mesh_shape}/{parallelism}: grads differ by {diff / ref_norm}'


def test_frozen_encoder_takes_the_configs_length_and_batch():
  cfg = tiny_config(imagen, 'base64')
  cfg.text_encoder.max_length = 12
  cfg.text_encoder.batch_size = 24
  mesh = parallel.create_mesh(cfg.mesh)
  encoder = conditioning.build_encoder(cfg, mesh, parallel.logical_rules(cfg.mesh))
  assert (encoder.max_length, encoder.batch_size) == (12, 24), (
      'build_encoder dropped text_encoder.max_length / batch_size from the stage config')


def test_nonfinite_batch_is_skipped_and_counted():
  cfg = tiny_config(glide, 'base64')
  mesh = parallel.create_mesh(cfg.mesh)
  rules = parallel.logical_rules(cfg.mesh)
  from diffusion_jax import models
  model = models.build(cfg.model)
  train_step, tx = step_lib.make_train_step(cfg, model, None, mesh=mesh, rules=rules)
  state, shardings = step_lib.init_state(cfg, model, tx, mesh, rules, jax.random.PRNGKey(0))
  good = _batch(cfg)
  bad = dict(good, image=good['image'].copy())
  bad['image'][3, 2, 2, 1] = np.nan
  step = jax.jit(train_step)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state1, m1 = step(state, parallel.shard_batch(good, mesh), None)
    state2, m2 = step(state1, parallel.shard_batch(bad, mesh), None)
    state3, m3 = step(state2, parallel.shard_batch(good, mesh), None)
  same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert not same(state1.params, state.params), 'a good step must change the parameters'
  assert same(state2.params, state1.params), 'the NaN batch changed the parameters'
  assert same(state2.ema_params, state1.ema_params), 'the NaN batch changed the EMA'
  assert same(state2.opt_state.inner_state, state1.opt_state.inner_state), \
      'the NaN batch changed the optimizer moments'
  assert int(m2['nonfinite_consecutive']) == 1 and int(m2['nonfinite_total']) == 1
  assert int(m3['nonfinite_consecutive']) == 0 and int(m3['nonfinite_total']) == 1
  assert not same(state3.params, state2.params), 'training must resume after a bad batch'


def _checkpoint_steps(workdir) -> list[int]:
  """The steps checkpointed under WORKDIR/checkpoints, read from the directory names."""
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit())


def _poison_batches_from(first: int, monkeypatch) -> None:
  """Every batch from the `first`-th on (1-based) reaches the train step as NaN images."""
  real_shard = loop.parallel.shard_batch
  calls = []

  def poisoned(batch, mesh):
    calls.append(None)
    if len(calls) >= first:
      batch = dict(batch, image=np.full_like(np.asarray(batch['image']), np.nan))
    return real_shard(batch, mesh)
  monkeypatch.setattr(loop.parallel, 'shard_batch', poisoned)


def test_run_of_nonfinite_steps_stops_with_the_last_checkpoint_intact(tmp_path, monkeypatch):
  # Batches from the third on carry a NaN: steps 3, 4, 5 are skipped, step 4 (in the streak)
  # is not checkpointed, and the third in a row (max_nonfinite_steps=3) stops the run.
  _poison_batches_from(3, monkeypatch)
  cfg = tiny_config(glide, 'base64', total_steps=10, ckpt_steps=2, max_nonfinite_steps=3)
  with pytest.raises(loop.NonFiniteError, match='3 consecutive steps.*step 5'):
    loop.train(cfg, str(tmp_path))
  steps = _checkpoint_steps(tmp_path)
  assert steps == [2], f'checkpoints {steps}: step 4 came in a run of skipped steps'


def test_run_of_nonfinite_steps_ending_on_a_checkpoint_step_is_not_saved(tmp_path,
                                                                          monkeypatch):
  # The loop reads each step's non-finite count one step late (no wait per step), but
  # before any save: steps 3 and 4 are non-finite, max 2, and step 4 would be checkpointed.
  _poison_batches_from(3, monkeypatch)
  cfg = tiny_config(glide, 'base64', total_steps=10, ckpt_steps=2, max_nonfinite_steps=2)
  with pytest.raises(loop.NonFiniteError, match='2 consecutive steps.*step 4'):
    loop.train(cfg, str(tmp_path))
  steps = _checkpoint_steps(tmp_path)
  assert steps == [2], f'checkpoints {steps}: step 4 ended the run and must not be saved'


def test_keep_every_k_keeps_multiples_beside_the_last_n(tmp_path):
  cfg = tiny_config(glide, 'base64', total_steps=5, ckpt_steps=1, keep_checkpoints=1,
                    keep_every_steps=2)
  loop.train(cfg, str(tmp_path))
  steps = _checkpoint_steps(tmp_path)
  assert steps == [2, 4, 5], f'checkpoints {steps}: want every 2nd step plus the last one'


def _restore_raw(workdir, step=None):
  """(step, state as a dict of numpy arrays, data-iterator JSONs) of a checkpoint, read with
  plain orbax (no library code, any topology)."""
  root = os.path.join(workdir, 'checkpoints')
  if step is None:
    step = _checkpoint_steps(workdir)[-1]
  path = os.path.join(root, str(step), 'state')
  ckptr = ocp.PyTreeCheckpointer()
  tree = ckptr.metadata(path).item_metadata.tree
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  state = ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  data_files = sorted(glob.glob(os.path.join(root, str(step), 'data', 'process_*')))
  data = [open(f).read() for f in data_files]
  return step, state, data


def _as_dict(state):
  return flax.serialization.to_state_dict(jax.tree.map(np.asarray, state))


def _assert_identical(a, b, what):
  norm = lambda path: tuple(str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k))))
                           for k in path)
  la = sorted((norm(p), x) for p, x in jax.tree_util.tree_flatten_with_path(a)[0])
  lb = sorted((norm(p), x) for p, x in jax.tree_util.tree_flatten_with_path(b)[0])
  assert [p for p, _ in la] == [p for p, _ in lb], f'{what}: trees differ'
  for (path, x), (_, y) in zip(la, lb):
    assert np.array_equal(x, y), f'{what}: {"/".join(path)} differs'


def _cli(workdir, cfg_arg, extra=(), env_extra=None):
  env = dict(os.environ)
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
  env['JAX_PLATFORMS'] = 'cpu'
  env.update(env_extra or {})
  cmd = [sys.executable, '-m', 'diffusion_jax.train', f'--config={REPO}/configs/glide.py:{cfg_arg}',
         f'--workdir={workdir}', '--config.input.batch_size=8', '--config.optimizer.warmup_steps=0',
         *extra]
  return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_resume_after_sigkill_is_bit_exact(tmp_path):
  n = 3
  flags = [f'--config.total_steps={2 * n}', f'--config.ckpt_steps={n}']
  straight = _cli(tmp_path / 'straight', 'stage=base64,size=tiny', flags)
  assert straight.returncode == 0, straight.stderr[-3000:]
  killed = _cli(tmp_path / 'killed', 'stage=base64,size=tiny', flags,
                {loop.KILL_AT_STEP_ENV: str(n + 1)})
  assert killed.returncode == -signal.SIGKILL, f'expected SIGKILL, got {killed.returncode}'
  assert _restore_raw(tmp_path / 'killed')[0] == n
  resumed = _cli(tmp_path / 'killed', 'stage=base64,size=tiny', flags)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'restored checkpoint step 3' in resumed.stderr
  step_a, state_a, data_a = _restore_raw(tmp_path / 'straight')
  step_b, state_b, data_b = _restore_raw(tmp_path / 'killed')
  assert step_a == step_b == 2 * n
  _assert_identical(state_a, state_b, 'resumed vs uninterrupted state')
  assert data_a == data_b, 'data iterator positions differ after resume'


@pytest.fixture(scope='module')
def trained_workdir(tmp_path_factory):
  """6 steps of the tiny GLIDE base with checkpoints at 3 and 6 and a sample grid at 6."""
  workdir = str(tmp_path_factory.mktemp('glide_base'))
  metrics = loop.train(tiny_config(glide, 'base64', sample_steps=6), workdir)
  assert metrics['step'] == 6
  return workdir


def test_sample_grid_written_with_ema_params(trained_workdir):
  from PIL import Image
  import json
  path = os.path.join(trained_workdir, 'samples', 'step_00000006.png')
  assert os.path.exists(path), 'no sample grid at step 6'
  grid = np.asarray(Image.open(path))
  # 8 tiny 16 px samples in a 3 x 3 grid with 2 px padding.
  assert grid.shape == (3 * 18 + 2, 3 * 18 + 2, 3)
  assert grid[2:18, 2:18].std() > 0, 'the first sample is blank'
  captions = json.load(open(os.path.join(trained_workdir, 'samples', 'captions.json')))
  assert len(captions) == 8 and all(isinstance(c, str) and c for c in captions)


def test_sigterm_saves_the_current_step_and_resume_continues(tmp_path, trained_workdir):
  cfg = tiny_config(glide, 'base64', total_steps=6, ckpt_steps=100)
  workdir = str(tmp_path / 'run')

  def send_sigterm(step, state, trainer, metrics):
    if step == 4:
      os.kill(os.getpid(), signal.SIGTERM)

  metrics = loop.train(cfg, workdir, hooks=(send_sigterm,))
  assert metrics['step'] == 4, 'SIGTERM must stop the run at the current step'
  assert _restore_raw(workdir)[0] == 4, 'SIGTERM must save the current (off-interval) step'
  metrics = loop.train(cfg, workdir)
  assert metrics['step'] == 6
  _, resumed, _ = _restore_raw(workdir, 6)
  _, straight, _ = _restore_raw(trained_workdir, 6)
  _assert_identical(resumed, straight, 'SIGTERM-resumed vs uninterrupted state')


def test_truncated_latest_checkpoint_falls_back_loudly(tmp_path, trained_workdir, caplog):
  import shutil
  workdir = str(tmp_path / 'copy')
  shutil.copytree(trained_workdir, workdir)
  files = [f for f in glob.glob(os.path.join(workdir, 'checkpoints', '6', 'state', '**', '*'),
                                recursive=True) if os.path.isfile(f) and os.path.getsize(f) > 64]
  assert files
  for f in files:
    with open(f, 'r+b') as fh:
      fh.truncate(os.path.getsize(f) // 3)
  cfg = tiny_config(glide, 'base64')
  trainer = loop.build_trainer(cfg, workdir)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'))
  with caplog.at_level(logging.ERROR):
    state, step = checkpointer.restore_latest(trainer.abstract_state)
  assert step == 3, 'must fall back to the previous intact checkpoint'
  assert any('step 6' in r.getMessage() and 'unreadable' in r.getMessage() for r in caplog.records)
  _, expected, _ = _restore_raw(trained_workdir, 3)
  _assert_identical(_as_dict(state), expected, 'fallback state')


def test_restore_onto_another_mesh(tmp_path, trained_workdir):
  cfg = tiny_config(glide, 'base64')
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 4, 1
  trainer = loop.build_trainer(cfg, str(tmp_path))
  checkpointer = ckpt_lib.Checkpointer(os.path.join(trained_workdir, 'checkpoints'))
  state, step = checkpointer.restore_latest(trainer.abstract_state)
  leaf = jax.tree.leaves(state.params)[0]
  assert leaf.sharding.mesh.shape == {'data': 2, 'fsdp': 4, 'tensor': 1}
  _, expected, _ = _restore_raw(trained_workdir, step)
  _assert_identical(_as_dict(state), expected, 'state restored on (2,4,1)')


def test_trainer_warns_when_another_mesh_holds_much_less_state(tmp_path, caplog):
  # 10 and 20 channels (and their concatenations) split 2-ways and 4-ways, not 8-ways
  cfg = tiny_config(glide, 'base64', **{'model.model_channels': 10})
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 8, 1
  with caplog.at_level(logging.WARNING, logger=loop.__name__):
    loop.build_trainer(cfg, str(tmp_path))
    cfg.mesh.data, cfg.mesh.fsdp = 2, 4
    loop.build_trainer(cfg, str(tmp_path))
  lines = [r.getMessage() for r in caplog.records if 'train state' in r.getMessage()]
  assert len(lines) == 1, f'one warning for fsdp=8 and none for the mesh it names: {lines}'
  assert '--config.mesh.data=2 --config.mesh.fsdp=4 would hold' in lines[0], lines[0]


def test_shape_mismatch_names_the_key(tmp_path, trained_workdir):
  cfg = tiny_config(glide, 'base64')
  cfg.model.model_channels = cfg.model.model_channels * 2
  trainer = loop.build_trainer(cfg, str(tmp_path))
  checkpointer = ckpt_lib.Checkpointer(os.path.join(trained_workdir, 'checkpoints'))
  with pytest.raises(ckpt_lib.CheckpointShapeError, match=r"params/.*has shape"):
    checkpointer.restore_latest(trainer.abstract_state)


@pytest.mark.parametrize('module,stage,factor,crop', [
    (imagen, 'base64', 0.8, None), (glide, 'base64', 0.8, None),
    (glide, 'noised_clip', 0.95, None), (unclip, 'prior', 0.8, None),
    (imagen, 'sr256', 0.8, 16)])
def test_loss_decreases_on_shapes(tmp_path, module, stage, factor, crop):
  # The noised CLIP (trained by this same trainer) sees mostly heavily noised images at
  # random t, so its contrastive loss falls more slowly than a denoiser's. The SR stage
  # trains on crops (Imagen's recipe) and is judged on whole images.
  cfg = tiny_config(module, stage, total_steps=40, ckpt_steps=1000, log_steps=40)
  cfg.input.batch_size = 16
  cfg.optimizer.lr = 3e-3
  trainer = loop.build_trainer(cfg, str(tmp_path))
  from diffusion_jax.data import pipeline
  data = pipeline.make_train_iterator(cfg.input, tokenizer=trainer.tokenizer, seed=123)
  cfg.input.train_crop_size = crop
  fixed = parallel.shard_batch(next(data), trainer.mesh)
  state = loop.init_state(trainer)
  with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(trainer.rules):
    eval_loss = jax.jit(lambda s, b: trainer.train_step.loss_and_grads(s, b, trainer.frozen_params)[0])
    before = float(eval_loss(state, fixed))
  metrics = loop.train(cfg, str(tmp_path))
  checkpointer = ckpt_lib.Checkpointer(os.path.join(str(tmp_path), 'checkpoints'))
  trained, _ = checkpointer.restore_latest(trainer.abstract_state)
  trained = trained.replace(rng=state.rng)  # same draws as `before`
  with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(trainer.rules):
    after = float(eval_loss(trained, fixed))
  assert metrics['step'] == 40
  assert after < factor * before, (
      f'{module.__name__}:{stage} (train crop {crop}) did not learn: {before} -> {after}')


def test_train_crops_need_a_convolutional_model_and_matching_low_res():
  cfg = tiny_config(imagen, 'base64')
  cfg.input.train_crop_size = 8
  with pytest.raises(ValueError, match='only super-resolution stages'):
    loop.build_trainer(cfg, '/nonexistent')
  from diffusion_jax import models
  sr = tiny_config(imagen, 'sr256').model
  model = models.build(sr)
  x = jnp.zeros((1, 16, 16, 3))
  cond = {'low_res': jnp.zeros((1, 16, 16, 3)), 'aug_t': jnp.zeros((1,)),
          'text_tokens': jnp.zeros((1, 4, sr.text_dim)), 'text_mask': jnp.ones((1, 4), bool)}
  with pytest.raises(ValueError, match='low-res input'):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, jnp.zeros((1,)), cond))
  # The ADM U-Net of unCLIP's upsamplers takes crops too (the paper's 1024 px stage trains so).
  up = models.build(tiny_config(unclip, 'up256').model)
  out = jax.eval_shape(lambda: up.init_with_output(
      jax.random.PRNGKey(0), x, jnp.zeros((1,)), {'low_res': jnp.zeros((1, 8, 8, 3))})[0])
  assert out.shape == (1, 16, 16, 3), f'the U-Net maps a 16 px crop to {out.shape}'
  with pytest.raises(ValueError, match='multiples of 2'):
    jax.eval_shape(lambda: up.init(jax.random.PRNGKey(0), jnp.zeros((1, 15, 15, 3)),
                                   jnp.zeros((1,)), {'low_res': jnp.zeros((1, 8, 8, 3))}))


def _free_port():
  import socket
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_on_loopback_match_one_process(tmp_path):
  # Adam's epsilon well above the gradients' rounding: at the default 1e-8, a parameter whose
  # gradient is ~1e-8 turns the order of the cross-process reduction into a 2e-5 change
  # after 3 steps (one element of one 16-element leaf did). A wrong batch split or
  # reduction changes gradients by their own size, far beyond the tolerance below (the two
  # runs agree to 1e-7 with it).
  flags = ['--config.total_steps=3', '--config.ckpt_steps=3', '--config.optimizer.eps=1e-4']
  port = _free_port()
  procs = []
  for pid in range(2):
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
               JAX_PLATFORMS='cpu', JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
               JAX_NUM_PROCESSES='2', JAX_PROCESS_ID=str(pid),
               JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo')
    cmd = [sys.executable, '-m', 'diffusion_jax.train',
           f'--config={REPO}/configs/glide.py:stage=base64,size=tiny',
           f'--workdir={tmp_path / "multi"}', '--config.input.batch_size=8',
           '--config.optimizer.warmup_steps=0', *flags]
    procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  single = _cli(tmp_path / 'single', 'stage=base64,size=tiny', flags)
  assert single.returncode == 0, single.stderr[-3000:]
  _, multi_state, _ = _restore_raw(tmp_path / 'multi')
  _, single_state, _ = _restore_raw(tmp_path / 'single')
  # Equal up to the order of the cross-process gradient reduction.
  for a, b in zip(jax.tree.leaves(multi_state['params']), jax.tree.leaves(single_state['params'])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6,
                               err_msg='2 processes x 4 devices differ from 1 process x 8')
  assert int(multi_state['step']) == 3


def test_ema_decay_warms_up_after_the_start_step():
  from diffusion_jax.train.step import ema_decay_at
  cfg = {'ema_decay': 0.995, 'ema_start_step': 5}
  got = [float(ema_decay_at(cfg, s)) for s in (0, 4, 5, 6, 95, 10_000)]
  want = [0.0, 0.0, 0.1, 2 / 11, 91 / 100, 0.995]
  np.testing.assert_allclose(got, want, rtol=1e-6,
                             err_msg='EMA decay must be 0 before the start, then (1+n)/(10+n) '
                                     'capped at ema_decay')
  # After 300 updates the initial parameters' weight in the EMA is the product of the decays.
  init_weight = np.prod([float(ema_decay_at(cfg, s)) for s in range(5, 305)])
  assert init_weight < 1e-3, f'the initialisation still weighs {init_weight:.3g} in the EMA'
  plain = dict(cfg, ema_warmup=False)
  np.testing.assert_allclose([float(ema_decay_at(plain, s)) for s in (4, 5, 6)],
                             [0.0, 0.995, 0.995], rtol=1e-6,
                             err_msg='ema_warmup=False must give the constant decay')


def test_low_res_blur_is_drawn_in_training_fixed_at_sampling_and_off_by_default():
  from diffusion_jax.diffusion import guidance, schedules
  cfg = glide.get_config('stage=up256,size=tiny')
  cfg.diffusion.noise_aug = True
  low_res = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (8, 16, 16, 3)), jnp.float32)
  rng = jax.random.PRNGKey(3)
  # Off (the default): the noise augmentation draws from the same key as before blur existed.
  want, _ = guidance.noise_augment(low_res, rng, schedules.from_config(cfg.diffusion),
                                   max_level=float(cfg.diffusion.get('noise_aug_max', 1.0)))
  plain = conditioning.Conditioner(cfg).low_res_cond(low_res, rng)
  np.testing.assert_array_equal(plain['low_res'], want, err_msg='no blur must change nothing')
  cfg.diffusion.noise_aug = False
  cfg.diffusion.low_res_blur_max = 1.5
  cond = conditioning.Conditioner(cfg)
  drawn = np.asarray(cond.low_res_cond(low_res, rng)['low_res'])
  roughness = np.abs(np.diff(drawn, axis=1)).mean(axis=(1, 2, 3))
  raw = np.abs(np.diff(np.asarray(low_res), axis=1)).mean(axis=(1, 2, 3))
  assert np.all(roughness <= raw + 1e-6) and roughness.std() > 0.1, (
      f'training must blur each example by its own sigma: {roughness} against {raw}')
  fixed = cond.low_res_cond(low_res, rng, 0.0, 1.0)['low_res']
  np.testing.assert_allclose(fixed, guidance.gaussian_blur(low_res, jnp.ones(8), max_sigma=1.0),
                             atol=1e-6, err_msg='sampling must blur by the fixed sigma')
  np.testing.assert_array_equal(cond.low_res_cond(low_res, rng, 0.0)['low_res'], low_res,
                                err_msg='sampling without blur_sigma must not blur')


# Faults ------------------------------------------------------------------------------------

@pytest.mark.parametrize('lr', [1e39, float('nan')])
def test_step_whose_update_is_not_finite_is_skipped_and_counted(lr):
  # lr=1e39 is inf in float32: finite gradients, but every new parameter is inf or NaN.
  cfg = tiny_config(glide, 'base64', **{'optimizer.lr': lr})
  mesh = parallel.create_mesh(cfg.mesh)
  rules = parallel.logical_rules(cfg.mesh)
  from diffusion_jax import models
  model = models.build(cfg.model)
  train_step, tx = step_lib.make_train_step(cfg, model, None, mesh=mesh, rules=rules)
  state, _ = step_lib.init_state(cfg, model, tx, mesh, rules, jax.random.PRNGKey(0))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    new, metrics = jax.jit(train_step)(state, parallel.shard_batch(_batch(cfg), mesh), None)
  assert np.isfinite(float(metrics['loss'])) and np.isfinite(float(metrics['grad_norm']))
  _assert_identical(_as_dict(new.params), _as_dict(state.params), 'params after a bad update')
  _assert_identical(_as_dict(new.ema_params), _as_dict(state.ema_params), 'EMA after a bad update')
  _assert_identical(_as_dict(new.opt_state.inner_state), _as_dict(state.opt_state.inner_state),
                    'optimizer moments after a bad update')
  assert int(metrics['nonfinite_consecutive']) == 1 and int(metrics['nonfinite_total']) == 1


def test_a_diverged_run_saves_nothing_and_warns_each_skipped_step(tmp_path, caplog):
  cfg = tiny_config(glide, 'base64', total_steps=10, ckpt_steps=1, max_nonfinite_steps=3,
                    **{'optimizer.lr': 1e39})
  with caplog.at_level(logging.WARNING, logger=loop.__name__):
    with pytest.raises(loop.NonFiniteError, match='3 consecutive steps'):
      loop.train(cfg, str(tmp_path))
  assert _checkpoint_steps(tmp_path) == [], 'a state after skipped steps was checkpointed'
  skipped = [r.getMessage() for r in caplog.records if 'skipped: its loss' in r.getMessage()]
  assert [m.split()[1] for m in skipped] == ['1', '2', '3'], skipped


def test_second_trainer_on_a_held_workdir_is_refused_before_building(tmp_path, monkeypatch):
  monkeypatch.setattr(loop, 'build_trainer', lambda *a: pytest.fail('built a trainer'))
  with ckpt_lib.WorkdirLock(str(tmp_path)):
    with pytest.raises(ckpt_lib.WorkdirLockedError, match='another run'):
      loop.train(tiny_config(glide, 'base64'), str(tmp_path))


def test_workdir_that_is_a_file_is_refused(tmp_path):
  path = tmp_path / 'file'
  path.write_text('')
  with pytest.raises(errors.InputError, match='is a file'):
    loop.train(tiny_config(glide, 'base64'), str(path))


def test_corrupt_newest_checkpoint_is_moved_aside_and_the_run_goes_on(tmp_path, trained_workdir):
  import shutil
  workdir = str(tmp_path / 'copy')
  shutil.copytree(trained_workdir, workdir)
  files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(workdir, 'checkpoints', '6'))
           for f in fs if 'state' in d]
  largest = max(files, key=os.path.getsize)
  with open(largest, 'r+b') as f:  # 64 bytes flipped: decodes, but as other numbers
    f.seek(os.path.getsize(largest) // 2)
    chunk = f.read(64)
    f.seek(-len(chunk), 1)
    f.write(bytes(b ^ 0x5A for b in chunk))
  metrics = loop.train(tiny_config(glide, 'base64', sample_steps=6), workdir)
  assert metrics['step'] == 6, 'the run must retrain from step 3 and save step 6 again'
  assert [d.split('-')[0] for d in os.listdir(os.path.join(workdir, 'checkpoints_corrupt'))] == ['6']
  _, again, _ = _restore_raw(workdir, 6)
  _, straight, _ = _restore_raw(trained_workdir, 6)
  _assert_identical(again, straight, 'state retrained after moving the corrupt step aside')


@pytest.mark.parametrize('field,value,refused', [
    ('diffusion.parameterization', 'v', True), ('diffusion.schedule', 'linear', True),
    ('model.dropout', 0.3, True), ('seed', 7, False), ('optimizer.lr', 2e-3, False),
    ('model.remat_policy', 'full', False)])
def test_resume_with_a_changed_config(tmp_path, trained_workdir, caplog, field, value, refused):
  import shutil
  workdir = str(tmp_path / 'copy')
  shutil.copytree(trained_workdir, workdir)
  cfg = tiny_config(glide, 'base64', sample_steps=6, **{field: value})
  with caplog.at_level(logging.WARNING, logger=loop.__name__):
    if refused:
      with pytest.raises(loop.ConfigChangeError, match=f'{field}.*--allow_config_change'):
        loop.train(cfg, workdir)
      assert loop.train(cfg, workdir, allow_config_change=True)['step'] == 6
    else:
      assert loop.train(cfg, workdir)['step'] == 6
  assert any('changed config' in r.getMessage() and field in r.getMessage()
             for r in caplog.records), f'{field} changed without a word'


def test_ctrl_c_saves_the_current_step_and_reports_its_signal(tmp_path):
  cfg = tiny_config(glide, 'base64', total_steps=6, ckpt_steps=100)

  def press_ctrl_c(step, state, trainer, metrics):
    if step == 2:
      os.kill(os.getpid(), signal.SIGINT)

  metrics = loop.train(cfg, str(tmp_path), hooks=(press_ctrl_c,))
  assert (metrics['step'], metrics['signal']) == (2, signal.SIGINT)
  assert _checkpoint_steps(tmp_path) == [2], 'Ctrl-C must save the current step first'


@pytest.mark.parametrize('signum,status', [(signal.SIGTERM, 75), (signal.SIGINT, 130), (0, 0)])
def test_train_cli_exit_status_tells_preemption_from_done(monkeypatch, tmp_path, signum, status):
  from diffusion_jax import cli
  from diffusion_jax.train import __main__ as train_main
  result = {'step': 4, **({'signal': signum} if signum else {})}
  monkeypatch.setattr(loop, 'train', lambda *a, **k: result)
  got = cli.call(train_main, ['--config=configs/glide.py:stage=base64,size=tiny',
                              f'--workdir={tmp_path}'])
  assert got == status
