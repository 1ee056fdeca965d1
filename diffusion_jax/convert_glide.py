"""glide-text2im's released U-Nets in our networks: their published hyperparameters, the map
from its state-dict names to our parameter tree, and its GPT-2 BPE tokenizer.

The released models (base 64 px, upsampler 64 -> 256 px, and the inpainting variant of each)
are `models.unet.UNet`s with the options that express glide-text2im's choices: padding
tokens visible to attention (`text_mask_keys=False`), the exact GELU, the time embedding of
the integer step (`time_embed_scale=T`, `time_embed_shift=-1`: its step k is our t =
(k + 1) / T) and the released schedules without log-SNR clipping. `stage_config` builds that
stage config from glide-text2im's option names (`model_and_diffusion_defaults()`, updated by
the kind and any overrides); `convert_unet` maps a state dict (name -> numpy array) onto it.
Reading the `.pt` file is the CLI's (`tools/convert_glide`), the one place that unpickles.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from diffusion_jax import convert, errors
from diffusion_jax.diffusion import schedules

UNET_KINDS = ('base', 'upsample', 'base-inpaint', 'upsample-inpaint')
CLIP_KINDS = ('clip-image-enc', 'clip-text-enc')
KINDS = UNET_KINDS + CLIP_KINDS

# glide-text2im's model_and_diffusion_defaults(), plus `n_vocab` (its tokenizer's size, which
# sets the token embedding) and `low_res_size` (the upsamplers' input side; 0: image_size / 4).
DEFAULTS = dict(
    image_size=64, num_channels=192, num_res_blocks=3, channel_mult='', num_heads=1,
    num_head_channels=64, num_heads_upsample=-1, attention_resolutions='32,16,8', dropout=0.1,
    text_ctx=128, xf_width=512, xf_layers=16, xf_heads=8, xf_final_ln=True, xf_padding=True,
    diffusion_steps=1000, noise_schedule='squaredcos_cap_v2', timestep_respacing='',
    use_scale_shift_norm=True, resblock_updown=True, use_fp16=True, cache_text_emb=False,
    inpaint=False, super_res=False, n_vocab=50257, low_res_size=0)
# model_and_diffusion_defaults_upsampler()'s changes.
UPSAMPLER = dict(image_size=256, num_res_blocks=2, noise_schedule='linear', super_res=True)
# How the released models sample (glide-text2im's notebooks): the base with 100 ancestral
# steps and guidance 3 (5 to inpaint), the upsampler with 27 steps ("fast27") from noise *
# 0.997, DDIM (ancestral to inpaint).
SAMPLING = {
    'base': dict(sampler='ddpm', spacing='100', num_steps=100, eta=1.0, guidance_scale=3.0,
                 noise_scale=1.0),
    'upsample': dict(sampler='ddim', spacing='fast27', num_steps=27, eta=0.0,
                     guidance_scale=1.0, noise_scale=0.997),
    'base-inpaint': dict(sampler='ddpm', spacing='100', num_steps=100, eta=1.0,
                         guidance_scale=5.0, noise_scale=1.0),
    'upsample-inpaint': dict(sampler='ddpm', spacing='fast27', num_steps=27, eta=1.0,
                             guidance_scale=1.0, noise_scale=0.997),
}
# Discrete log-SNR bounds wide enough that no released step is clipped (the cosine schedule's
# last step has log-SNR -19.8; the clean end is exactly alpha = 1 in float32).
LOGSNR_BOUNDS = (-schedules.WIDE_LOGSNR, schedules.WIDE_LOGSNR)


def released_options(kind: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """glide-text2im's options of a released kind, updated by `options` (its own names)."""
  if kind not in UNET_KINDS:
    raise errors.InputError(f'--kind={kind}: not a U-Net kind; choose one of '
                            f'{", ".join(UNET_KINDS)}')
  opts = dict(DEFAULTS)
  if kind.startswith('upsample'):
    opts.update(UPSAMPLER)
  opts['inpaint'] = kind.endswith('inpaint')
  unknown = sorted(set(options or {}) - set(opts))
  if unknown:
    raise errors.InputError(f'--options: unknown option(s) {unknown}; glide-text2im\'s are '
                            f'{", ".join(sorted(opts))}')
  for key, value in (options or {}).items():
    default = opts[key]
    if isinstance(default, bool) and not isinstance(value, bool):
      raise errors.InputError(f'--options: {key}={value!r} must be true or false')
    if (isinstance(default, (int, float)) and not isinstance(default, bool)
        and (isinstance(value, bool) or not isinstance(value, (int, float)))):
      raise errors.InputError(f'--options: {key}={value!r} must be a number')
    if isinstance(default, str) and not isinstance(value, str):
      raise errors.InputError(f'--options: {key}={value!r} must be a string')
    opts[key] = value
  if opts['inpaint'] != kind.endswith('inpaint') or opts['super_res'] != kind.startswith(
      'upsample'):
    raise errors.InputError(f'--options: inpaint / super_res contradict --kind={kind}; the kind '
                            'sets them')
  return opts


