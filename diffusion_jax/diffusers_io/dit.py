"""diffusers' `DiTTransformer2DModel` (class-conditional DiT) and `PixArtTransformer2DModel`
(PixArt-alpha, text by cross-attention) in and out, on our `DiT`.

    module, params = load_dit('dit/transformer', num_timesteps=1000)
    out_BHWC = module.apply({'params': params}, x_BHWC, t_B, cond)

Time: diffusers embeds the integer step k; our networks read t = (k + 1) / T, so the network
is built with time_embed_scale T and time_embed_shift -1. diffusers' DiT divides its
sinusoid's frequencies by half - 1 (time_freq_shift 1); PixArt by half.

diffusers' DiT keeps a copy of the time and class embedders in every block (the final layer
reads block 0's), so a loaded DiT has `block_condition_embed` (stacked embedders) unless
`share_condition_embed=True` asks for the original DiT's one shared embedder, which needs the
copies to be equal (as in checkpoints converted from the original DiT).

Text (PixArt): cond['text_tokens'] are the T5 encoder's outputs, cond['text_mask'] the
tokenizer's attention mask; a dropped caption reads cond['null_text_tokens'/'null_text_mask']
(the empty prompt's, as diffusers' pipeline guides). PixArt's resolution and aspect-ratio
conditions (`use_additional_conditions`, the 1024 px models) are not supported.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from diffusion_jax import convert, errors, io_util
from diffusion_jax.diffusers_io import scheduler as dio_scheduler
from diffusion_jax.models.dit import DiT, example_inputs

CONFIG_NAME = 'config.json'
WEIGHTS_NAME = 'diffusion_pytorch_model.safetensors'
CLASSES = ('DiTTransformer2DModel', 'PixArtTransformer2DModel')
_COMMON = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=None,
               num_layers=28, dropout=0.0, norm_num_groups=32, attention_bias=True,
               sample_size=32, patch_size=2, activation_fn='gelu-approximate',
               num_embeds_ada_norm=1000, upcast_attention=False, norm_elementwise_affine=False)
_DEFAULTS = {
    'DiTTransformer2DModel': dict(_COMMON, norm_type='ada_norm_zero', norm_eps=1e-5),
    'PixArtTransformer2DModel': dict(
        _COMMON, out_channels=8, cross_attention_dim=1152, sample_size=128,
        norm_type='ada_norm_single', norm_eps=1e-6, interpolation_scale=None,
        use_additional_conditions=None, caption_channels=None, attention_type='default'),
}
_GELU = {'gelu-approximate': False, 'gelu': True}
# Older releases (e.g. DiT-XL-2-256) name the class Transformer2DModel; diffusers picks the
# class by norm_type. Its fields the newer classes lack must hold their inert values.
LEGACY_CLASS = 'Transformer2DModel'
_LEGACY_NORMS = {'ada_norm_zero': CLASSES[0], 'ada_norm_single': CLASSES[1]}
_LEGACY_INERT = dict(num_vector_embeds=None, use_linear_projection=False,
                     only_cross_attention=False, double_self_attention=False)
_LEGACY_DIT_INERT = dict(cross_attention_dim=None, caption_channels=None,
                         interpolation_scale=None, use_additional_conditions=None,
                         attention_type='default')


def _from_legacy(config: Mapping[str, Any], where: str) -> dict[str, Any]:
  norm = config.get('norm_type', 'layer_norm')
  if norm not in _LEGACY_NORMS:
    _refuse(where, 'norm_type', norm, f'a {LEGACY_CLASS} is read as DiT (ada_norm_zero) or '
            'PixArt (ada_norm_single) only')
  cls = _LEGACY_NORMS[norm]
  inert = dict(_LEGACY_INERT, **(_LEGACY_DIT_INERT if cls == CLASSES[0] else {}))
  out = {}
  for k, v in config.items():
    if k in inert:
      if v != inert[k]:
        _refuse(where, k, v, f'a {LEGACY_CLASS} read as {cls} needs {inert[k]!r}')
    else:
      out[k] = v
  out['_class_name'] = cls
  return out


def _refuse(where: str, field: str, value, what_to_do: str):
  raise errors.InputError(f'{where}: {field}={value!r} is not supported; {what_to_do}')


def dit_kwargs(config: Mapping[str, Any], *, where: str = f'transformer/{CONFIG_NAME}',
               num_timesteps: int = 1000, text_len: int = 120,
               share_condition_embed: bool = False) -> dict[str, Any]:
  """`DiT` fields of a diffusers DiT / PixArt transformer config. num_timesteps: the
  scheduler's num_train_timesteps; text_len: caption tokens (PixArt's T5 reads 120)."""
  cls = config.get('_class_name', 'DiTTransformer2DModel')
  if cls == LEGACY_CLASS:
    config = _from_legacy(config, where)
    cls = config['_class_name']
  if cls not in CLASSES:
    _refuse(where, '_class_name', cls, f'give a folder of one of {", ".join(CLASSES)}')
  defaults = _DEFAULTS[cls]
  c = {**defaults, **{k: v for k, v in config.items() if not k.startswith('_')}}
  unknown = sorted(set(c) - set(defaults))
  if unknown:
    _refuse(where, unknown[0], c[unknown[0]], f'this {cls} field is not known here')
  for field in ('num_attention_heads', 'attention_head_dim', 'in_channels', 'num_layers',
                'sample_size', 'patch_size'):
    if not (isinstance(c[field], int) and c[field] > 0):
      _refuse(where, field, c[field], 'give a positive integer')
  fixed = dict(dropout=0.0, attention_bias=True, norm_elementwise_affine=False)
  for field, value in fixed.items():
    if c[field] != value:
      _refuse(where, field, c[field], f'only {value!r} is')
  if c['activation_fn'] not in _GELU:
    _refuse(where, 'activation_fn', c['activation_fn'], f'use one of {sorted(_GELU)}')
  if not (isinstance(num_timesteps, int) and num_timesteps > 0):
    raise errors.InputError(f"num_timesteps={num_timesteps!r}: give the scheduler's "
                            'num_train_timesteps (a positive integer)')
  heads, hidden = c['num_attention_heads'], c['num_attention_heads'] * c['attention_head_dim']
  if hidden % 4:
    _refuse(where, 'attention_head_dim', c['attention_head_dim'],
            'heads * head dim must be a multiple of 4 (2-D sin-cos positions)')
  in_ch = c['in_channels']
  out_ch = in_ch if c['out_channels'] is None else c['out_channels']
  learned_variance = out_ch == 2 * in_ch
  kw = dict(image_size=c['sample_size'], in_channels=in_ch,
            out_channels=in_ch if learned_variance else out_ch,
            learned_variance=learned_variance, patch_size=c['patch_size'], hidden_size=hidden,
            depth=c['num_layers'], num_heads=heads, mlp_ratio=4.0,
            time_embed_scale=float(num_timesteps), time_embed_shift=-1.0,
            exact_gelu=_GELU[c['activation_fn']])
  if cls == 'DiTTransformer2DModel':
    if c['norm_type'] != 'ada_norm_zero':
      _refuse(where, 'norm_type', c['norm_type'], "use 'ada_norm_zero'")
    if not (isinstance(c['num_embeds_ada_norm'], int) and c['num_embeds_ada_norm'] > 0):
      _refuse(where, 'num_embeds_ada_norm', c['num_embeds_ada_norm'],
              'give the number of classes (a positive integer)')
    return dict(kw, adaln='zero', num_classes=c['num_embeds_ada_norm'], time_freq_shift=1.0,
                block_condition_embed=not share_condition_embed, norm_eps=1e-6,
                mlp_norm_eps=float(c['norm_eps']))
  if c['norm_type'] != 'ada_norm_single':
    _refuse(where, 'norm_type', c['norm_type'], "use 'ada_norm_single'")
  if c['attention_type'] != 'default':
    _refuse(where, 'attention_type', c['attention_type'], "use 'default'")
  use_extra = c['use_additional_conditions']
  if use_extra is None:
    use_extra = c['sample_size'] == 128
  if use_extra:
    _refuse(where, 'use_additional_conditions', c['use_additional_conditions'],
            'resolution / aspect-ratio conditions (PixArt 1024 px) are not implemented; '
            'set it false')
  if c['caption_channels'] is None:
    _refuse(where, 'caption_channels', None, 'give the text encoder width (T5: 4096)')
  if c['cross_attention_dim'] != hidden:
    _refuse(where, 'cross_attention_dim', c['cross_attention_dim'],
            f'the projected caption is {hidden} wide (heads * head dim)')
  interp = c['interpolation_scale']
  interp = max(c['sample_size'] // 64, 1) if interp is None else interp
  return dict(kw, adaln='single', text_source='tokens', text_len=text_len,
              text_dim=c['caption_channels'], learned_null_text=False, time_freq_shift=0.0,
              interpolation_scale=float(interp), norm_eps=float(c['norm_eps']), mlp_norm_eps=0.0)


def config_of(kw: Mapping[str, Any]) -> dict[str, Any]:
  """The diffusers config of a `DiT` (inverse of `dit_kwargs`); ValueError names a field
  diffusers cannot express."""
  get = lambda f: kw.get(f, getattr(DiT, f))
  hidden, heads = get('hidden_size'), get('num_heads')
  need = dict(mlp_ratio=4.0, time_embed_shift=-1.0)
  if get('adaln') == 'zero':
    need.update(time_freq_shift=1.0, norm_eps=1e-6, text_source='none', interpolation_scale=1.0)
    if not get('num_classes'):
      raise ValueError('export_dit: a DiT with adaln=zero needs num_classes > 0')
  else:
    need.update(time_freq_shift=0.0, text_source='tokens', learned_null_text=False)
    if get('mlp_norm_eps') not in (0.0, get('norm_eps')):
      raise ValueError('export_dit: PixArt has one norm_eps; mlp_norm_eps must be 0 or equal it')
  for field, value in need.items():
    if get(field) != value:
      raise ValueError(f'export_dit: {field}={get(field)!r} has no diffusers equivalent '
                       f'(needs {value!r})')
  in_ch, out_ch = get('in_channels'), get('out_channels') * (2 if get('learned_variance') else 1)
  cfg = dict(num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=in_ch,
             out_channels=out_ch, num_layers=get('depth'), dropout=0.0, norm_num_groups=32,
             attention_bias=True, sample_size=get('image_size'), patch_size=get('patch_size'),
             activation_fn='gelu' if get('exact_gelu') else 'gelu-approximate',
             upcast_attention=False, norm_elementwise_affine=False)
  if get('adaln') == 'zero':
    return dict(cfg, _class_name='DiTTransformer2DModel', norm_type='ada_norm_zero',
                num_embeds_ada_norm=get('num_classes'),
                norm_eps=get('mlp_norm_eps') or get('norm_eps'))
  return dict(cfg, _class_name='PixArtTransformer2DModel', norm_type='ada_norm_single',
              num_embeds_ada_norm=1000, norm_eps=get('norm_eps'), cross_attention_dim=hidden,
              interpolation_scale=get('interpolation_scale'), use_additional_conditions=False,
              caption_channels=get('text_dim'), attention_type='default')


def abstract_params(kw: Mapping[str, Any]) -> dict:
  """Parameter shapes of `DiT(**kw)` without allocating."""
  module = DiT(**kw)
  x, t, cond = example_inputs(dict(kw), 1)
  init = lambda: module.init(jax.random.key(0), x, t, cond)
  return nn.meta.unbox(jax.eval_shape(init)['params'])


def param_count(kw: Mapping[str, Any]) -> int:
  return int(sum(np.prod(a.shape) for a in jax.tree.leaves(abstract_params(kw))))


_BLOCK = {'query': ('attn1.to_q', 'linear', 1), 'key': ('attn1.to_k', 'linear', 1),
          'value': ('attn1.to_v', 'linear', 1), 'out': ('attn1.to_out.0', 'linear', 2),
          'cross_query': ('attn2.to_q', 'linear', 1), 'cross_key': ('attn2.to_k', 'linear', 1),
          'cross_value': ('attn2.to_v', 'linear', 1),
          'cross_out': ('attn2.to_out.0', 'linear', 2),
          'mlp_in': ('ff.net.0.proj', 'linear', 1), 'mlp_out': ('ff.net.2', 'linear', 1),
          'adaln': ('norm1.linear', 'linear', 1)}
_TOP = {'patch_embed': ('pos_embed.proj', 'conv', 1), 'final_adaln': ('proj_out_1', 'linear', 1),
        'caption_in': ('caption_projection.linear_1', 'linear', 1),
        'caption_out': ('caption_projection.linear_2', 'linear', 1),
        'adaln_single': ('adaln_single.linear', 'linear', 1)}
_EMBED = {'time_Dense_0': 'timestep_embedder.linear_1',
          'time_Dense_1': 'timestep_embedder.linear_2'}


def _leaf_rule(torch_name: str, leaf: str, kind: str, n_in: int, target, stacked: bool, blocks):
  """A Rule for a kernel/bias leaf; `blocks` > 0 lists every block's copy as a tied alias."""
  suffix = 'weight' if leaf == 'kernel' else 'bias'
  leaf_kind = kind if leaf == 'kernel' else ('flat' if n_in == 1 and kind == 'linear' else 'same')
  names = (f'{torch_name}.{suffix}',)
  if blocks:
    names = tuple(f'{torch_name}.{suffix}'.replace('{i}', str(i)) for i in range(blocks))
  return convert.Rule(target, names, leaf_kind, n_in if leaf == 'kernel' else 1, stacked)


