"""Fine-tuning from pretrained weights (`--config.init_from`): a fresh run starts from a
pretrained stage directory's weights (EMA too), with the network, diffusion and text fields
of its config and its tokenizer; a resumed run never reads it; bad paths are one line."""
import logging
import os
import re
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file

import glide_fixtures
from configs import glide
from diffusion_jax import checkpoint as ckpt_lib
from diffusion_jax import cli, conditioning, convert_glide, models, pretrained
from diffusion_jax.train import __main__ as train_main
from diffusion_jax.train import loop
from test_train import REPO, _assert_identical, _restore_raw, tiny_config

# The pretrained stage differs from the run's tiny config in what its weights mean (width,
# schedule, vocabulary) and in one execution leaf (remat), which stays the run's.
PRETRAINED_CHANNELS = 32


def _write_pretrained(out_dir: str, seed: int) -> str:
  """A pretrained stage directory: a tiny GLIDE base at 32 channels with the tiny GPT-2 BPE
  tokenizer, every parameter random (output layers included)."""
  tok_dir = os.path.join(out_dir, pretrained.TOKENIZER_DIR)
  os.makedirs(out_dir, exist_ok=True)
  n_vocab = convert_glide.convert_tokenizer(glide_fixtures.TOKENIZER, tok_dir)
  cfg = glide.get_config('stage=base64,size=tiny')
  cfg.model.model_channels = PRETRAINED_CHANNELS
  cfg.model.remat_policy = 'full'
  cfg.model.vocab_size = cfg.text_encoder.vocab_size = n_vocab
  cfg.diffusion.schedule = 'linear'
  model = models.build(cfg.model)
  params = nn.meta.unbox(conditioning.init_params_fn(cfg, model)(jax.random.PRNGKey(seed)))
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda p: np.asarray(p) + 0.05 * rng.standard_normal(p.shape), params)
  pretrained.write_stage(out_dir, cfg, params)
  return out_dir


def _flat(tree) -> dict:
  return traverse_util.flatten_dict(jax.device_get(tree), sep='/')


@pytest.fixture(scope='module')
def source(tmp_path_factory):
  return _write_pretrained(str(tmp_path_factory.mktemp('release') / 'base'), seed=1)


def _run_config(init_from):
  return tiny_config(glide, 'base64', total_steps=3, ckpt_steps=2, init_from=init_from)


@pytest.fixture(scope='module')
def finetuned(source, tmp_path_factory):
  """3 steps from the pretrained weights, checkpoints at 2 and 3."""
  workdir = str(tmp_path_factory.mktemp('finetuned'))
  metrics = loop.train(_run_config(source), workdir)
  assert metrics['step'] == 3 and np.isfinite(metrics['loss'])
  return workdir


def test_fresh_state_is_the_pretrained_weights_and_training_moves_them(source, finetuned,
                                                                       tmp_path):
  src = loop.read_init_source(source)
  cfg = loop.adopt_weight_fields(_run_config(source), src.config, 'test')
  trainer = loop.build_trainer(cfg, str(tmp_path), src)
  state = loop.init_state(trainer, src)
  want = load_file(os.path.join(source, pretrained.WEIGHTS_FILE))
  assert int(state.step) == 0
  for name, tree in (('params', state.params), ('ema_params', state.ema_params)):
    got = _flat(tree)
    assert sorted(got) == sorted(want), f'{name}: other tensors than the pretrained ones'
    for key, value in got.items():
      assert np.array_equal(value, want[key]), f'{name}/{key} is not the pretrained tensor'
  moments = [x for x in jax.tree.leaves(state.opt_state)
             if np.issubdtype(np.asarray(x).dtype, np.floating)]
  assert moments and all(not np.any(np.asarray(m)) for m in moments), 'optimizer not fresh'
  # Three steps later the parameters and their EMA have left the pretrained values.
  _, trained, _ = _restore_raw(finetuned, 3)
  params = traverse_util.flatten_dict(trained['params'], sep='/')
  ema = traverse_util.flatten_dict(trained['ema_params'], sep='/')
  moved = [k for k in want if not np.array_equal(params[k], want[k])]
  assert len(moved) >= 0.9 * len(want), f'only {len(moved)} of {len(want)} tensors trained'
  assert any(not np.array_equal(ema[k], want[k]) for k in want), 'the EMA never moved'
  assert any(not np.array_equal(ema[k], params[k]) for k in want), 'the EMA is the params'


def test_the_weights_own_config_decides_the_network_and_is_saved(source, finetuned, caplog):
  run = _run_config(source)
  assert run.model.model_channels != PRETRAINED_CHANNELS
  pretrained_config = loop.read_init_source(source).config
  with caplog.at_level(logging.WARNING, logger=loop.__name__):
    cfg = loop.adopt_weight_fields(run, pretrained_config, 'here')
  warned = ' '.join(r.getMessage() for r in caplog.records)
  for line in (f'model.model_channels: 16 -> {PRETRAINED_CHANNELS}',
               "diffusion.schedule: 'squaredcos_cap_v2' -> 'linear'",
               f'model.vocab_size: 64 -> {pretrained_config.model.vocab_size}'):
    assert line in warned, f'{line!r} replaced without a word: {warned}'
  assert 'remat_policy' not in warned, 'an execution leaf was replaced'
  assert (cfg.model.remat_policy, cfg.input.batch_size, cfg.input.dataset) == (
      'none', run.input.batch_size, run.input.dataset), "the run's own fields were lost"
  # The checkpoint records the source and the adopted fields: sampling builds its network.
  stage = conditioning.restore_stage(finetuned)
  assert stage.config.init_from == os.path.abspath(source)
  assert stage.config.model.model_channels == PRETRAINED_CHANNELS
  assert stage.config.diffusion.schedule == 'linear'
  assert stage.config.model.remat_policy == 'none'
  want = load_file(os.path.join(source, pretrained.WEIGHTS_FILE))
  shapes = {k: v.shape for k, v in _flat(stage.params).items()}
  assert shapes == {k: v.shape for k, v in want.items()}


