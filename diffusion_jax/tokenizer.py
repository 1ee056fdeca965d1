"""Tokenizers for the frozen text encoders, loaded from a local directory only.

`load_tokenizer(dir, max_length)` wraps transformers' `AutoTokenizer` (T5's SentencePiece,
CLIP's BPE, or any tokenizer.json) and returns fixed-length int32 ids and a bool mask, the
shape every encoder and data pipeline here expects. Imagen's configs use 128 T5 tokens; CLIP
has 77 positions. Longer prompts are truncated (keeping the end-of-text token) with a
warning that says how many tokens were dropped.

`build_word_tokenizer(words, out_dir, style)` writes a small word-level tokenizer that
transformers can load, for tests and for the Shapes demo, whose captions use a few dozen words.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Callable, Iterable, Sequence

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = {'t5': 128, 'clip': 77}

# Special tokens of the word-level tokenizers, in the conventions of the real ones: T5 has
# pad 0, eos 1, unk 2; CLIP pads with its end-of-text token, which has the largest id (the
# legacy CLIP pooling takes the argmax of the ids).
_T5_SPECIALS = ('<pad>', '</s>', '<unk>')
_CLIP_BOS, _CLIP_EOS, _CLIP_UNK = '<|startoftext|>', '<|endoftext|>', '<|unk|>'


class Tokenizer:
  """Callable: list of prompts -> (ids_BL int32, mask_BL bool), padded to `max_length`.

  `rewrite` (text -> text), if given, is applied to every prompt first: a stage's caption
  rewrite (`input.caption_rewrite`), so that training and sampling tokenize alike.
  """

  def __init__(self, hf_tokenizer, max_length: int,
               rewrite: Callable[[str], str] | None = None):
    if max_length < 2:
      raise ValueError(f'max_length must be >= 2, got {max_length}')
    if hf_tokenizer.pad_token_id is None:
      raise ValueError('tokenizer has no pad token; set one in its tokenizer_config.json')
    self.hf = hf_tokenizer
    self.max_length = int(max_length)
    self.rewrite = rewrite

  @property
  def pad_id(self) -> int:
    return int(self.hf.pad_token_id)

  @property
  def eos_id(self) -> int | None:
    return None if self.hf.eos_token_id is None else int(self.hf.eos_token_id)

  @property
  def vocab_size(self) -> int:
    return len(self.hf)

  def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(texts, str):
      raise TypeError('pass a list of prompts, not a single string')
    texts = list(texts) if self.rewrite is None else [self.rewrite(t) for t in texts]
    if not texts:
      return (np.zeros((0, self.max_length), np.int32), np.zeros((0, self.max_length), bool))
    full = self.hf(texts, truncation=False, padding=False, verbose=False)['input_ids']
    over = [(i, len(ids)) for i, ids in enumerate(full) if len(ids) > self.max_length]
    if over:
      worst = max(n for _, n in over)
      logger.warning(
          'tokenizer: %d of %d prompts are longer than %d tokens and were truncated; dropped '
          '%d tokens in all (at most %d from one prompt, e.g. prompt %d: %r)', len(over),
          len(texts), self.max_length, sum(n - self.max_length for _, n in over),
          worst - self.max_length, over[0][0], texts[over[0][0]][:80])
    enc = self.hf(texts, truncation=True, max_length=self.max_length, padding='max_length',
                  return_attention_mask=True, verbose=False)
    ids = np.asarray(enc['input_ids'], np.int32)
    mask = np.asarray(enc['attention_mask']).astype(bool)
    return ids, mask

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def load_tokenizer(path: str, max_length: int | None = None, *, kind: str | None = None,
                   rewrite: Callable[[str], str] | None = None) -> Tokenizer:
  """A `Tokenizer` from a local directory (tokenizer.json / spiece.model / vocab + merges).

  `max_length` defaults by `kind` ('t5': 128, 'clip': 77). Never downloads: the directory
  must exist and hold the tokenizer files. `rewrite`: see `Tokenizer`.
  """
  if not os.path.isdir(path):
    raise FileNotFoundError(f'tokenizer directory {path!r} does not exist (tokenizers are read '
                            'from a local directory only; copy or save one there first)')
  if max_length is None:
    if kind not in DEFAULT_MAX_LENGTH:
      raise ValueError('give max_length, or kind="t5" / kind="clip" for the papers\' lengths')
    max_length = DEFAULT_MAX_LENGTH[kind]
  from transformers import AutoTokenizer  # Heavy import, only when a tokenizer is needed.
  hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
  return Tokenizer(hf, max_length, rewrite)


def build_word_tokenizer(words: Iterable[str], out_dir: str, style: str = 't5',
                         max_length: int | None = None) -> str:
  """Writes a word-level tokenizer directory that `AutoTokenizer.from_pretrained` loads.

  Lower-cases, splits on whitespace and punctuation; unknown words map to the unk token.
  style 't5': ids pad 0, eos 1, unk 2, then the words; a prompt becomes "words </s>".
  style 'clip': unk 0, the words, then bos and eos (eos last, the largest id); a prompt
  becomes "<bos> words <eos>" and padding uses eos, as CLIP's tokenizer does.
  Returns `out_dir`.
  """
  from tokenizers import Tokenizer as RawTokenizer
  from tokenizers import models, normalizers, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast

  vocab_words = []
  for w in words:
    w = w.strip().lower()
    if w and w not in vocab_words:
      vocab_words.append(w)
  if style == 't5':
    tokens = list(_T5_SPECIALS) + vocab_words
    pad, eos, unk, bos = '<pad>', '</s>', '<unk>', None
  elif style == 'clip':
    tokens = [_CLIP_UNK] + vocab_words + [_CLIP_BOS, _CLIP_EOS]
    pad, eos, unk, bos = _CLIP_EOS, _CLIP_EOS, _CLIP_UNK, _CLIP_BOS
  else:
    raise ValueError(f"style must be 't5' or 'clip', got {style!r}")
  clash = [w for w in vocab_words if w in (pad, eos, unk, bos)]
  if clash:
    raise ValueError(f'words {clash} collide with special tokens')
  vocab = {tok: i for i, tok in enumerate(tokens)}
  raw = RawTokenizer(models.WordLevel(vocab, unk_token=unk))
  raw.normalizer = normalizers.Lowercase()
  raw.pre_tokenizer = pre_tokenizers.Whitespace()
  if style == 't5':
    raw.post_processor = processors.TemplateProcessing(
        single=f'$A {eos}', special_tokens=[(eos, vocab[eos])])
  else:
    raw.post_processor = processors.TemplateProcessing(
        single=f'{bos} $A {eos}', special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])])
  special = dict(pad_token=pad, eos_token=eos, unk_token=unk)
  if bos is not None:
    special['bos_token'] = bos
  model_max = max_length or DEFAULT_MAX_LENGTH[style]
  fast = PreTrainedTokenizerFast(tokenizer_object=raw, model_max_length=model_max, **special)
  os.makedirs(out_dir, exist_ok=True)
  fast.save_pretrained(out_dir)
  # A record of the style, for humans and for `encoders` to pick the matching model vocab.
  with open(os.path.join(out_dir, 'word_tokenizer.json'), 'w') as f:
    json.dump({'style': style, 'vocab_size': len(tokens)}, f)
  return out_dir