def dit_rules(kw: Mapping[str, Any]) -> tuple[list[convert.Rule], dict]:
  template = traverse_util.flatten_dict(abstract_params(kw))
  get = lambda f: kw.get(f, getattr(DiT, f))
  pixart = get('adaln') == 'single'
  depth = get('depth')
  rules = []
  for path in template:
    head, leaf = path[0], path[-1]
    blk, stacked = None, False
    if head == 'blocks':
      blk, stacked = 'transformer_blocks.{i}', True
    elif head.startswith('blocks_'):
      blk = f'transformer_blocks.{head[len("blocks_"):]}'
    if blk is not None:
      if leaf == 'scale_shift_table':
        rules.append(convert.Rule(path, (f'{blk}.scale_shift_table',), stacked=stacked))
        continue
      name, kind, n_in = _BLOCK[path[1]]
      rules.append(_leaf_rule(f'{blk}.{name}', leaf, kind, n_in, path, stacked, 0))
    elif head == 'cond_embed':
      per_block = get('block_condition_embed')
      base = 'adaln_single.emb' if pixart else 'transformer_blocks.{i}.norm1.emb'
      tied = 0 if (pixart or per_block) else depth
      if leaf == 'class_embedding':
        names = ('transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table.weight',)
        if tied:
          names = tuple(names[0].replace('{i}', str(i)) for i in range(depth))
        rules.append(convert.Rule(path, names, stacked=per_block))
      else:
        rules.append(_leaf_rule(f'{base}.{_EMBED[path[1]]}', leaf, 'linear', 1, path,
                                per_block, tied))
    elif head == 'final_proj':
      rules.append(_leaf_rule('proj_out' if pixart else 'proj_out_2', leaf, 'linear', 1, path,
                              False, 0))
    elif head == 'final_scale_shift_table':
      rules.append(convert.Rule(path, ('scale_shift_table',)))
    else:
      name, kind, n_in = _TOP[head]
      rules.append(_leaf_rule(name, leaf, kind, n_in, path, False, 0))
  return rules, template


