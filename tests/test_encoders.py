"""Frozen encoders behind one interface: shapes, pooling, batching, sharding, caching."""
from __future__ import annotations

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import hf_fixtures
from diffusion_jax import encoders, parallel
from diffusion_jax import tokenizer as tok_lib

WORDS = 'a red blue green circle square triangle to the left right of above below'.split()
PROMPTS = ['a red circle', 'a blue square to the left of a green triangle', 'a circle',
           'green', 'a red circle above a blue square', 'triangle']


@pytest.fixture(scope='module')
def tok_dirs():
  dirs = {s: tok_lib.build_word_tokenizer(WORDS, hf_fixtures.path(f'enc_tok_{s}'), style=s)
          for s in ('t5', 'clip')}
  # 61 words + unk, bos 62, eos 63: the ids of the tiny transformers CLIP fixture.
  words = WORDS + [f'w{i}' for i in range(61 - len(WORDS))]
  dirs['clip64'] = tok_lib.build_word_tokenizer(words, hf_fixtures.path('enc_tok_clip64'), 'clip')
  return dirs


@pytest.fixture(scope='module')
def t5_encoder(tok_dirs):
  cfg = encoders.encoder_config('t5', 'tiny', tokenizer_path=tok_dirs['t5'], max_length=16,
                                batch_size=8, seed=1)
  return encoders.build_encoder(cfg)


def test_t5_random_init_shapes_and_pooling(t5_encoder):
  tokens, mask, pooled = t5_encoder.encode_text(PROMPTS)
  assert tokens.shape == (6, 16, 32) and mask.shape == (6, 16) and pooled.shape == (6, 32)
  ids, want_mask = t5_encoder.tokenize(PROMPTS)
  np.testing.assert_array_equal(mask, want_mask)
  assert np.abs(tokens[~mask]).max() == 0, 'padded token states must be zeroed'
  manual = tokens.sum(1) / mask.sum(1, keepdims=True)
  np.testing.assert_allclose(pooled, manual, atol=1e-5, err_msg='T5 pooled is not the masked mean')
  # The same as running the module directly on the ids.
  ref = np.asarray(t5_encoder.module.apply({'params': t5_encoder.params}, ids, mask))
  np.testing.assert_allclose(tokens[mask], ref[mask], atol=1e-5)


def test_batching_does_not_change_results(t5_encoder):
  tokens, _, pooled = t5_encoder.encode_text(PROMPTS)
  for i, p in enumerate(PROMPTS[:3]):
    t1, _, p1 = t5_encoder.encode_text([p])
    np.testing.assert_allclose(t1[0], tokens[i], atol=1e-5, err_msg=f'prompt {i} depends on its batch')
    np.testing.assert_allclose(p1[0], pooled[i], atol=1e-5)


def test_sharded_params_give_the_same_output(t5_encoder, tok_dirs, num_devices):
  mesh = parallel.create_mesh(dict(data=2, fsdp=2, tensor=2))
  cfg = encoders.encoder_config('t5', 'tiny', tokenizer_path=tok_dirs['t5'], max_length=16,
                                batch_size=4, seed=1)
  sharded = encoders.build_encoder(cfg, mesh=mesh)
  q = sharded.params['layers']['attn']['q']['kernel']
  assert q.sharding.spec == P(None, 'fsdp', 'tensor', None), q.sharding.spec
  assert len(q.addressable_shards) == num_devices and q.addressable_shards[0].data.shape == (2, 16, 2, 8)
  a = t5_encoder.encode_text(PROMPTS)
  b = sharded.encode_text(PROMPTS)
  for x, y, name in zip(a, b, ('tokens', 'mask', 'pooled')):
    np.testing.assert_allclose(x, y, atol=1e-5, err_msg=f'sharding changed {name}')


