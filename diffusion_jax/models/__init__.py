"""Networks, built from a config by name.

`build(model_cfg)` returns the flax module named by `model_cfg.name`; every other field of
`model_cfg` is a constructor argument (unknown fields are refused, so a typo cannot silently
fall back to a default). `example_inputs(model_cfg, batch_size)` returns zero arrays
`(x, t_B, cond)` of the shapes and dtypes the network reads, for `init` and `jax.eval_shape`.

New networks register with `register(name, cls, example_inputs_fn)`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

_REGISTRY: dict[str, tuple[Callable[..., nn.Module], Callable | None]] = {}

_DTYPE_FIELDS = ('dtype', 'param_dtype')


def register(name: str, cls: Callable[..., nn.Module], example_inputs_fn: Callable | None = None):
  """Makes `build` construct `cls` for `model_cfg.name == name`."""
  _REGISTRY[name] = (cls, example_inputs_fn)


def _as_dict(cfg) -> dict[str, Any]:
  return cfg.to_dict() if hasattr(cfg, 'to_dict') else dict(cfg)


def _freeze(v):
  return tuple(_freeze(x) for x in v) if isinstance(v, (list, tuple)) else v


def module_kwargs(cls, model_cfg) -> dict[str, Any]:
  """The constructor arguments of `cls` from a model config (without `name`)."""
  cfg = _as_dict(model_cfg)
  cfg.pop('name', None)
  known = {f.name for f in dataclasses.fields(cls)} - {'parent', 'name'}
  unknown = sorted(set(cfg) - known)
  if unknown:
    raise ValueError(f'{cls.__name__} has no field(s) {unknown}; known: {sorted(known)}')
  kwargs = {k: _freeze(v) for k, v in cfg.items()}
  for k in _DTYPE_FIELDS:
    if k in kwargs and isinstance(kwargs[k], str):
      kwargs[k] = jnp.dtype(kwargs[k])
  return kwargs


def build(model_cfg) -> nn.Module:
  name = model_cfg.name
  if name not in _REGISTRY:
    raise ValueError(f'unknown model name {name!r}; registered: {sorted(_REGISTRY)}')
  cls, _ = _REGISTRY[name]
  return cls(**module_kwargs(cls, model_cfg))


def example_inputs(model_cfg, batch_size: int):
  """Zero `(x, t_B, cond)` for `module.init` / `jax.eval_shape`."""
  name = model_cfg.name
  if name not in _REGISTRY:
    raise ValueError(f'unknown model name {name!r}; registered: {sorted(_REGISTRY)}')
  _, fn = _REGISTRY[name]
  if fn is None:
    raise ValueError(f'model {name!r} registered no example_inputs function')
  return fn(model_cfg, batch_size)


def _image_example_inputs(model_cfg, batch_size: int):
  c, B = model_cfg, batch_size
  get = lambda k, d=0: c.get(k, d) if hasattr(c, 'get') else getattr(c, k, d)
  size, ch = get('image_size', 64), get('in_channels', 3)
  x = jnp.zeros((B, size, size, ch), jnp.float32)
  t = jnp.zeros((B,), jnp.float32)
  cond: dict[str, Any] = {}
  text_source = get('text_source', 'none')
  if text_source == 'tokens':
    cond['text_tokens'] = jnp.zeros((B, get('text_len'), get('text_dim')), jnp.float32)
    cond['text_mask'] = jnp.ones((B, get('text_len')), bool)
  elif text_source == 'transformer':
    cond['text_ids'] = jnp.zeros((B, get('text_len')), jnp.int32)
    cond['text_mask'] = jnp.ones((B, get('text_len')), bool)
  if get('text_pool', 'none') == 'embed':
    cond['text_embed'] = jnp.zeros((B, get('text_embed_dim')), jnp.float32)
  if text_source != 'none' or get('text_pool', 'none') == 'embed':
    cond['drop_text'] = jnp.zeros((B,), bool)
  if not get('learned_null_text', True):  # a dropped caption reads the empty prompt's
    if text_source == 'tokens':
      cond['null_text_tokens'] = jnp.zeros((B, get('text_len'), get('text_dim')), jnp.float32)
      cond['null_text_mask'] = jnp.ones((B, get('text_len')), bool)
    if get('text_pool', 'none') == 'embed':
      cond['null_text_embed'] = jnp.zeros((B, get('text_embed_dim')), jnp.float32)
  if get('image_embed_dim', 0):
    cond['image_embed'] = jnp.zeros((B, get('image_embed_dim')), jnp.float32)
    cond['drop_image'] = jnp.zeros((B,), bool)
  if get('low_res_size', 0):
    low = size if get('low_res_upsampled', False) else get('low_res_size')  # IF stage II's
    cond['low_res'] = jnp.zeros((B, low, low, ch), jnp.float32)
  if get('aug_cond', False):
    cond['aug_t'] = jnp.zeros((B,), jnp.float32)
  if get('inpaint', False):
    cond['inpaint_image'] = jnp.zeros((B, size, size, ch), jnp.float32)
    cond['inpaint_mask'] = jnp.ones((B, size, size, 1), jnp.float32)
  return x, t, cond


def _prior_example_inputs(model_cfg, batch_size: int):
  c, B = model_cfg, batch_size
  x = jnp.zeros((B, c.embed_dim), jnp.float32)
  t = jnp.zeros((B,), jnp.float32)
  cond = {
      'text_tokens': jnp.zeros((B, c.text_len, c.text_dim), jnp.float32),
      'text_mask': jnp.ones((B, c.text_len), bool),
      'text_embed': jnp.zeros((B, c.text_embed_dim), jnp.float32),
      'drop_text': jnp.zeros((B,), bool),
  }
  if not (c.get('learned_null_text', True) if hasattr(c, 'get') else c.learned_null_text):
    # a dropped caption reads the empty prompt's encoding (diffusers' unconditional branch)
    cond['null_text_tokens'] = jnp.zeros((B, c.text_len, c.text_dim), jnp.float32)
    cond['null_text_mask'] = jnp.ones((B, c.text_len), bool)
    cond['null_text_embed'] = jnp.zeros((B, c.text_embed_dim), jnp.float32)
  return x, t, cond


def _register_builtins():
  from diffusion_jax.models import autoencoder, clip, dit
  from diffusion_jax.models.efficient_unet import EfficientUNet
  from diffusion_jax.models.prior import Prior
  from diffusion_jax.models.unet import UNet
  register('unet', UNet, _image_example_inputs)
  register('efficient_unet', EfficientUNet, _image_example_inputs)
  register('prior', Prior, _prior_example_inputs)
  register('dit', dit.DiT, dit.example_inputs)
  register('autoencoder', autoencoder.AutoencoderNet, autoencoder.example_inputs)
  register('noised_clip', clip.NoisedCLIP, clip.noised_clip_example_inputs)
  register('clip', clip.ContrastiveCLIP, clip.noised_clip_example_inputs)


_register_builtins()
