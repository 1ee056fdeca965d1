"""Cached text-encoder outputs (input.text_cache, tools/cache_text): training on the cache
matches training with the encoder, and a cache made for something else, or damaged, is refused
in one line that says how to rebuild it."""
import os
import shutil
import signal

import jax
import numpy as np
import pytest

from configs import imagen
from diffusion_jax import conditioning, errors, tokenizer as tokenizer_lib
from diffusion_jax.data import text_cache as store
from diffusion_jax.train import loop
from diffusion_jax.train import text_cache_build
from projects.shapes import shapes
from test_train import tiny_config as train_config

STEPS = 4


def tiny_config(tokenizer_dir, **overrides):
  """test_train's tiny Imagen base on 24 Shapes scenes, STEPS steps; dropped captions read
  the encoder's empty prompt (learned_null_text=False), half of them dropped."""
  return train_config(imagen, 'base64', **{
      'total_steps': STEPS, 'ckpt_steps': 2, 'log_steps': 1,
      'input.shapes_num_examples': 24, 'input.num_threads': 1,
      # Adam's epsilon large enough that float32 noise in near-zero gradients (zero-init
      # biases) stays noise in the parameters instead of becoming lr-sized steps.
      'optimizer.eps': 1e-3,
      'model.learned_null_text': False, 'diffusion.cond_drop_text': 0.5,
      'text_encoder.tokenizer_path': tokenizer_dir, **overrides})


@pytest.fixture(scope='module')
def tokenizer_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('tok') / 'tokenizer')
  tokenizer_lib.build_word_tokenizer(shapes.VOCABULARY, out, style='t5')
  return out


@pytest.fixture(scope='module')
def cache_dir(tokenizer_dir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('cache') / 'text')
  done = text_cache_build.build(tiny_config(tokenizer_dir), out)
  assert done['records'] == 24 and done['captions'] >= 2, done
  return out


def _params(workdir):
  stage = conditioning.restore_stage(workdir, use_ema=False)
  ema = conditioning.restore_stage(workdir, use_ema=True)
  return stage.step, jax.tree.map(np.asarray, stage.params), jax.tree.map(np.asarray, ema.params)


def _train_recording_losses(cfg, workdir):
  losses = []
  metrics = loop.train(cfg, workdir,
                       hooks=(lambda step, state, trainer, m: losses.append(float(m['loss'])),))
  return metrics, np.asarray(losses)


@pytest.fixture(scope='module')
def runs(tokenizer_dir, cache_dir, tmp_path_factory):
  """(uncached losses, its workdir, cached losses, its workdir): STEPS steps each; the
  cached run must not build the encoder."""
  plain_dir = str(tmp_path_factory.mktemp('plain'))
  cached_dir = str(tmp_path_factory.mktemp('cached'))
  _, plain = _train_recording_losses(tiny_config(tokenizer_dir), plain_dir)
  real_build = conditioning.build_encoder

  def no_encoder(*args, **kw):
    raise AssertionError('the trainer built the text encoder although input.text_cache is set')
  conditioning.build_encoder = no_encoder
  try:
    _, cached = _train_recording_losses(
        tiny_config(tokenizer_dir, **{'input.text_cache': cache_dir}), cached_dir)
  finally:
    conditioning.build_encoder = real_build
  return plain, plain_dir, cached, cached_dir


def test_cached_training_matches_the_encoder(runs):
  plain, plain_dir, cached, cached_dir = runs
  assert len(plain) == len(cached) == STEPS
  np.testing.assert_allclose(cached, plain, rtol=1e-5, atol=0, err_msg='losses per step')
  step_a, params_a, ema_a = _params(plain_dir)
  step_b, params_b, ema_b = _params(cached_dir)
  assert step_a == step_b == STEPS
  lr = tiny_config(None).optimizer.lr
  for what, a, b in (('params', params_a, params_b), ('ema', ema_a, ema_b)):
    diff = max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a),
                                                             jax.tree.leaves(b)))
    # Each step moves a parameter by up to ~lr; the runs agree to a thousandth of that.
    assert diff <= 1e-3 * lr, f'{what}: the cached run differs by {diff:.3g}'


def test_a_wrong_empty_prompt_encoding_trains_apart(runs, tokenizer_dir, cache_dir, tmp_path):
  # The comparison above can fail: a cache whose empty-prompt encoding is off (the same
  # compiled program) ends STEPS steps far outside its tolerance.
  _, plain_dir, _, _ = runs
  wrong = str(tmp_path / 'wrong_null')
  shutil.copytree(cache_dir, wrong)
  null = np.load(os.path.join(wrong, 'null_tokens.npy'))
  noise = np.random.default_rng(0).normal(size=null.shape).astype(np.float32)
  np.save(os.path.join(wrong, 'null_tokens.npy'), null + noise)
  loop.train(tiny_config(tokenizer_dir, **{'input.text_cache': wrong}), str(tmp_path / 'run'))
  _, params_a, _ = _params(plain_dir)
  _, params_b, _ = _params(str(tmp_path / 'run'))
  diff = max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(params_a),
                                                           jax.tree.leaves(params_b)))
  lr = tiny_config(None).optimizer.lr
  assert diff > 1e-2 * lr, f'a wrong null encoding changed the parameters by only {diff:.3g}'


