"""Tiny glide-text2im-shaped models without glide-text2im: the cases of the converter's parity
tests, their seeded state dicts and inputs, and a tiny GPT-2 BPE vocabulary.

`fixtures/make_glide_reference.py` ran glide-text2im's own code once on exactly these state
dicts and inputs (its key names and shapes are what it listed, stored in the fixture), and
stored its outputs in `fixtures/glide_reference.npz`.
"""
from __future__ import annotations

import collections
import json
import os

import numpy as np

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures')
REFERENCE = os.path.join(FIXTURES, 'glide_reference.npz')
TOKENIZER = os.path.join(FIXTURES, 'glide_tiny_tokenizer')

# Unusual tiny sizes that still cover every branch of the layout: glide-text2im's GroupNorm
# has 32 groups, so widths are multiples of 32.
_COMMON = dict(num_channels=32, num_res_blocks=1, num_heads=1, num_head_channels=16,
               attention_resolutions='8', dropout=0.0, text_ctx=7, xf_width=24, xf_layers=2,
               xf_heads=3, use_fp16=False)
CASES = {
    'base': dict(_COMMON, image_size=16, channel_mult='1,2'),
    'upsample': dict(_COMMON, image_size=32, channel_mult='1,1,2', xf_final_ln=False,
                     attention_resolutions='16,8', low_res_size=8),
    'base-inpaint': dict(_COMMON, image_size=16, channel_mult='1,2', xf_padding=False,
                         use_scale_shift_norm=False, num_head_channels=-1, num_heads=2),
    'upsample-inpaint': dict(_COMMON, image_size=32, channel_mult='1,2,2', num_res_blocks=2,
                             resblock_updown=False, low_res_size=16),
}
PROMPTS = ('a red circle to the left of a blue square', '')
TIMESTEPS = (3, 871)


def state_dict(keys_shapes, seed: int) -> dict[str, np.ndarray]:
  """Every tensor random (zero-initialised output layers included), at scales that keep a
  tiny network's activations of order one."""
  out = {}
  for i, (name, shape) in enumerate(keys_shapes):
    rng = np.random.default_rng([seed, i])
    shape = tuple(shape)
    last = name.rsplit('.', 1)[-1]
    if last == 'bias':
      a = 0.2 * rng.standard_normal(shape)
    elif len(shape) == 1:  # norm gains
      a = 1.0 + 0.2 * rng.standard_normal(shape)
    elif 'embedding' in name:
      a = 0.5 * rng.standard_normal(shape)
    else:
      a = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
    out[name] = a.astype(np.float32)
  return out


def inputs(kind: str, seed: int = 0) -> dict:
  """x_t [2, H, W, 3] NHWC, integer timesteps, prompts and the kind's other inputs."""
  opts = CASES[kind]
  size = opts['image_size']
  rng = np.random.default_rng(seed)
  out = {'x_t': rng.standard_normal((2, size, size, 3)).astype(np.float32),
         't': np.asarray(TIMESTEPS, np.int64), 'prompts': list(PROMPTS), 'cond': {}}
  if kind.startswith('upsample'):
    low = opts['low_res_size']
    out['cond']['low_res'] = np.tanh(rng.standard_normal((2, low, low, 3))).astype(np.float32)
  if kind.endswith('inpaint'):
    out['cond']['inpaint_image'] = np.tanh(
        rng.standard_normal((2, size, size, 3))).astype(np.float32)
    out['cond']['inpaint_mask'] = (rng.random((2, size, size, 1)) > 0.5).astype(np.float32)
  return out


# --- a tiny GPT-2 BPE vocabulary ------------------------------------------------------------------

def byte_symbols() -> dict[int, str]:
  """GPT-2's reversible map of the 256 bytes to printable characters."""
  printable = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1))
               + list(range(ord('®'), ord('ÿ') + 1)))
  table, extra = {}, 0
  for b in range(256):
    if b in printable:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def write_tiny_bpe(out_dir: str, num_merges: int = 40) -> None:
  """encoder.json + vocab.bpe: the 256 byte symbols, `num_merges` merges learned from the
  Shapes captions, and <|endoftext|> last (glide-text2im's end token is the last id)."""
  symbols = byte_symbols()
  corpus = ('a red circle to the left of a blue square . two green triangles above a '
            'yellow star ; three purple circles below the red square').split()
  words = collections.Counter(
      tuple(symbols[b] for b in (w if i == 0 else ' ' + w).encode()) for i, w in
      enumerate(corpus))
  vocab = [symbols[b] for b in range(256)]
  merges = []
  for _ in range(num_merges):
    pairs = collections.Counter()
    for word, n in words.items():
      for a, b in zip(word, word[1:]):
        pairs[(a, b)] += n
    if not pairs:
      break
    best = min(pairs, key=lambda p: (-pairs[p], p))
    merges.append(best)
    vocab.append(best[0] + best[1])
    merged = collections.Counter()
    for word, n in words.items():
      out, i = [], 0
      while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == best:
          out.append(word[i] + word[i + 1])
          i += 2
        else:
          out.append(word[i])
          i += 1
      merged[tuple(out)] += n
    words = merged
  vocab.append('<|endoftext|>')
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'encoder.json'), 'w', encoding='utf-8') as f:
    json.dump({tok: i for i, tok in enumerate(vocab)}, f, ensure_ascii=False)
  with open(os.path.join(out_dir, 'vocab.bpe'), 'w', encoding='utf-8') as f:
    f.write('#version: 0.2\n' + ''.join(f'{a} {b}\n' for a, b in merges))
