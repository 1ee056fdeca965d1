"""Building the text cache (`python -m diffusion_jax.tools.cache_text`): the stage's frozen
encoder run once over every caption its dataset may draw, written as a `data.text_cache`
store that a run reads with `input.text_cache=DIR` (`train.text_cache`)."""
from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any

import numpy as np

from diffusion_jax import conditioning, config_util, errors, parallel, validation
from diffusion_jax.data import pipeline as data_pipeline
from diffusion_jax.data import text_cache as store
from diffusion_jax.train import loop
from diffusion_jax.train.text_cache import run_identity

log = logging.getLogger(__name__)


def _resolve_init_from(config):
  """(config with the source's adopted fields, the source or None), as a fresh run sees it."""
  given = config_util.get(config, 'init_from')
  if not given:
    return config, None
  source = loop.read_init_source(given)
  adopted = loop.adopt_weight_fields(config, source.config, f'--config.init_from={given}')
  adopted.init_from = os.path.abspath(given)
  return adopted, source


def _distinct_captions(source) -> tuple[list[str], int]:
  """(every caption the pipeline may draw, once, in first-seen order; unreadable records)."""
  seen: dict[str, None] = {}
  unreadable = 0
  for i in range(len(source)):
    try:
      record = source[i]
    except Exception:  # noqa: BLE001 - the pipeline skips and counts such records too
      unreadable += 1
      continue
    for caption in store.usable_captions(record):
      seen.setdefault(caption, None)
  return list(seen), unreadable


def build(config, out_dir: str, *, chunk: int = 256) -> dict[str, Any]:
  """Writes the text cache of `config`'s stage and dataset into `out_dir` (replacing one
  there); returns a summary (captions, records, shapes, seconds)."""
  start = time.time()
  config = config.copy_and_resolve_references()
  config.input.text_cache = ''  # this builds it: nothing reads one
  validation.check_stage_config(config)
  config, init_source = _resolve_init_from(config)
  config.input.text_cache = out_dir
  try:  # a stage whose frozen encoder a text cache can replace
    validation.check_stage_config(config)
  except errors.InputError as e:
    why = str(e).split(': ', 1)[-1].replace('; unset input.text_cache', '')
    raise errors.InputError(f'--config (stage {config.stage}): nothing to cache: {why}') from None
  config.input.text_cache = ''
  validation.check_writable_dir(out_dir, '--out')
  os.makedirs(out_dir, exist_ok=True)
  for stale in (store.META_FILE, store.TOKENIZER_DIR):  # an old cache stops being one first
    path = os.path.join(out_dir, stale)
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)

  mesh = parallel.create_mesh(config.mesh)
  rules = parallel.logical_rules(config.mesh)
  encoder = conditioning.build_encoder(config, mesh, rules)
  if init_source is not None and init_source.tokenizer_dir:
    shutil.copytree(init_source.tokenizer_dir, os.path.join(out_dir, store.TOKENIZER_DIR))
  # The stage's tokenizer (kept in the cache, which a run on it keeps in turn).
  tokenizer = conditioning.build_tokenizer(config, encoder, out_dir, keep=True)
  source = data_pipeline.source_from_config(config.input)
  captions, unreadable = _distinct_captions(source)
  if not captions:
    raise errors.InputError(f'{source!r} has no captions to cache')
  length = int(config.input.text_max_len)
  writer = store.Writer(out_dir, captions, length, encoder.token_dim, encoder.embed_dim)
  log.info('caching %d captions of %s (%d records) with the %s encoder', len(captions), source,
           len(source), encoder.name)
  for s in range(0, len(writer.captions), chunk):
    batch = writer.captions[s:s + chunk]
    ids, mask = data_pipeline.tokenize(tokenizer, batch, length)
    tokens, _, pooled = encoder.encode_ids(ids, mask)
    writer.write(s, ids, mask, tokens, pooled)
  if encoder.tokenizer is not None:  # the empty prompt, as Conditioner.null_text_cond reads it
    ids, mask = encoder.tokenize([''])
    tokens, _, pooled = encoder.encode_ids(ids, mask)
    writer.write_null(tokens, np.asarray(mask, bool), pooled)
  identity = dict(run_identity(config),
                  dataset=store.dataset_identity(config.input, source))
  writer.finish(identity, encoder_name=encoder.name, unreadable_records=unreadable)
  return {'captions': len(captions), 'records': len(source), 'unreadable': unreadable,
          'tokens_shape': list(writer.tokens.shape), 'seconds': time.time() - start,
          'out': out_dir}
