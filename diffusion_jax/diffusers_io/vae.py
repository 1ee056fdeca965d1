"""diffusers' `AutoencoderKL` (the Stable Diffusion 1.x/2.x and SDXL VAEs) in and out, on our
`models.autoencoder.AutoencoderKL`.

    module, params = load_vae('stable-diffusion-v1-5/vae')
    mean_BhwC, logvar_BhwC = module.apply({'params': params}, x_BHWC, method='encode')

`vae_kwargs` maps a config.json onto our fields (refusing, one line each, what it cannot
express), `convert_vae` a state dict onto our parameter tree (every parameter filled, every
tensor used, or the missing and unused names are listed; the attention names of older
diffusers, `query`/`key`/`value`/`proj_attn`, are read too), `export_vae` / `save_vae` go
back. Our decoder numbers its levels by resolution (`up0` is full size); diffusers' `up_blocks`
run deepest first.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from diffusion_jax import convert, errors, io_util
from diffusion_jax.diffusers_io.unet import CONFIG_NAME, WEIGHTS_NAME, read_model_folder
from diffusion_jax.models.autoencoder import AutoencoderKL

CLASS_NAME = 'AutoencoderKL'
DOWN_TYPE = 'DownEncoderBlock2D'
UP_TYPE = 'UpDecoderBlock2D'
# diffusers' AutoencoderKL defaults, for the fields a config leaves out.
DEFAULTS = dict(in_channels=3, out_channels=3, down_block_types=(DOWN_TYPE,),
                up_block_types=(UP_TYPE,), block_out_channels=(64,), layers_per_block=1,
                act_fn='silu', latent_channels=4, norm_num_groups=32, sample_size=32,
                scaling_factor=0.18215, shift_factor=None, latents_mean=None, latents_std=None,
                force_upcast=True, use_quant_conv=True, use_post_quant_conv=True,
                mid_block_add_attention=True)
# Config fields that are our module's fields under the same name.
_SAME = ('in_channels', 'out_channels', 'layers_per_block', 'latent_channels', 'norm_num_groups',
         'sample_size', 'scaling_factor', 'shift_factor', 'latents_mean', 'latents_std',
         'force_upcast', 'use_quant_conv', 'use_post_quant_conv', 'mid_block_add_attention')
_BOOLS = ('force_upcast', 'use_quant_conv', 'use_post_quant_conv', 'mid_block_add_attention')


def _refuse(where: str, field: str, value, what_to_do: str):
  raise errors.InputError(f'{where}: {field} {value!r} is not supported; {what_to_do}')


def _positive_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def vae_kwargs(config: Mapping[str, Any], *, where: str = f'vae/{CONFIG_NAME}',
               **extra) -> dict[str, Any]:
  """Our `AutoencoderKL` fields for a diffusers `AutoencoderKL` config; `extra` overrides any
  field (dtype, param_dtype, cpu_kernels)."""
  if not isinstance(config, Mapping):
    raise errors.InputError(f'{where}: expected a JSON object (a diffusers AutoencoderKL '
                            f'config), got {type(config).__name__}')
  cls = config.get('_class_name', CLASS_NAME)
  if cls != CLASS_NAME:
    _refuse(where, '_class_name', cls, f'give the config of a diffusers {CLASS_NAME} (the vae '
            'folder of a Stable Diffusion pipeline)')
  c = {**DEFAULTS, **{k: v for k, v in config.items() if not k.startswith('_')}}
  unknown = sorted(set(c) - set(DEFAULTS))
  if unknown:
    _refuse(where, unknown[0], c[unknown[0]], f'this {CLASS_NAME} field is not known here; '
            'remove it or give a config saved by diffusers')
  if c['act_fn'] != 'silu':
    _refuse(where, 'act_fn', c['act_fn'], "use 'silu'")
  boc = c['block_out_channels']
  if (not isinstance(boc, (list, tuple)) or not boc or
      not all(_positive_int(ch) for ch in boc)):
    _refuse(where, 'block_out_channels', boc, 'give a list of positive integers, one per level')
  boc = tuple(boc)
  for field, want in (('down_block_types', DOWN_TYPE), ('up_block_types', UP_TYPE)):
    types = c[field]
    if not isinstance(types, (list, tuple)) or any(t != want for t in types):
      _refuse(where, field, types, f'use {want!r} at every level')
    if len(types) != len(boc):
      _refuse(where, field, list(types), f'give one block per entry of block_out_channels '
              f'({len(boc)})')
  for field in ('in_channels', 'out_channels', 'layers_per_block', 'latent_channels',
                'norm_num_groups'):
    if not _positive_int(c[field]):
      _refuse(where, field, c[field], 'give a positive integer')
  if any(ch % c['norm_num_groups'] for ch in boc):
    _refuse(where, 'norm_num_groups', c['norm_num_groups'],
            f'use a divisor of every block_out_channels entry {list(boc)}')
  if not _positive_int(c['sample_size']):
    _refuse(where, 'sample_size', c['sample_size'], 'give one side (an integer: square images)')
  if not _number(c['scaling_factor']) or c['scaling_factor'] <= 0:
    _refuse(where, 'scaling_factor', c['scaling_factor'], 'give a positive number')
  if c['shift_factor'] is not None and not _number(c['shift_factor']):
    _refuse(where, 'shift_factor', c['shift_factor'], 'give a number or null')
  for field in ('latents_mean', 'latents_std'):
    value = c[field]
    if value is not None and (not isinstance(value, (list, tuple)) or len(value) !=
                              c['latent_channels'] or not all(map(_number, value))):
      _refuse(where, field, value, f'give null or {c["latent_channels"]} numbers (one per '
              'latent channel)')
  for field in _BOOLS:
    if not isinstance(c[field], bool):
      _refuse(where, field, c[field], 'give true or false')
  kw = {field: c[field] for field in _SAME}
  kw['block_out_channels'] = boc
  kw['scaling_factor'] = float(c['scaling_factor'])
  if c['shift_factor'] is not None:
    kw['shift_factor'] = float(c['shift_factor'])
  for field in ('latents_mean', 'latents_std'):
    if c[field] is not None:
      kw[field] = tuple(float(v) for v in c[field])
  kw.update(extra)
  return kw


def diffusers_config(kw: Mapping[str, Any]) -> dict[str, Any]:
  """The diffusers `AutoencoderKL` config of our fields (the inverse of `vae_kwargs`)."""
  m = AutoencoderKL(**kw)
  boc = [int(ch) for ch in m.block_out_channels]
  config = {'_class_name': CLASS_NAME, 'down_block_types': [DOWN_TYPE] * len(boc),
            'up_block_types': [UP_TYPE] * len(boc), 'block_out_channels': boc,
            'act_fn': 'silu'}
  for field in _SAME:
    value = getattr(m, field)
    config[field] = list(value) if isinstance(value, tuple) else value
  return config


# ------------------------------------------------------------------------------------------
# parameter names

_RES = {'GroupNorm_0': 'norm1', 'Conv_0': 'conv1', 'GroupNorm_1': 'norm2', 'Conv_1': 'conv2',
        'Conv_2': 'conv_shortcut'}
# Our attention projections: (diffusers' name, older diffusers' name).
_ATTN = {'GroupNorm_0': ('group_norm', 'group_norm'), 'query': ('to_q', 'query'),
         'key': ('to_k', 'key'), 'value': ('to_v', 'value'), 'out': ('to_out.0', 'proj_attn')}
_TOP = {'conv_in': 'conv_in', 'conv_out': 'conv_out', 'norm_out': 'conv_norm_out'}


def _module_names(path: tuple[str, ...], levels: int) -> tuple[str, ...]:
  """The diffusers module names (the current one first) of one of our parameter paths
  (without the leaf)."""
  if path[0] in ('quant_conv', 'post_quant_conv'):
    return (path[0],)
  part, head, rest = path[0], path[1], path[2:]
  if head in _TOP:
    return (f'{part}.{_TOP[head]}',)
  if head.startswith('mid_'):
    if head == 'mid_attn':
      return tuple(f'{part}.mid_block.attentions.0.{n}' for n in _ATTN[rest[0]])
    inner = f'mid_block.resnets.{head[len("mid_res"):]}'
  else:
    side, block_part = head.split('_', 1)
    level = int(side[len('down'):] if side.startswith('down') else side[len('up'):])
    if side.startswith('down'):
      block = f'down_blocks.{level}'
    else:
      block = f'up_blocks.{levels - 1 - level}'
    if block_part in ('downsample', 'upsample'):
      return (f'{part}.{block}.{block_part}rs.0.conv',)
    inner = f'{block}.resnets.{block_part[len("res"):]}'
  return (f'{part}.{inner}.{_RES[rest[0]]}',)


def _rule(path: tuple[str, ...], shape: tuple[int, ...], levels: int) -> convert.Rule:
  names, leaf = _module_names(path[:-1], levels), path[-1]
  if leaf == 'kernel':
    if len(shape) == 4:
      return convert.Rule(path, tuple(f'{n}.weight' for n in names), 'conv')
    n_in = 2 if path[-2] == 'out' else 1
    return convert.Rule(path, tuple(f'{n}.weight' for n in names), 'linear', n_in=n_in)
  if leaf == 'scale':
    return convert.Rule(path, tuple(f'{n}.weight' for n in names), 'same')
  if leaf == 'bias':
    return convert.Rule(path, tuple(f'{n}.bias' for n in names),
                        'flat' if len(shape) > 1 else 'same')
  raise AssertionError(f'no diffusers name for parameter {"/".join(path)}')


def abstract_params(kw: Mapping[str, Any]) -> dict:
  """The parameter tree of `AutoencoderKL(**kw)` as shapes (nothing allocated)."""
  module = AutoencoderKL(**kw)
  side = module.downsample_factor
  x = jnp.zeros((1, side, side, module.in_channels), jnp.float32)
  return jax.eval_shape(lambda: nn.meta.unbox(module.init(jax.random.key(0), x)['params']))


def param_count(kw: Mapping[str, Any]) -> int:
  """Parameters of `AutoencoderKL(**kw)`, counted from shapes alone."""
  return int(sum(np.prod(a.shape) for a in jax.tree.leaves(abstract_params(kw))))


def vae_rules(kw: Mapping[str, Any]) -> tuple[list[convert.Rule], dict]:
  template = traverse_util.flatten_dict(abstract_params(kw))
  levels = len(AutoencoderKL(**kw).block_out_channels)
  return [_rule(p, tuple(a.shape), levels) for p, a in template.items()], template


def _attention_as_linear(tensors: dict) -> None:
  """Attention projections saved as 1x1 convs ([C, C, 1, 1], older conversions) as linears."""
  for key, value in tensors.items():
    if '.mid_block.attentions.' in key and key.endswith('.weight'):
      shape = tuple(np.shape(value))
      if len(shape) == 4 and shape[2:] == (1, 1):
        tensors[key] = np.asarray(value).reshape(shape[:2])


def convert_vae(state_dict: Mapping[str, np.ndarray], kw: Mapping[str, Any], *,
                what: str = 'diffusers AutoencoderKL') -> dict:
  """Our parameter tree (numpy) from a diffusers `AutoencoderKL` state dict; every parameter
  must be filled and every tensor used, else the error names the missing and unused ones."""
  rules, template = vae_rules(kw)
  tensors = dict(state_dict)
  _attention_as_linear(tensors)
  return convert.assemble(tensors, rules, template, what=what)


def export_vae(kw: Mapping[str, Any], params: Mapping) -> tuple[dict, dict[str, np.ndarray]]:
  """(diffusers config, float32 state dict) of our fields and parameters."""
  config = diffusers_config(kw)
  rules, _ = vae_rules(kw)
  state = convert.disassemble(params, rules, what='AutoencoderKL params')
  return config, {k: np.asarray(v, np.float32) for k, v in state.items()}


def load_vae(folder: str, **extra) -> tuple[AutoencoderKL, dict]:
  """(module, params) from a diffusers `AutoencoderKL` folder (config.json and
  diffusion_pytorch_model.safetensors, its fp16 variant or shards); `extra` as in
  `vae_kwargs`."""
  if not os.path.isdir(folder):
    raise errors.InputError(f'{folder}: no such directory; expected a diffusers AutoencoderKL '
                            f'folder ({CONFIG_NAME} and {WEIGHTS_NAME})')
  config_path = os.path.join(folder, CONFIG_NAME)
  config = convert.read_json_object(config_path)
  kw = vae_kwargs(config, where=config_path, **extra)
  params = convert_vae(read_model_folder(folder), kw, what=f'AutoencoderKL weights in {folder}')
  return AutoencoderKL(**kw), params


def save_vae(folder: str, kw: Mapping[str, Any], params: Mapping) -> str:
  """Writes our autoencoder as a diffusers `AutoencoderKL` folder that `from_pretrained`
  loads."""
  config, state = export_vae(kw, params)
  os.makedirs(folder, exist_ok=True)
  convert.write_safetensors(state, os.path.join(folder, WEIGHTS_NAME))
  io_util.write_json(os.path.join(folder, CONFIG_NAME), config)
  return folder


# The released Stable Diffusion 1.x/2.x VAE (its vae/config.json; SD 2.x at sample_size 768).
SD_CONFIG = dict(_class_name=CLASS_NAME, in_channels=3, out_channels=3,
                 down_block_types=[DOWN_TYPE] * 4, up_block_types=[UP_TYPE] * 4,
                 block_out_channels=[128, 256, 512, 512], layers_per_block=2, act_fn='silu',
                 latent_channels=4, norm_num_groups=32, sample_size=512,
                 scaling_factor=0.18215)
# SDXL's VAE: the same shapes at 1024 px and another latent scale.
SDXL_CONFIG = dict(SD_CONFIG, sample_size=1024, scaling_factor=0.13025)
