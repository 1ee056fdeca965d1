"""Tiny random transformers models saved as safetensors, shared by the encoder tests.

Each builder runs once per test session (cached) and writes into a temporary directory that
is removed at exit. Nothing is downloaded: models come from configs with random weights.
"""
from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile

import numpy as np

_ROOT = tempfile.mkdtemp(prefix='diffusion_jax_hf_')
atexit.register(shutil.rmtree, _ROOT, True)

# num_heads * d_kv != d_model on purpose (as in t5-v1_1-small).
T5_TINY = dict(vocab_size=64, d_model=32, d_kv=6, d_ff=64, num_layers=2, num_heads=4,
               relative_attention_num_buckets=8, relative_attention_max_distance=20)
CLIP_TEXT_TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=16, bos_token_id=62,
                      eos_token_id=63, pad_token_id=63)
CLIP_VISION_TINY = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                        num_attention_heads=2, image_size=16, patch_size=4)


def _torch():
  import torch
  torch.manual_seed(0)
  torch.set_num_threads(1)
  return torch


def randomise(model, seed: int, scale: float):
  """Every weight of a torch model random (those it zero-initialises too): norm weights near 1,
  a prior's clip_std positive, the rest N(0, scale^2). Returns the model."""
  import torch
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if name.endswith('clip_std'):
        p.copy_(0.5 + noise.abs())
      elif 'norm' in name and name.endswith('weight'):
        p.copy_(1.0 + 0.2 * noise)
      else:
        p.copy_(scale * noise)
  return model


def random_params(abstract, seed: int):
  """Our parameter tree of `abstract`'s shapes with every entry random: vectors (norms,
  biases) near 1, the rest N(0, 0.01)."""
  import jax  # noqa: PLC0415 - the torch fixtures above do not need it
  leaves, tree = jax.tree.flatten(abstract)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [
      0.1 * jax.random.normal(k, a.shape, a.dtype) + (1.0 if a.ndim == 1 else 0.0)
      for k, a in zip(keys, leaves)])


def path(*parts: str) -> str:
  return os.path.join(_ROOT, *parts)


@functools.lru_cache(maxsize=None)
def t5_model(ffn: str, seed: int = 0):
  """(torch T5EncoderModel in eval mode, saved dir) for ffn 'relu' (v1.0) / 'gated-gelu' (v1.1)."""
  torch = _torch()
  from transformers import T5Config, T5EncoderModel
  torch.manual_seed(seed)
  model = T5EncoderModel(T5Config(feed_forward_proj=ffn, **T5_TINY)).eval()
  out = path(f't5_{ffn}_{seed}')
  model.save_pretrained(out, safe_serialization=True)
  return model, out


@functools.lru_cache(maxsize=None)
def t5_sharded_dir(ffn: str = 'gated-gelu') -> str:
  model, _ = t5_model(ffn)
  out = path(f't5_{ffn}_sharded')
  model.save_pretrained(out, safe_serialization=True, max_shard_size='20KB')
  return out


@functools.lru_cache(maxsize=None)
def clip_model(eos_token_id: int = 63, act: str = 'quick_gelu'):
  """(torch CLIPModel in eval mode, saved dir). eos_token_id=2 selects the legacy argmax pooling."""
  torch = _torch()
  from transformers import CLIPConfig, CLIPModel
  text = dict(CLIP_TEXT_TINY, eos_token_id=eos_token_id, hidden_act=act)
  vision = dict(CLIP_VISION_TINY, hidden_act=act)
  model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=20)).eval()
  out = path(f'clip_{eos_token_id}_{act}')
  model.save_pretrained(out, safe_serialization=True)
  return model, out


def t5_batch(length: int = 40):
  """ids/mask with right padding of different lengths (one row unpadded), pad id 0."""
  rng = np.random.RandomState(0)
  ids = rng.randint(3, T5_TINY['vocab_size'], size=(3, length)).astype(np.int64)
  mask = np.ones_like(ids)
  mask[1, 25:] = 0
  mask[2, 6:] = 0
  ids[mask == 0] = 0
  return ids, mask


def clip_text_batch():
  """CLIP-style rows: bos 62, words < 62, eos 63, padded with eos; length 16."""
  rng = np.random.RandomState(1)
  ids = rng.randint(0, 62, size=(3, 16)).astype(np.int64)
  ids[:, 0] = 62
  mask = np.ones_like(ids)
  for row, n in enumerate((9, 15, 4)):  # n = position of eos
    ids[row, n] = 63
    ids[row, n + 1:] = 63
    mask[row, n + 1:] = 0
  return ids, mask
