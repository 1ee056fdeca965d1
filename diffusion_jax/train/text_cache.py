"""Cached text-encoder outputs for training (`input.text_cache=DIR`), opened for a run
(`train.text_cache_build` writes them once).

    open_for_run(config)       the store the config names, refused in one line when it was built
                               for another encoder, weights, token length or caption rewrite
                               (the dataset is checked where the input pipeline opens its
                               source)

A run with `input.text_cache` builds no encoder: its batches carry the cached token states and
pooled embedding, and the cached empty-prompt encoding stands in for the encoder's parameters
(`Conditioner.null_text_cond`), so classifier-free dropout reads what it reads uncached. With
`init_from`, both the tool and the trainer use the encoder and tokenizer of the source.
"""
from __future__ import annotations

import logging
from typing import Any

import jax
import numpy as np

from diffusion_jax import config_util, io_util, models
from diffusion_jax.data import text_cache as store

log = logging.getLogger(__name__)

# Encoder fields that say where things are or how fast they run, not what the encoder computes.
_NOT_IDENTITY = ('path', 'tokenizer_path', 'batch_size')


def run_identity(config) -> dict[str, Any]:
  """What the cached outputs depend on besides the dataset: the encoder (its config and, for a
  local directory, its weights' fingerprint), the token length and the caption rewrite."""
  te = dict(config_util.flatten(config_util.get(config, 'text_encoder', {})))
  encoder = {k: v for k, v in te.items() if k not in _NOT_IDENTITY}
  if te.get('path'):
    encoder.pop('preset', None)
    encoder.pop('seed', None)
    encoder['weights'] = io_util.folder_fingerprint(te['path'])
  return {'text_encoder': encoder, 'text_max_len': int(config.input.text_max_len),
          'caption_rewrite': config_util.get(config.input, 'caption_rewrite') or None}


def open_for_run(config) -> store.TextCache:
  """The cache `config.input.text_cache` names, checked against the run's encoder settings."""
  cache = store.open_cache(config.input.text_cache)
  cache.check(run_identity(config))
  wants_null = any(k.startswith('null_text_') for k in models.example_inputs(config.model, 1)[2])
  if wants_null and cache.null is None:
    raise store.TextCacheError(
        f'--config.input.text_cache={cache.dir}: holds no encoding of the empty prompt, which '
        "this network's dropped captions read (its encoder had no tokenizer when it was built); "
        'set text_encoder.tokenizer_path (or path) and '
        f'{store.rebuild_hint(cache.dir)}')
  return cache


def null_text_on_devices(cache: store.TextCache, mesh):
  """The cache's empty-prompt encoding, replicated: what the train step's `frozen` holds."""
  if cache.null is None:
    return None
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return {k: jax.device_put(np.asarray(v), replicated) for k, v in cache.null.items()}