def test_resume_on_the_cache_is_bit_exact(runs, tokenizer_dir, cache_dir, tmp_path):
  _, _, _, cached_dir = runs
  cfg = tiny_config(tokenizer_dir, **{'input.text_cache': cache_dir})

  def stop_after_two(step, state, trainer, metrics):
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)
  first = loop.train(cfg, str(tmp_path), hooks=(stop_after_two,))
  assert first['step'] == 2 and first.get('signal') == signal.SIGTERM
  resumed = loop.train(cfg, str(tmp_path))
  assert resumed['step'] == STEPS
  _, params_a, ema_a = _params(cached_dir)
  _, params_b, ema_b = _params(str(tmp_path))
  for a, b in ((params_a, params_b), (ema_a, ema_b)):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      assert np.array_equal(x, y), 'the resumed cached run differs from the straight one'


def _one_line_refusal(cfg, workdir, match):
  with pytest.raises(errors.InputError, match=match) as info:
    loop.train(cfg, str(workdir))
  message = str(info.value)
  assert '\n' not in message and 'cache_text' in message, message
  return message


@pytest.mark.parametrize('field,value,what', [
    ('text_encoder.seed', 1, 'text_encoder'),
    ('input.text_max_len', 12, 'text_max_len'),
    ('input.shapes_seed', 1, 'dataset'),
    ('input.shapes_num_examples', 25, 'dataset'),
])
def test_a_cache_for_other_settings_is_refused(tokenizer_dir, cache_dir, tmp_path, field, value,
                                               what):
  overrides = {'input.text_cache': cache_dir, field: value}
  if field == 'input.text_max_len':
    overrides['model.text_len'] = value
  _one_line_refusal(tiny_config(tokenizer_dir, **overrides), tmp_path,
                    f'was built for another {what}')


def test_a_missing_or_truncated_cache_is_refused(tokenizer_dir, cache_dir, tmp_path):
  damaged = str(tmp_path / 'damaged')
  shutil.copytree(cache_dir, damaged)
  cfg = tiny_config(tokenizer_dir, **{'input.text_cache': damaged})
  path = os.path.join(damaged, 'tokens.npy')
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)
  _one_line_refusal(cfg, tmp_path / 'a', 'tokens.npy is missing or corrupt')
  os.remove(os.path.join(damaged, store.META_FILE))
  _one_line_refusal(cfg, tmp_path / 'b', 'has no meta.json')
  cfg.input.text_cache = str(tmp_path / 'nowhere')
  _one_line_refusal(cfg, tmp_path / 'c', 'no such directory')


def test_a_corrupt_or_missing_entry_is_an_error_that_says_how_to_rebuild(cache_dir, tmp_path):
  damaged = str(tmp_path / 'damaged')
  shutil.copytree(cache_dir, damaged)
  cache = store.open_cache(cache_dir)
  caption = cache.meta['sample_captions'][0]
  row = int(np.searchsorted(cache.keys, store.caption_key(caption)))
  ids = np.asarray(cache.ids[row:row + 1])
  good = cache.lookup([caption], ids)
  np.testing.assert_array_equal(good['text_tokens'][0], cache.tokens[row])
  tokens = np.load(os.path.join(damaged, 'tokens.npy'), mmap_mode='r+')
  tokens[row, 0, 0] += 1.0
  tokens.flush()
  del tokens
  with pytest.raises(store.TextCacheError, match='corrupt.*cache_text') as info:
    store.open_cache(damaged).lookup([caption], ids)
  assert '\n' not in str(info.value)
  with pytest.raises(store.TextCacheError, match='no entry for the caption.*cache_text'):
    cache.lookup(['a caption the dataset never had'], ids)
  with pytest.raises(store.TextCacheError, match='tokenized differently.*cache_text'):
    cache.lookup([caption], ids + 1)


def test_text_cache_is_refused_where_the_network_reads_token_ids():
  from configs import glide
  from diffusion_jax import validation
  cfg = glide.get_config('stage=base64,size=tiny')
  cfg.input.text_cache = '/somewhere'
  with pytest.raises(errors.InputError, match='input.text_cache=.*no frozen text encoder'):
    validation.check_stage_config(cfg)
