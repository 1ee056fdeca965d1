"""diffusers' `PriorTransformer` (Karlo's unCLIP prior) in and out, on our `Prior`.

    module, params, stats = load_prior('karlo/prior', num_timesteps=1000)
    x0_BD = module.apply({'params': params}, x_BD, t_B, cond)   # normalised embedding space
    image_embed_BD = x0_BD * stats['clip_std'] + stats['clip_mean']

The released prior denoises CLIP image embeddings in a normalised space, (x - clip_mean) /
clip_std, and diffusers de-normalises once, after the last step (`post_process_latents`).
That is a property of the sampled space, not of one network evaluation, so the two
statistics stay out of the network: `load_prior` returns them beside the parameters and the
pipeline applies them to the final sample.

Time: diffusers embeds the integer step k; our networks read t = (k + 1) / T, so the prior
is built with time_embed_scale T and time_embed_shift -1 (T from the scheduler config).
Text: `cond['text_tokens']` is the CLIP text encoder's last hidden state, `cond['text_embed']`
its projected pooled output, `cond['text_mask']` the tokenizer's attention mask; diffusers'
additive -10000 mask and our boolean one give the same prediction (every query keeps at
least itself and the four extra tokens unmasked).
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
import flax.linen as nn

from diffusion_jax import convert, errors
from diffusion_jax.diffusers_io import scheduler as dio_scheduler
from diffusion_jax.diffusers_io import unet as dio_unet
from diffusion_jax.models.prior import NUM_EXTRA_TOKENS, Prior

CONFIG_NAME = 'config.json'
WEIGHTS_NAME = 'diffusion_pytorch_model.safetensors'
STATS = ('clip_mean', 'clip_std')  # de-normalisation of the sampled embedding (pipeline side)
_SUPPORTED = {
    'time_embed_act_fn': ('silu',),
    'norm_in_type': (None, 'layer'),
    'embedding_proj_norm_type': (None, 'layer'),
    'encoder_hid_proj_type': ('linear',),
    'added_emb_type': ('prd',),
}
_DEFAULTS = dict(num_attention_heads=32, attention_head_dim=64, num_layers=20,
                 embedding_dim=768, num_embeddings=77, additional_embeddings=4, dropout=0.0,
                 time_embed_act_fn='silu', norm_in_type=None, embedding_proj_norm_type=None,
                 encoder_hid_proj_type='linear', added_emb_type='prd', time_embed_dim=None,
                 embedding_proj_dim=None, clip_embed_dim=None)


def _refuse(where: str, field: str, value, what_to_do: str):
  raise errors.InputError(f'{where}: {field}={value!r} is not supported; {what_to_do}')


def prior_kwargs(config: Mapping[str, Any], num_timesteps: int = 1000,
                 where: str = f'prior/{CONFIG_NAME}') -> dict[str, Any]:
  """`Prior` fields of a diffusers `PriorTransformer` config (num_timesteps: the scheduler's
  num_train_timesteps, which sets how the integer step is embedded)."""
  cls = config.get('_class_name', 'PriorTransformer')
  if cls != 'PriorTransformer':
    _refuse(where, '_class_name', cls, 'give the prior folder of an unCLIP (Karlo) pipeline')
  c = {**_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith('_')}}
  unknown = sorted(set(c) - set(_DEFAULTS))
  if unknown:
    _refuse(where, unknown[0], c[unknown[0]], 'this PriorTransformer field is not known here')
  for field, allowed in _SUPPORTED.items():
    if c[field] not in allowed:
      _refuse(where, field, c[field], f'use one of {", ".join(map(repr, allowed))}')
  for field in ('num_attention_heads', 'attention_head_dim', 'num_layers', 'embedding_dim',
                'num_embeddings'):
    if not (isinstance(c[field], int) and c[field] > 0):
      _refuse(where, field, c[field], 'give a positive integer')
  if c['additional_embeddings'] != NUM_EXTRA_TOKENS:
    _refuse(where, 'additional_embeddings', c['additional_embeddings'],
            f'the prior reads {NUM_EXTRA_TOKENS} extra tokens (text embedding, time, noised '
            'image embedding, query)')
  width = c['num_attention_heads'] * c['attention_head_dim']
  if c['time_embed_dim'] not in (None, width):
    _refuse(where, 'time_embed_dim', c['time_embed_dim'],
            f'the time MLP is as wide as the transformer (null or {width})')
  if not (isinstance(num_timesteps, int) and num_timesteps > 0):
    raise errors.InputError(f'num_timesteps={num_timesteps!r}: give the scheduler\'s '
                            'num_train_timesteps (a positive integer)')
  embed_dim = c['embedding_dim']
  out_dim = c['clip_embed_dim'] or embed_dim
  return dict(embed_dim=embed_dim, text_len=c['num_embeddings'], text_dim=embed_dim,
              text_embed_dim=c['embedding_proj_dim'] or embed_dim, width=width,
              num_layers=c['num_layers'], num_heads=c['num_attention_heads'], mlp_ratio=4,
              dropout=float(c['dropout']), exact_gelu=True,
              norm_in=c['norm_in_type'] == 'layer',
              text_embed_norm=c['embedding_proj_norm_type'] == 'layer',
              time_embed_scale=float(num_timesteps), time_embed_shift=-1.0,
              out_dim=0 if out_dim == embed_dim else out_dim, learned_null_text=False)


def config_of(kwargs: Mapping[str, Any]) -> dict[str, Any]:
  """The diffusers config of a `Prior` built by `prior_kwargs` (inverse of it)."""
  k = dict(kwargs)
  width, heads = k['width'], k['num_heads']
  if width % heads:
    raise ValueError(f'width {width} is not a multiple of num_heads {heads}')
  expressible = dict(mlp_ratio=4, exact_gelu=True, learned_null_text=False, time_embed_shift=-1.0)
  for field, value in expressible.items():
    if k.get(field, getattr(Prior, field)) != value:
      raise ValueError(f'export_prior: {field}={k.get(field, getattr(Prior, field))!r} has no '
                       f'diffusers equivalent (needs {value!r})')
  if k.get('text_dim', Prior.text_dim) != k['embed_dim']:
    raise ValueError('export_prior: text_dim must equal embed_dim in diffusers\' prior')
  out_dim = k.get('out_dim', 0) or k['embed_dim']
  return dict(_class_name='PriorTransformer', num_attention_heads=heads,
              attention_head_dim=width // heads, num_layers=k['num_layers'],
              embedding_dim=k['embed_dim'], num_embeddings=k['text_len'],
              additional_embeddings=NUM_EXTRA_TOKENS, dropout=k.get('dropout', 0.0),
              time_embed_act_fn='silu',
              norm_in_type='layer' if k.get('norm_in') else None,
              embedding_proj_norm_type='layer' if k.get('text_embed_norm') else None,
              encoder_hid_proj_type='linear', added_emb_type='prd', time_embed_dim=None,
              embedding_proj_dim=k.get('text_embed_dim', k['embed_dim']),
              clip_embed_dim=out_dim)


def _rules(kwargs: Mapping[str, Any]) -> list[convert.Rule]:
  R = convert.Rule
  blk = 'transformer_blocks.{i}'
  lay = ('transformer', 'layers')
  rules = [R(('positional_embedding',), ('positional_embedding',)),
           R(('query',), ('prd_embedding',))]
  dense = [('time_embed', 'Dense_0'), 'time_embedding.linear_1'], [
      ('time_embed', 'Dense_1'), 'time_embedding.linear_2'], [
      ('image_embed_proj',), 'proj_in'], [('text_embed_proj',), 'embedding_proj'], [
      ('text_tokens_proj',), 'encoder_hidden_states_proj'], [
      ('out_proj',), 'proj_to_clip_embeddings']
  norms = [[('final_ln',), 'norm_out']]
  if kwargs.get('norm_in'):
    norms.append([('norm_in',), 'norm_in'])
  if kwargs.get('text_embed_norm'):
    norms.append([('text_embed_norm',), 'embedding_proj_norm'])
  for ours, theirs in dense:
    rules += [R(ours + ('kernel',), (f'{theirs}.weight',), 'linear'),
              R(ours + ('bias',), (f'{theirs}.bias',))]
  for ours, theirs in norms:
    rules += [R(ours + ('scale',), (f'{theirs}.weight',)), R(ours + ('bias',), (f'{theirs}.bias',))]
  for ours, theirs in (('LayerNorm_0', 'norm1'), ('LayerNorm_1', 'norm3')):
    rules += [R(lay + (ours, 'scale'), (f'{blk}.{theirs}.weight',), stacked=True),
              R(lay + (ours, 'bias'), (f'{blk}.{theirs}.bias',), stacked=True)]
  for ours, theirs in (('query', 'to_q'), ('key', 'to_k'), ('value', 'to_v')):
    rules += [R(lay + (ours, 'kernel'), (f'{blk}.attn1.{theirs}.weight',), 'linear', stacked=True),
              R(lay + (ours, 'bias'), (f'{blk}.attn1.{theirs}.bias',), 'flat', stacked=True)]
  rules += [R(lay + ('out', 'kernel'), (f'{blk}.attn1.to_out.0.weight',), 'linear', n_in=2,
              stacked=True),
            R(lay + ('out', 'bias'), (f'{blk}.attn1.to_out.0.bias',), stacked=True)]
  for ours, theirs in (('Dense_0', 'ff.net.0.proj'), ('Dense_1', 'ff.net.2')):
    rules += [R(lay + (ours, 'kernel'), (f'{blk}.{theirs}.weight',), 'linear', stacked=True),
              R(lay + (ours, 'bias'), (f'{blk}.{theirs}.bias',), stacked=True)]
  return rules


def abstract_params(module: Prior):
  """Parameter shapes of `module` without allocating."""
  B = 1
  cond = dict(text_tokens=jnp.zeros((B, module.text_len, module.text_dim)),
              text_mask=jnp.ones((B, module.text_len), bool),
              text_embed=jnp.zeros((B, module.text_embed_dim)))
  init = lambda: module.init(jax.random.key(0), jnp.zeros((B, module.embed_dim)),
                             jnp.zeros((B,)), cond)
  return nn.meta.unbox(jax.eval_shape(init)['params'])


def _squeeze_leading(tensors: dict, key: str, ndim: int, what: str) -> None:
  """diffusers keeps positions as [1, S, W] and the query as [1, 1, W]: drop the unit axes."""
  if key not in tensors:
    return
  a = np.asarray(tensors[key])
  lead = a.ndim - ndim
  if lead < 0 or any(n != 1 for n in a.shape[:lead]):
    raise convert.WeightImportError(f'{what}: {key} has shape {tuple(a.shape)}; expected '
                                    f'{ndim} axes after leading unit axes')
  tensors[key] = a.reshape(a.shape[lead:])


def convert_prior(state_dict: Mapping[str, np.ndarray], kwargs: Mapping[str, Any], *,
                  what: str = 'prior weights') -> dict:
  """Our `Prior` params (every leaf filled) from a diffusers `PriorTransformer` state dict;
  every tensor but clip_mean/clip_std (see `clip_stats`) must be used, else a one-line error."""
  tensors = dict(state_dict)
  _squeeze_leading(tensors, 'positional_embedding', 2, what)
  _squeeze_leading(tensors, 'prd_embedding', 1, what)
  module = Prior(**kwargs)
  template = traverse_util.flatten_dict(abstract_params(module))
  return convert.assemble(tensors, _rules(kwargs), template, ignore=STATS, what=what)


def clip_stats(state_dict: Mapping[str, np.ndarray], out_dim: int,
               what: str = 'prior weights') -> dict[str, np.ndarray]:
  """{'clip_mean', 'clip_std'} as [D] float32: image_embed = x0 * clip_std + clip_mean."""
  out = {}
  for key in STATS:
    if key not in state_dict:
      raise convert.WeightImportError(f'{what}: missing keys: {key} (the prior\'s embedding '
                                      'statistics; is it a PriorTransformer checkpoint?)')
    a = np.asarray(state_dict[key], np.float32)
    if a.size != out_dim:
      raise convert.WeightImportError(f'{what}: {key} has shape {tuple(a.shape)}; expected '
                                      f'{out_dim} values')
    out[key] = a.reshape(out_dim)
  return out


def load_prior(folder: str, num_timesteps: int | None = None):
  """(Prior, params, clip_stats) from a diffusers `prior` folder (config.json + safetensors).

  num_timesteps: the schedule length the time embedding was trained with; None reads
  `num_train_timesteps` from ../prior_scheduler/scheduler_config.json when present, else 1000.
  """
  where = os.path.join(folder, CONFIG_NAME)
  config = convert.read_json_object(where)
  if num_timesteps is None:
    num_timesteps = dio_scheduler.sibling_num_timesteps(folder, 'prior_scheduler')
  kwargs = prior_kwargs(config, num_timesteps, where)
  tensors = dio_unet.read_model_folder(folder)  # float32, else the fp16 variant
  what = f'prior weights in {folder}'
  params = convert_prior(tensors, kwargs, what=what)
  stats = clip_stats(tensors, kwargs['out_dim'] or kwargs['embed_dim'], what)
  return Prior(**kwargs), params, stats


def export_prior(params: Mapping, kwargs: Mapping[str, Any], out_dir: str,
                 stats: Mapping[str, np.ndarray] | None = None) -> str:
  """Writes `out_dir` as a diffusers prior folder (config.json + safetensors) that
  `PriorTransformer.from_pretrained` reads; stats default to mean 0, std 1."""
  config = config_of(kwargs)
  tensors = convert.disassemble(params, _rules(kwargs), what='prior params')
  tensors['positional_embedding'] = tensors['positional_embedding'][None]
  tensors['prd_embedding'] = tensors['prd_embedding'][None, None]
  out_dim = config['clip_embed_dim']
  stats = dict(stats or {})
  for key, default in zip(STATS, (0.0, 1.0)):
    value = np.asarray(stats.get(key, np.full((out_dim,), default)), np.float32)
    tensors[key] = value.reshape(1, out_dim)
  tensors = {k: np.asarray(v, np.float32) for k, v in tensors.items()}
  os.makedirs(out_dir, exist_ok=True)
  convert.write_safetensors(tensors, os.path.join(out_dir, WEIGHTS_NAME))
  with open(os.path.join(out_dir, CONFIG_NAME), 'w') as f:
    json.dump(config, f, indent=2)
  return out_dir


# Karlo's released prior (kakaobrain/karlo-v1-alpha, prior/config.json): every other field
# takes PriorTransformer's default.
KARLO_CONFIG = dict(_class_name='PriorTransformer', attention_head_dim=64, embedding_dim=768,
                    num_attention_heads=32, num_embeddings=77, num_layers=20)
