"""A store of frozen text-encoder outputs, keyed by caption, that training reads instead of
running the encoder (`input.text_cache=DIR`; built once by `python -m
diffusion_jax.tools.cache_text`).

A directory holds, for the N distinct captions of a dataset, rows sorted by the caption's
digest (sha256 of its UTF-8 text, first 16 bytes):

  keys.npy     S16     [N]          the caption digests, sorted (lookup by binary search)
  ids.npy      int32   [N, L]       the stage tokenizer's ids (checked against every batch)
  mask.npy     bool    [N, L]
  tokens.npy   float32 [N, L, D]    the encoder's token states (memory-mapped when read)
  pooled.npy   float32 [N, Dp]      its pooled embedding
  crc.npy      uint32  [N]          crc32 of each row's tokens and pooled bytes
  null_*.npy   the encoding of the empty prompt (for networks whose dropped caption reads it)
  tokenizer/   the tokenizer the ids were made with (a stage trained on the cache keeps it)
  meta.json    written last: what the cache was made from (`identity`) and its shapes

A cache whose identity (encoder, weights, token length, caption rewrite, dataset) differs from
the run's is refused in one line; so is a missing or truncated file, a caption the cache lacks,
a row whose ids differ from the run's tokenizer's and a row whose checksum fails (checked the
first time this process reads it); each error says how to rebuild. Caption keys make the
cache independent of the order, the shuffling and the caption drawn per example.
"""
from __future__ import annotations

import hashlib
import json
import os
import zlib
from typing import Any, Mapping, Sequence

import numpy as np

from diffusion_jax import errors
from diffusion_jax.data import field

FORMAT_VERSION = 1
META_FILE = 'meta.json'
TOKENIZER_DIR = 'tokenizer'
ARRAYS = ('keys', 'ids', 'mask', 'tokens', 'pooled', 'crc')
NULL_ARRAYS = ('null_tokens', 'null_mask', 'null_pooled')
_SAMPLED_EXAMPLES = 32  # records whose captions fingerprint a dataset


class TextCacheError(errors.InputError):
  """A text cache that this run cannot use; the message says how to rebuild it."""


def rebuild_hint(cache_dir: str) -> str:
  return ('rebuild it with python -m diffusion_jax.tools.cache_text --config=<this stage\'s '
          f'config and flags> --out={cache_dir}')


def caption_key(caption: str) -> bytes:
  return hashlib.sha256(caption.encode('utf-8')).digest()[:16]


def usable_captions(record: Mapping[str, Any]) -> list[str]:
  """The captions of a raw record that the pipeline may draw (as `process_example`)."""
  return [c for c in record.get('captions') or [] if isinstance(c, str) and c.strip()]


def dataset_identity(input_cfg, source) -> dict[str, Any]:
  """What identifies a dataset's captions without reading them all: its name, its length and
  a digest of the captions of evenly spaced records."""
  n = len(source)
  picks = sorted(set(np.linspace(0, max(n - 1, 0), min(n, _SAMPLED_EXAMPLES)).astype(int)))
  digest = hashlib.sha256()
  for i in picks:
    try:
      captions = usable_captions(source[int(i)])
    except Exception:  # noqa: BLE001 - an unreadable record: the pipeline skips it too
      captions = None
    digest.update(json.dumps([int(i), captions]).encode() + b'\n')
  return {'dataset': field(input_cfg, 'dataset'), 'num_examples': n,
          'sampled_captions': digest.hexdigest()}


def _row_crc(tokens_LD: np.ndarray, pooled_D: np.ndarray) -> int:
  return zlib.crc32(np.ascontiguousarray(pooled_D).tobytes(),
                    zlib.crc32(np.ascontiguousarray(tokens_LD).tobytes()))


# Writing -------------------------------------------------------------------------------------