def test_resume_never_reads_init_from_and_is_bit_exact(source, finetuned, tmp_path, caplog):
  # Resumed from step 2 with init_from naming a directory that is gone: a run that read it
  # (to re-initialise or for its config) would fail; the resume must end where the
  # uninterrupted run did.
  workdir = str(tmp_path / 'run')
  shutil.copytree(finetuned, workdir)
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '3'))
  with caplog.at_level(logging.INFO, logger=loop.__name__):
    assert loop.train(_run_config(str(tmp_path / 'gone')), workdir)['step'] == 3
  assert any('restored checkpoint step 2' in r.getMessage() for r in caplog.records)
  _, resumed, _ = _restore_raw(workdir, 3)
  _, straight, _ = _restore_raw(finetuned, 3)
  _assert_identical(resumed, straight, 'resumed vs uninterrupted fine-tuning')
  # Without the flag the checkpoint's config still says what the weights mean.
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), read_only=True)
  assert checkpointer.saved_config(3)['init_from'] == os.path.abspath(source)
  cfg, fresh = loop.resolve_init_from(_run_config(None), checkpointer)
  assert fresh is None and cfg.init_from == os.path.abspath(source)
  assert cfg.model.model_channels == PRETRAINED_CHANNELS
  assert not conditioning.meaning_changes(conditioning.config_from_saved(
      checkpointer.saved_config(3)), cfg), 'a resume without the flag would be refused'


def test_the_stage_keeps_the_pretrained_tokenizer(source, finetuned):
  kept = os.path.join(finetuned, 'tokenizer')
  given = os.path.join(source, pretrained.TOKENIZER_DIR)
  assert sorted(os.listdir(kept)) == sorted(os.listdir(given))
  for name in os.listdir(given):
    with open(os.path.join(kept, name), 'rb') as a, open(os.path.join(given, name), 'rb') as b:
      assert a.read() == b.read(), f'tokenizer/{name} is not the pretrained one'


def test_a_trained_stage_directory_starts_a_run_from_its_ema(finetuned, tmp_path):
  src = loop.read_init_source(finetuned)
  assert src.tokenizer_dir == os.path.join(finetuned, 'tokenizer')
  cfg = loop.adopt_weight_fields(_run_config(finetuned), src.config, 'test')
  assert cfg.model.model_channels == PRETRAINED_CHANNELS
  state = loop.init_state(loop.build_trainer(cfg, str(tmp_path), src), src)
  _, trained, _ = _restore_raw(finetuned, 3)
  want = traverse_util.flatten_dict(trained['ema_params'], sep='/')
  for name, tree in (('params', state.params), ('ema_params', state.ema_params)):
    got = _flat(tree)
    assert sorted(got) == sorted(want)
    assert all(np.array_equal(got[k], want[k]) for k in want), f'{name} is not the EMA'


@pytest.fixture
def keep_jax_cache_dir():
  """The train CLI points jax's compilation cache at the workdir's root: put it back."""
  before = jax.config.jax_compilation_cache_dir
  yield
  jax.config.update('jax_compilation_cache_dir', before)


def _bad_inputs(tmp, source):
  no_weights = tmp / 'no_weights'
  no_weights.mkdir()
  shutil.copy(os.path.join(source, pretrained.CONFIG_FILE), no_weights)
  (no_weights / 'model.pt').write_bytes(b'\x80\x02}q\x00.')
  pt = tmp / 'base.pt'
  pt.write_bytes(b'\x80\x02}q\x00.')
  no_tokenizer = tmp / 'no_tokenizer'
  shutil.copytree(source, no_tokenizer, ignore=shutil.ignore_patterns(pretrained.TOKENIZER_DIR))
  return {'missing': (tmp / 'nope', 'no such directory'),
          'no_weights': (no_weights, 'has no model.safetensors.*model.pt is a pickle.*'
                         'convert_glide'),
          'pt_file': (pt, 'is a file.*convert_glide --checkpoint=.*base.pt'),
          'no_tokenizer': (no_tokenizer, 'has no tokenizer/ but its network reads token ids'),
          'release_root': (os.path.dirname(source), 'holds the pretrained stages base; name '
                           'one, e.g. --config.init_from=.*base$')}


@pytest.mark.parametrize('case', ['missing', 'no_weights', 'pt_file', 'no_tokenizer',
                                  'release_root'])
def test_bad_init_from_is_one_line_and_status_2(source, tmp_path, capsys, keep_jax_cache_dir,
                                                case):
  path, needle = _bad_inputs(tmp_path, source)[case]
  with pytest.raises(SystemExit) as e:
    cli.call(train_main, [f'--config={REPO}/configs/glide.py:stage=base64,size=tiny',
                          f'--workdir={tmp_path / "w"}', f'--config.init_from={path}'])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err and err[-1].startswith(f'error: --config.init_from={path}: '), err[-3:]
  assert re.search(needle, err[-1]), err[-1]
  assert not os.path.isdir(tmp_path / 'w' / 'tokenizer'), 'built before refusing'