def convert_dit(state_dict: Mapping[str, np.ndarray], kw: Mapping[str, Any], *,
                what: str = 'diffusers DiT') -> dict:
  """Our parameter tree (numpy) from a diffusers DiT / PixArt state dict; every parameter
  must be filled and every tensor used, else the error names the missing and unused ones."""
  rules, template = dit_rules(kw)
  return convert.assemble(dict(state_dict), rules, template, what=what)


def export_dit(kw: Mapping[str, Any], params: Mapping) -> tuple[dict, dict[str, np.ndarray]]:
  """(diffusers config, state dict) of our DiT fields and parameters."""
  config = config_of(kw)
  rules, _ = dit_rules(kw)
  state = convert.disassemble(params, rules, what='DiT params')
  get = lambda f: kw.get(f, getattr(DiT, f))
  if get('adaln') == 'zero' and not get('block_condition_embed'):
    # diffusers keeps a copy of the shared embedders in every block.
    prefix = 'transformer_blocks.0.norm1.emb.'
    for key in [k for k in state if k.startswith(prefix)]:
      for i in range(1, get('depth')):
        state[key.replace('transformer_blocks.0.', f'transformer_blocks.{i}.', 1)] = state[key]
  return config, {k: np.asarray(v, np.float32) for k, v in state.items()}