class Writer:
  """Writes a cache of `captions` (distinct) chunk by chunk: `write(rows, ids, mask, tokens,
  pooled)` for rows in `order()`, then `finish(meta)`. Nothing is usable before `finish`."""

  def __init__(self, out_dir: str, captions: Sequence[str], length: int, token_dim: int,
               pooled_dim: int):
    self.out_dir = out_dir
    os.makedirs(out_dir, exist_ok=True)
    meta = os.path.join(out_dir, META_FILE)
    if os.path.exists(meta):
      os.remove(meta)  # an old cache stops being one before any of its files changes
    keys = np.asarray([caption_key(c) for c in captions], dtype='S16')
    order = np.argsort(keys, kind='stable')
    self.keys = keys[order]
    if len(self.keys) > 1 and np.any(self.keys[1:] == self.keys[:-1]):
      raise ValueError('captions must be distinct')
    self.captions = [captions[i] for i in order]
    n = len(self.captions)
    path = lambda name: os.path.join(out_dir, f'{name}.npy')
    np.save(path('keys'), self.keys)
    open_ = lambda name, dtype, shape: np.lib.format.open_memmap(path(name), 'w+', dtype, shape)
    self.ids = open_('ids', np.int32, (n, length))
    self.mask = open_('mask', bool, (n, length))
    self.tokens = open_('tokens', np.float32, (n, length, token_dim))
    self.pooled = open_('pooled', np.float32, (n, pooled_dim))
    self.crc = open_('crc', np.uint32, (n,))

  def write(self, start: int, ids_BL, mask_BL, tokens_BLD, pooled_BD) -> None:
    """Rows [start, start + B) of the sorted captions (`self.captions`)."""
    end = start + len(ids_BL)
    self.ids[start:end], self.mask[start:end] = ids_BL, mask_BL
    self.tokens[start:end] = tokens_BLD
    self.pooled[start:end] = pooled_BD
    self.crc[start:end] = [_row_crc(t, p) for t, p in zip(
        np.asarray(tokens_BLD, np.float32), np.asarray(pooled_BD, np.float32))]

  def write_null(self, tokens_1LD, mask_1L, pooled_1D) -> None:
    for name, value, dtype in (('null_tokens', tokens_1LD, np.float32),
                               ('null_mask', mask_1L, bool), ('null_pooled', pooled_1D, np.float32)):
      np.save(os.path.join(self.out_dir, f'{name}.npy'), np.asarray(value, dtype))

  def finish(self, identity: Mapping[str, Any], **info) -> str:
    for arr in (self.ids, self.mask, self.tokens, self.pooled, self.crc):
      arr.flush()
    meta = {'format_version': FORMAT_VERSION, 'identity': dict(identity),
            'num_captions': len(self.captions), 'shapes': {
                k: list(getattr(self, k).shape) for k in ('ids', 'tokens', 'pooled')},
            'sample_captions': self.captions[:8], **info}
    path = os.path.join(self.out_dir, META_FILE)
    with open(f'{path}.tmp', 'w', encoding='utf-8') as f:
      json.dump(meta, f, indent=1, sort_keys=True)
    os.replace(f'{path}.tmp', path)
    return self.out_dir


# Reading -------------------------------------------------------------------------------------

