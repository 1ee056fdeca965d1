"""Tokenizers from a locally written directory: ids, padding, truncation warning, round trip."""
from __future__ import annotations

import logging

import numpy as np
import pytest

import hf_fixtures
from diffusion_jax import tokenizer as tok_lib

WORDS = 'a red blue green circle square triangle to the left right of above below'.split()


@pytest.fixture(scope='module')
def t5_dir():
  return tok_lib.build_word_tokenizer(WORDS, hf_fixtures.path('tok_t5'), style='t5')


@pytest.fixture(scope='module')
def clip_dir():
  return tok_lib.build_word_tokenizer(WORDS, hf_fixtures.path('tok_clip'), style='clip')


def test_t5_style_ids_and_round_trip(t5_dir):
  tok = tok_lib.load_tokenizer(t5_dir, 8)
  ids, mask = tok(['A red circle', 'a blue square to the left'])
  assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == mask.shape == (2, 8)
  # pad 0, eos 1, unk 2, then the words in order (a=3, red=4, ..., circle=7).
  np.testing.assert_array_equal(ids[0], [3, 4, 7, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(mask[0], [1, 1, 1, 1, 0, 0, 0, 0])
  assert mask[1].sum() == 7 and ids[1, 6] == tok.eos_id == 1 and tok.pad_id == 0
  assert tok.decode(ids[1][mask[1]]) == 'a blue square to the left'
  unk, _ = tok(['a purple circle'])
  assert unk[0, 1] == 2, 'an unknown word must map to <unk>'


def test_clip_style_ids(clip_dir):
  tok = tok_lib.load_tokenizer(clip_dir, kind='clip')
  assert tok.max_length == 77
  ids, mask = tok(['red circle'])
  vocab = tok.vocab_size
  bos, eos = vocab - 2, vocab - 1
  assert tok.eos_id == eos == tok.pad_id, 'CLIP style pads with its end-of-text token'
  np.testing.assert_array_equal(ids[0, :4], [bos, 2, 5, eos])  # unk 0, then a=1, red=2, ...
  assert (ids[0, 4:] == eos).all() and mask[0].sum() == 4
  assert ids.max() == eos, 'eos must be the largest id (legacy argmax pooling)'


def test_truncation_warns_with_count(t5_dir, caplog):
  tok = tok_lib.load_tokenizer(t5_dir, 6)
  long = 'a red circle to the left of a blue square'  # 10 words + eos = 11 tokens
  with caplog.at_level(logging.WARNING, logger='diffusion_jax.tokenizer'):
    ids, mask = tok([long, 'a red circle'])
  assert 'dropped 5 tokens' in caplog.text, caplog.text
  assert '1 of 2 prompts' in caplog.text, caplog.text
  assert mask[0].all() and ids[0, -1] == tok.eos_id, 'truncation must keep the end token'
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger='diffusion_jax.tokenizer'):
    tok(['a red circle'])
  assert caplog.text == '', 'short prompts must not warn'


def test_defaults_and_local_only(tmp_path):
  with pytest.raises(FileNotFoundError, match='local directory'):
    tok_lib.load_tokenizer(str(tmp_path / 'nope'), 16)
  with pytest.raises(ValueError, match='max_length'):
    tok_lib.load_tokenizer(str(tmp_path), None)
  assert tok_lib.DEFAULT_MAX_LENGTH == {'t5': 128, 'clip': 77}


def test_rewrite_applies_to_every_prompt_before_tokenizing(t5_dir):
  from diffusion_jax.data import pipeline
  swap = {'a red circle': 'a blue square'}
  tok = tok_lib.load_tokenizer(t5_dir, 8, rewrite=lambda t: swap.get(t, t))
  plain = tok_lib.load_tokenizer(t5_dir, 8)
  np.testing.assert_array_equal(tok(['a red circle', 'a green circle'])[0],
                                plain(['a blue square', 'a green circle'])[0])
  assert pipeline.caption_rewrite({}) is None, 'no rewrite unless a config names one'
  with pytest.raises(ValueError, match="caption_rewrite='canonical' is not registered"):
    pipeline.caption_rewrite({'caption_rewrite': 'canonical'})