def test_clip_encoder_matches_transformers(tok_dirs):
  import torch
  model, path = hf_fixtures.clip_model(63, 'quick_gelu')
  with pytest.raises(ValueError, match='eos_token_id=63'):  # a tokenizer that ends with id 16
    encoders.build_encoder(encoders.encoder_config('clip', path=path, tokenizer_path=tok_dirs['clip']))
  cfg = encoders.encoder_config('clip', path=path, tokenizer_path=tok_dirs['clip64'], batch_size=8)
  enc = encoders.build_encoder(cfg)
  assert enc.max_length == 16, 'CLIP max length must be capped by the text tower positions'
  rng = np.random.RandomState(0)
  images = rng.randint(0, 256, size=(3, 16, 16, 3)).astype(np.uint8)
  emb = enc.encode_image(images)
  mean, std = np.array(encoders.CLIP_MEAN), np.array(encoders.CLIP_STD)
  px = ((images / 255.0 - mean) / std).astype(np.float32).transpose(0, 3, 1, 2)
  with torch.no_grad():
    ref = model.get_image_features(pixel_values=torch.tensor(px)).pooler_output.numpy()
  assert np.abs(emb - ref).max() < 1e-4, f'CLIP image embedding differs by {np.abs(emb - ref).max()}'
  # float images in [-1, 1] are the same pixels.
  np.testing.assert_allclose(enc.encode_image(images / 127.5 - 1.0), emb, atol=1e-4)
  # Larger images are resized to the tower's input size.
  big = np.repeat(np.repeat(images, 2, axis=1), 2, axis=2)
  assert enc.encode_image(big).shape == (3, 20)
  tokens, mask, pooled = enc.encode_text(['red circle', 'a blue square'])
  ids, _ = enc.tokenize(['red circle', 'a blue square'])
  assert ids[0, 3] == 63 and ids[0, 0] == 62
  with torch.no_grad():
    ref_t = model.get_text_features(input_ids=torch.tensor(ids.astype(np.int64)),
                                    attention_mask=torch.tensor(mask.astype(np.int64))).pooler_output.numpy()
  assert np.abs(pooled - ref_t).max() < 1e-4
  assert tokens.shape == (2, 16, 32)


@pytest.mark.parametrize('preset_eos', [None, 40])
def test_random_init_clip_pools_at_the_end_token(tok_dirs, preset_eos):
  # None: the preset pools at the last unpadded token; an explicit id is replaced by the
  # tokenizer's (16 for this word tokenizer), else every prompt would pool the bos token.
  cfg = encoders.encoder_config('clip', 'tiny', tokenizer_path=tok_dirs['clip'], batch_size=8)
  if preset_eos is None:
    enc = encoders.build_encoder(cfg)
    assert enc.module.text['eos_token_id'] is None
  else:
    from unittest import mock
    from diffusion_jax.models import clip as clip_lib
    preset = {**clip_lib.PRESETS['tiny'], 'text': {**clip_lib.PRESETS['tiny']['text'], 'eos_token_id': 40}}
    with mock.patch.dict(clip_lib.PRESETS, {'tiny': preset}):
      enc = encoders.build_encoder(cfg)
    assert enc.module.text['eos_token_id'] == enc.tokenizer.eos_id == 16
  tokens, mask, pooled = enc.encode_text(PROMPTS)
  ids, _ = enc.tokenize(PROMPTS)
  feats = enc.module.apply({'params': enc.params}, ids, mask, method='text_features')
  eos_pos = mask.sum(1) - 1
  np.testing.assert_allclose(np.asarray(feats['pooled']),
                             np.asarray(feats['last_hidden_state'])[np.arange(6), eos_pos], atol=1e-6)
  assert np.abs(pooled[0] - pooled[1]).max() > 1e-3, 'different prompts gave the same CLIP embedding'
  images = np.random.RandomState(0).randint(0, 256, size=(2, 16, 16, 3)).astype(np.uint8)
  assert enc.encode_image(images).shape == (2, 32)


def test_caption_cache_round_trip(t5_encoder, tmp_path):
  out = t5_encoder.cache_captions(PROMPTS, str(tmp_path / 'cache'))
  cached = encoders.CachedTextEncoder(out)
  query = [PROMPTS[4], PROMPTS[0]]
  a, b = cached.encode_text(query), t5_encoder.encode_text(query)
  for x, y in zip(a, b):
    np.testing.assert_allclose(x, y, atol=1e-6)
  with pytest.raises(KeyError, match='purple'):
    cached.encode_text(['a purple circle'])
  with_fallback = encoders.CachedTextEncoder(out, fallback=t5_encoder)
  t, m, p = with_fallback.encode_text(['a purple circle', PROMPTS[1]])
  np.testing.assert_allclose(p[1], t5_encoder.encode_text([PROMPTS[1]])[2][0], atol=1e-6)
  np.testing.assert_allclose(p[0], t5_encoder.encode_text(['a purple circle'])[2][0], atol=1e-6)
  # Plain .npy files, readable without pickle.
  assert np.load(f'{out}/tokens.npy', allow_pickle=False).shape == (6, 16, 32)