def load_dit(folder: str, num_timesteps: int | None = None, **extra) -> tuple[DiT, dict]:
  """(module, params) from a diffusers transformer folder (config.json + safetensors);
  num_timesteps None reads ../scheduler/scheduler_config.json when present, else 1000;
  `extra` as in `dit_kwargs`."""
  where = os.path.join(folder, CONFIG_NAME)
  if not os.path.isfile(where):
    raise errors.InputError(f'{where}: no such file; expected a diffusers transformer folder '
                            f'({CONFIG_NAME} and {WEIGHTS_NAME})')
  config = convert.read_json_object(where)
  if num_timesteps is None:
    num_timesteps = dio_scheduler.sibling_num_timesteps(folder)
  kw = dit_kwargs(config, where=where, num_timesteps=num_timesteps, **extra)
  params = convert_dit(convert.read_weights(folder), kw,
                       what=os.path.join(folder, WEIGHTS_NAME))
  return DiT(**kw), params


def save_dit(folder: str, kw: Mapping[str, Any], params: Mapping) -> str:
  """Writes our DiT as a diffusers transformer folder that `from_pretrained` loads."""
  config, state = export_dit(kw, params)
  os.makedirs(folder, exist_ok=True)
  convert.write_safetensors(state, os.path.join(folder, WEIGHTS_NAME))
  io_util.write_json(os.path.join(folder, CONFIG_NAME), config)
  return folder


# DiT-XL/2 at 256 px (facebook/DiT-XL-2-256 transformer/config.json; the rest default).
DIT_XL_2_256 = dict(_class_name='DiTTransformer2DModel', num_attention_heads=16,
                    attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                    sample_size=32, patch_size=2, num_embeds_ada_norm=1000)