class TextCache:
  """A built cache, memory-mapped: `lookup(captions, ids_BL)` -> the batch's text entries."""

  def __init__(self, cache_dir: str):
    self.dir = cache_dir
    hint = rebuild_hint(cache_dir)
    meta_path = os.path.join(cache_dir, META_FILE)
    if not os.path.isdir(cache_dir):
      raise TextCacheError(f'--config.input.text_cache={cache_dir}: no such directory; build '
                           f'it with python -m diffusion_jax.tools.cache_text --config=<this '
                           f'stage\'s config and flags> --out={cache_dir}')
    try:
      with open(meta_path, encoding='utf-8') as f:
        self.meta = json.load(f)
    except FileNotFoundError:
      raise TextCacheError(f'text cache {cache_dir}: has no {META_FILE} (not a text cache, or '
                           f'its build did not finish); {hint}') from None
    except (OSError, ValueError) as e:
      raise TextCacheError(f'text cache {cache_dir}: {META_FILE} is unreadable ({e}); '
                           f'{hint}') from None
    if self.meta.get('format_version') != FORMAT_VERSION:
      raise TextCacheError(f'text cache {cache_dir}: format version '
                           f'{self.meta.get("format_version")!r}, this library reads '
                           f'{FORMAT_VERSION}; {hint}')
    arrays = {}
    n = int(self.meta.get('num_captions', -1))
    for name in ARRAYS:
      path = os.path.join(cache_dir, f'{name}.npy')
      try:
        arrays[name] = np.load(path, mmap_mode='r', allow_pickle=False)
      except (OSError, ValueError) as e:
        raise TextCacheError(f'text cache {cache_dir}: {name}.npy is missing or corrupt '
                             f'({str(e).splitlines()[0] if str(e) else type(e).__name__}); '
                             f'{hint}') from None
      if arrays[name].shape[:1] != (n,):
        raise TextCacheError(f'text cache {cache_dir}: {name}.npy holds '
                             f'{arrays[name].shape[:1]} rows, {META_FILE} says {n}; {hint}')
    self.keys = np.asarray(arrays['keys'])
    self.ids, self.mask = arrays['ids'], arrays['mask']
    self.tokens, self.pooled, self.crc = arrays['tokens'], arrays['pooled'], arrays['crc']
    self._verified = np.zeros((n,), bool)
    self.null = None
    if all(os.path.exists(os.path.join(cache_dir, f'{k}.npy')) for k in NULL_ARRAYS):
      try:
        self.null = {k[len('null_'):]: np.load(os.path.join(cache_dir, f'{k}.npy'),
                                                allow_pickle=False) for k in NULL_ARRAYS}
      except (OSError, ValueError) as e:
        raise TextCacheError(f'text cache {cache_dir}: its empty-prompt encoding is corrupt '
                             f'({e}); {hint}') from None

  @property
  def identity(self) -> dict[str, Any]:
    return self.meta.get('identity', {})

  @property
  def tokenizer_dir(self) -> str | None:
    path = os.path.join(self.dir, TOKENIZER_DIR)
    return path if os.path.isfile(os.path.join(path, 'tokenizer_config.json')) else None

  def check(self, identity: Mapping[str, Any]) -> None:
    """One-line TextCacheError where an entry of the run's `identity` differs from the one the
    cache was built with."""
    for key in identity:
      cached, run = self.identity.get(key), identity.get(key)
      if json.loads(json.dumps(cached)) != json.loads(json.dumps(run)):
        raise TextCacheError(
            f'--config.input.text_cache={self.dir}: was built for another {key} ({_short(cached)}; '
            f'this run: {_short(run)}); {rebuild_hint(self.dir)}, or unset input.text_cache')

  def lookup(self, captions: Sequence[str], ids_BL: np.ndarray) -> dict[str, np.ndarray]:
    """{'text_tokens' [B, L, D], 'text_mask' [B, L], 'text_pooled' [B, Dp]} of `captions`,
    whose ids under the run's tokenizer are `ids_BL` (they must be the cached ones)."""
    keys = np.asarray([caption_key(c) for c in captions], dtype='S16')
    rows = np.minimum(np.searchsorted(self.keys, keys), max(len(self.keys) - 1, 0))
    found = (self.keys[rows] == keys) if len(self.keys) else np.zeros(len(keys), bool)
    if not np.all(found):
      missing = captions[int(np.argmin(found))]
      raise TextCacheError(f'text cache {self.dir}: has no entry for the caption {missing!r} '
                           f'(the dataset changed since it was built?); '
                           f'{rebuild_hint(self.dir)}')
    order = np.argsort(rows, kind='stable')  # sorted reads from the memory maps
    sorted_rows = rows[order]
    unsorted = np.empty_like(order)
    unsorted[order] = np.arange(len(order))
    take = lambda arr: np.asarray(arr[sorted_rows])[unsorted]
    cached_ids, mask = take(self.ids), take(self.mask)
    tokens, pooled = take(self.tokens), take(self.pooled)
    ids_BL = np.asarray(ids_BL)
    if cached_ids.shape != ids_BL.shape or not np.array_equal(cached_ids, ids_BL):
      bad = (0 if cached_ids.shape != ids_BL.shape else
             int(np.argmax(np.any(cached_ids != ids_BL, axis=-1))))
      raise TextCacheError(f'text cache {self.dir}: the caption {captions[bad]!r} was '
                           'tokenized differently when it was built (another tokenizer, '
                           f'input.text_max_len or input.caption_rewrite); '
                           f'{rebuild_hint(self.dir)}')
    for i, row in enumerate(rows):
      if not self._verified[row]:
        if _row_crc(tokens[i], pooled[i]) != int(self.crc[row]):
          raise TextCacheError(f'text cache {self.dir}: the entry of the caption '
                               f'{captions[i]!r} (row {int(row)}) is corrupt (checksum '
                               f'mismatch); {rebuild_hint(self.dir)}')
        self._verified[row] = True
    return {'text_tokens': tokens, 'text_mask': mask.astype(bool), 'text_pooled': pooled}


def _short(value) -> str:
  text = json.dumps(value, sort_keys=True)
  return text if len(text) <= 200 else text[:197] + '...'


def open_cache(cache_dir: str) -> TextCache:
  return TextCache(cache_dir)