def channel_mult(opts: Mapping[str, Any]) -> tuple[int, ...]:
  """glide-text2im's channel multipliers: given, or its defaults by image size."""
  size = int(opts['image_size'])
  if not opts['channel_mult']:
    defaults = {256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
    if size not in defaults:
      raise errors.InputError(f'--options: image_size={size} has no default channel_mult; give '
                              'channel_mult, e.g. "1,2"')
    return defaults[size]
  try:
    mult = tuple(int(m) for m in str(opts['channel_mult']).split(','))
  except ValueError:
    raise errors.InputError(f'--options: channel_mult={opts["channel_mult"]!r} must be '
                            'comma-separated integers, e.g. "1,2,3,4"') from None
  if 2 ** (len(mult) + 2) != size:
    raise errors.InputError(f'--options: channel_mult {mult} has {len(mult)} levels; '
                            f'glide-text2im needs 2^(levels + 2) = image_size ({size})')
  return mult


def model_config(opts: Mapping[str, Any]) -> dict[str, Any]:
  """Our `model` section (models.unet.UNet fields) for glide-text2im's options."""
  size = int(opts['image_size'])
  try:
    attention = tuple(int(r) for r in str(opts['attention_resolutions']).split(',') if r)
  except ValueError:
    raise errors.InputError(f'--options: attention_resolutions='
                            f'{opts["attention_resolutions"]!r} must be comma-separated '
                            'integers') from None
  heads, head_channels = int(opts['num_heads']), int(opts['num_head_channels'])
  if head_channels == -1 and int(opts['num_heads_upsample']) not in (-1, heads):
    raise errors.InputError('--options: num_heads_upsample different from num_heads is not '
                            'supported (glide-text2im deprecates it); leave it at -1')
  low = int(opts['low_res_size']) or size // 4
  xf_width = int(opts['xf_width'])
  return dict(
      name='unet', image_size=size, in_channels=3, out_channels=3, learned_variance=True,
      model_channels=int(opts['num_channels']), channel_mult=channel_mult(opts),
      num_res_blocks=int(opts['num_res_blocks']),
      attention_resolutions=attention, num_heads=heads, head_channels=head_channels,
      dropout=float(opts['dropout']), norm_groups=32,
      low_res_size=low if opts['super_res'] else 0, inpaint=bool(opts['inpaint']),
      text_source='transformer' if xf_width else 'none',
      text_len=int(opts['text_ctx']) if xf_width else 0,
      vocab_size=int(opts['n_vocab']) if xf_width else 0,
      xf_width=xf_width, xf_layers=int(opts['xf_layers']) if xf_width else 0,
      xf_heads=int(opts['xf_heads']) if xf_width else 0,
      xf_padding=bool(opts['xf_padding']), xf_final_ln=bool(opts['xf_final_ln']),
      xf_exact_gelu=True, text_mask_keys=False, text_attention='concat_kv',
      time_embed_scale=float(opts['diffusion_steps']), time_embed_shift=-1.0,
      use_scale_shift_norm=bool(opts['use_scale_shift_norm']),
      resblock_updown=bool(opts['resblock_updown']), mid_attention=True, attention_per='block',
      dtype='float32', param_dtype='float32', remat_policy='none', scan_layers=True,
      cpu_kernels=False)


def diffusion_config(opts: Mapping[str, Any]) -> dict[str, Any]:
  """Our `diffusion` section: the released schedule, eps with learned-range variance and the
  hybrid loss (as GLIDE trained), 20% empty captions for classifier-free guidance."""
  schedule = opts['noise_schedule']
  if schedule not in ('linear', 'squaredcos_cap_v2'):
    raise errors.InputError(f'--options: noise_schedule={schedule!r}; glide-text2im has '
                            'linear and squaredcos_cap_v2')
  return dict(schedule=schedule, num_timesteps=int(opts['diffusion_steps']), shift=1.0,
              logsnr_min=LOGSNR_BOUNDS[0], logsnr_max=LOGSNR_BOUNDS[1],
              parameterization='eps', learned_variance=True, vlb_weight=0.001,
              loss_weighting='none', cond_drop_text=0.2, cond_drop_image=0.0, noise_aug=False)


def sampler_config(kind: str, opts: Mapping[str, Any]) -> dict[str, Any]:
  """Our `sampler` section: the released sampling recipe, with `timestep_respacing` when given."""
  s = dict(SAMPLING[kind])
  s.update(name=s.pop('sampler'), threshold='static', percentile=99.5, aug_level=0.0)
  if opts['timestep_respacing']:
    s['spacing'] = str(opts['timestep_respacing'])
  return s


# --- state dict -> our tree ------------------------------------------------------------------


class _Source:
  """The state dict, handing out tensors by name and recording what was used and wrong."""

  def __init__(self, tensors: Mapping[str, np.ndarray]):
    self.tensors = tensors
    self.used: set[str] = set()
    self.missing: list[str] = []
    self.mis_shaped: list[str] = []

  def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray | None:
    if name not in self.tensors:
      self.missing.append(name)
      return None
    self.used.add(name)
    a = np.asarray(self.tensors[name], np.float32)
    if a.shape != tuple(shape):
      self.mis_shaped.append(f'{name}: file has shape {a.shape}, expected {tuple(shape)}')
      return None
    return a


class _Mapper:
  """Fills our flat tree (path -> array) from glide-text2im names, shapes from `template`."""

  def __init__(self, source: _Source, template: Mapping[tuple[str, ...], Any]):
    self.src, self.template, self.out = source, template, {}

  def shape(self, *path: str) -> tuple[int, ...]:
    return tuple(self.template[path].shape)

  def put(self, path: tuple[str, ...], value):
    if value is not None:
      self.out[path] = value

  def linear(self, ours: tuple[str, ...], theirs: str):
    out_f = self.shape(*ours, 'kernel')
    w = self.src.get(f'{theirs}.weight', (out_f[-1], out_f[0]))
    self.put(ours + ('kernel',), None if w is None else w.T)
    self.put(ours + ('bias',), self.src.get(f'{theirs}.bias', (out_f[-1],)))

  def conv(self, ours: tuple[str, ...], theirs: str, in_order=None):
    kh, kw, cin, cout = self.shape(*ours, 'kernel')
    w = self.src.get(f'{theirs}.weight', (cout, cin, kh, kw))
    if w is not None:
      w = w.transpose(2, 3, 1, 0)
      if in_order is not None:
        w = w[:, :, in_order, :]
    self.put(ours + ('kernel',), w)
    self.put(ours + ('bias',), self.src.get(f'{theirs}.bias', (cout,)))

  def norm(self, ours: tuple[str, ...], theirs: str, scale: str = 'scale'):
    (c,) = self.shape(*ours, scale)
    self.put(ours + (scale,), self.src.get(f'{theirs}.weight', (c,)))
    self.put(ours + ('bias',), self.src.get(f'{theirs}.bias', (c,)))

  def resblock(self, ours: str, theirs: str):
    p = (ours,)
    self.norm(p + ('GroupNorm_0',), f'{theirs}.in_layers.0')
    self.conv(p + ('Conv_0',), f'{theirs}.in_layers.2')
    self.linear(p + ('Dense_0',), f'{theirs}.emb_layers.1')
    self.norm(p + ('GroupNorm_1',), f'{theirs}.out_layers.0')
    self.conv(p + ('Conv_1',), f'{theirs}.out_layers.3')
    if (ours, 'Conv_2', 'kernel') in self.template:
      self.conv(p + ('Conv_2',), f'{theirs}.skip_connection')

  def attention(self, ours: str, theirs: str):
    """qkv and encoder_kv are 1x1 conv1ds laid out per head as [q; k; v] ([k; v])."""
    p = (ours,)
    C, N, Hd = self.shape(ours, 'query', 'kernel')
    self.norm(p + ('GroupNorm_0',), f'{theirs}.norm')
    w = self.src.get(f'{theirs}.qkv.weight', (3 * C, C, 1))
    b = self.src.get(f'{theirs}.qkv.bias', (3 * C,))
    for j, name in enumerate(('query', 'key', 'value')):
      if w is not None:
        self.put(p + (name, 'kernel'), w[:, :, 0].reshape(N, 3, Hd, C)[:, j].transpose(2, 0, 1))
      if b is not None:
        self.put(p + (name, 'bias'), b.reshape(N, 3, Hd)[:, j])
    if (ours, 'context_key', 'kernel') in self.template:
      D = self.shape(ours, 'context_key', 'kernel')[0]
      w = self.src.get(f'{theirs}.encoder_kv.weight', (2 * C, D, 1))
      b = self.src.get(f'{theirs}.encoder_kv.bias', (2 * C,))
      for j, name in enumerate(('context_key', 'context_value')):
        if w is not None:
          self.put(p + (name, 'kernel'),
                   w[:, :, 0].reshape(N, 2, Hd, D)[:, j].transpose(2, 0, 1))
        if b is not None:
          self.put(p + (name, 'bias'), b.reshape(N, 2, Hd)[:, j])
    w = self.src.get(f'{theirs}.proj_out.weight', (C, C, 1))
    self.put(p + ('out', 'kernel'), None if w is None else w[:, :, 0].T.reshape(N, Hd, C))
    self.put(p + ('out', 'bias'), self.src.get(f'{theirs}.proj_out.bias', (C,)))

  def text_transformer(self, layers: int):
    p = ('text_transformer',)
    L, W = self.shape(*p, 'positional_embedding')
    V = self.shape(*p, 'token_embedding', 'embedding')[0]
    self.put(p + ('token_embedding', 'embedding'), self.src.get('token_embedding.weight', (V, W)))
    self.put(p + ('positional_embedding',), self.src.get('positional_embedding', (L, W)))
    if p + ('padding_embedding',) in self.template:
      self.put(p + ('padding_embedding',), self.src.get('padding_embedding', (L, W)))
    if p + ('final_ln', 'scale') in self.template:
      self.norm(p + ('final_ln',), 'final_ln')
    _, _, N, Hd = self.shape(*p, 'transformer', 'layers', 'query', 'kernel')
    per_layer: dict[tuple[str, ...], list] = {}

    def add(path, value):
      per_layer.setdefault(path, []).append(value)

    for i in range(layers):
      blk = f'transformer.resblocks.{i}'
      w = self.src.get(f'{blk}.attn.c_qkv.weight', (3 * W, W))
      b = self.src.get(f'{blk}.attn.c_qkv.bias', (3 * W,))
      for j, name in enumerate(('query', 'key', 'value')):
        add((name, 'kernel'), None if w is None else w.reshape(N, 3, Hd, W)[:, j].transpose(2, 0, 1))
        add((name, 'bias'), None if b is None else b.reshape(N, 3, Hd)[:, j])
      w = self.src.get(f'{blk}.attn.c_proj.weight', (W, W))
      add(('out', 'kernel'), None if w is None else w.T.reshape(N, Hd, W))
      add(('out', 'bias'), self.src.get(f'{blk}.attn.c_proj.bias', (W,)))
      for ours, theirs in (('LayerNorm_0', 'ln_1'), ('LayerNorm_1', 'ln_2')):
        add((ours, 'scale'), self.src.get(f'{blk}.{theirs}.weight', (W,)))
        add((ours, 'bias'), self.src.get(f'{blk}.{theirs}.bias', (W,)))
      for ours, theirs, shape in (('Dense_0', 'mlp.c_fc', (4 * W, W)),
                                  ('Dense_1', 'mlp.c_proj', (W, 4 * W))):
        w = self.src.get(f'{blk}.{theirs}.weight', shape)
        add((ours, 'kernel'), None if w is None else w.T)
        add((ours, 'bias'), self.src.get(f'{blk}.{theirs}.bias', (shape[0],)))
    for path, parts in per_layer.items():
      if all(x is not None for x in parts):
        self.put(p + ('transformer', 'layers') + path, np.stack(parts))


def _input_order(model: Mapping[str, Any]) -> list[int] | None:
  """Our in_conv input channels [x, low_res, inpaint image, mask] as indices into the
  upsampling inpainter's [x, inpaint image, mask, low_res]; None where the orders agree."""
  if not (model['low_res_size'] and model['inpaint']):
    return None
  return [0, 1, 2, 7, 8, 9, 3, 4, 5, 6]


def convert_unet(tensors: Mapping[str, np.ndarray], model: Mapping[str, Any], template,
                 *, what: str = 'checkpoint') -> dict:
  """Our nested params of the U-Net `model` (a `model_config` dict) from a glide-text2im
  state dict. `template`: the abstract params (path -> shape) of `models.build(model)`.
  Missing, unexpected, mis-shaped and non-finite tensors are one `WeightImportError`."""
  flat_template = traverse_util.flatten_dict(dict(template))
  src = _Source(tensors)
  m = _Mapper(src, flat_template)
  m.linear(('time_embed', 'Dense_0'), 'time_embed.0')
  m.linear(('time_embed', 'Dense_1'), 'time_embed.2')
  if model['text_source'] == 'transformer':
    m.text_transformer(int(model['xf_layers']))
    m.linear(('text_final_proj',), 'transformer_proj')
  m.conv(('in_conv',), 'input_blocks.0.0', in_order=_input_order(model))
  mult = model['channel_mult']
  blocks, attn_res = int(model['num_res_blocks']), set(model['attention_resolutions'])
  index, res = 1, int(model['image_size'])
  for level in range(len(mult)):
    for i in range(blocks):
      m.resblock(f'down{level}_res{i}', f'input_blocks.{index}.0')
      if res in attn_res:
        m.attention(f'down{level}_{i}_attn', f'input_blocks.{index}.1')
      index += 1
    if level != len(mult) - 1:
      if model['resblock_updown']:
        m.resblock(f'down{level}_downsample', f'input_blocks.{index}.0')
      else:
        m.conv((f'down{level}_downsample', 'Conv_0'), f'input_blocks.{index}.0.op')
      index, res = index + 1, res // 2
  m.resblock('mid_res0', 'middle_block.0')
  m.attention('mid_attn', 'middle_block.1')
  m.resblock('mid_res1', 'middle_block.2')
  index = 0
  for level in reversed(range(len(mult))):
    for i in range(blocks + 1):
      m.resblock(f'up{level}_res{i}', f'output_blocks.{index}.0')
      sub = 1
      if res in attn_res:
        m.attention(f'up{level}_{i}_attn', f'output_blocks.{index}.1')
        sub = 2
      if level and i == blocks:
        if model['resblock_updown']:
          m.resblock(f'up{level}_upsample', f'output_blocks.{index}.{sub}')
        else:
          m.conv((f'up{level}_upsample', 'Conv_0'), f'output_blocks.{index}.{sub}.conv')
        res *= 2
      index += 1
  m.norm(('out_norm',), 'out.0')
  m.conv(('out_conv',), 'out.2')
  return _finish(src, m.out, flat_template, what)


def _finish(src: _Source, out: dict, flat_template, what: str) -> dict:
  problems = []
  non_finite = sorted('/'.join(k) for k, v in out.items() if not np.isfinite(v).all())
  if non_finite:
    problems.append('NaN or infinite values in ' + convert._some(non_finite))
  if src.mis_shaped:
    problems.append('shape mismatch: ' + convert._some(src.mis_shaped, '; '))
  if src.missing:
    problems.append('missing keys: ' + convert._some(src.missing))
  unexpected = sorted(set(src.tensors) - src.used)
  if unexpected:
    problems.append('unexpected keys: ' + convert._some(unexpected))
  if problems:
    raise convert.WeightImportError(
        f'{what}: ' + ' | '.join(problems) + ' (is it the checkpoint of this --kind, with '
        'the --options it was trained with?)')
  absent = sorted('/'.join(k) for k in set(flat_template) - set(out))
  if absent:  # a mapping bug, not a checkpoint problem
    raise AssertionError(f'{what}: no glide-text2im tensor mapped to {absent}')
  for k, v in out.items():
    if tuple(v.shape) != tuple(flat_template[k].shape):
      raise AssertionError(f'{what}: {"/".join(k)} mapped with shape {v.shape}, model has '
                           f'{flat_template[k].shape}')
  return traverse_util.unflatten_dict(
      {k: np.array(v, np.float32, order='C') for k, v in out.items()})


# --- tokenizer ---------------------------------------------------------------------------------

def convert_tokenizer(src: str, out_dir: str) -> int:
  """glide-text2im's GPT-2 BPE (`encoder.json[.gz]` + `vocab.bpe[.gz]` in `src`) as a
  transformers tokenizer in `out_dir` that tokenizes as its `Encoder` does: lower-cased,
  byte-level BPE, no special tokens added, padded with its end token (the last id), the
  mask True on the prompt's tokens. Returns the vocabulary size."""
  from tokenizers import Tokenizer as RawTokenizer  # noqa: PLC0415
  from tokenizers import decoders, models, normalizers, pre_tokenizers  # noqa: PLC0415
  from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

  encoder = json.loads(_read_maybe_gz(src, 'encoder.json'))
  if not isinstance(encoder, dict) or not encoder:
    raise errors.InputError(f'{src}: encoder.json holds no vocabulary object')
  lines = _read_maybe_gz(src, 'vocab.bpe').split('\n')
  merges = [tuple(line.split()) for line in lines[1:] if line.strip()]
  bad = [' '.join(m) for m in merges if len(m) != 2]
  if bad:
    raise errors.InputError(f'{src}: vocab.bpe has lines that are not merge pairs, e.g. '
                            f'{bad[0]!r}')
  n_vocab = len(encoder)
  by_id = {int(i): tok for tok, i in encoder.items()}
  if sorted(by_id) != list(range(n_vocab)):
    raise errors.InputError(f'{src}: encoder.json ids are not 0..{n_vocab - 1}')
  end = by_id[n_vocab - 1]
  raw = RawTokenizer(models.BPE(vocab=dict(encoder), merges=merges))
  raw.normalizer = normalizers.Lowercase()
  raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  raw.decoder = decoders.ByteLevel()
  fast = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token=end, eos_token=end,
                                 model_max_length=1 << 30, padding_side='right',
                                 truncation_side='right')
  tmp = out_dir.rstrip('/') + '.tmp'
  if os.path.isdir(tmp):
    shutil.rmtree(tmp)
  fast.save_pretrained(tmp)
  if os.path.isdir(out_dir):
    shutil.rmtree(out_dir)
  os.replace(tmp, out_dir)
  return n_vocab


def _read_maybe_gz(src: str, name: str) -> str:
  import gzip  # noqa: PLC0415
  for candidate, opener in ((name + '.gz', gzip.open), (name, open)):
    path = os.path.join(src, candidate)
    if os.path.isfile(path):
      try:
        with opener(path, 'rb') as f:
          return f.read().decode('utf-8')
      except (OSError, UnicodeDecodeError, EOFError) as e:
        raise errors.InputError(f'{path}: unreadable ({e}); use the file from a glide-text2im '
                                'checkout') from None
  raise errors.InputError(f'--tokenizer={src}: no {name}[.gz] there; point it at '
                          'glide_text2im/tokenizer of a local glide-text2im checkout')


def param_count(params) -> int:
  return sum(math.prod(np.shape(a)) for a in traverse_util.flatten_dict(dict(params)).values())
