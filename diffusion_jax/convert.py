"""Weight import from safetensors into flax parameter trees, and CLIP export back to them.

Reads a local directory in the transformers layout (config.json plus `model.safetensors`, or
shards listed in `model.safetensors.index.json`), maps the transformers names to our tree,
transposes kernels, and checks every tensor against the shapes of a freshly initialised
module (`jax.eval_shape`, nothing allocated). Missing, unexpected and mis-shaped tensors are
reported by name. The safetensors header is parsed here (it is a length-prefixed JSON
header followed by raw little-endian data), so that a truncated file is reported with the
name of the tensor that runs past its end, and tensors are memory-mapped rather than read.

Pickle-based formats (.bin, .pt, .pth, .ckpt, .pkl) are refused: unpickling runs arbitrary
code. Convert such a checkpoint once, in an environment you trust, with transformers:
`Model.from_pretrained(dir).save_pretrained(out, safe_serialization=True)`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import glob
import json
import math
import os
import re
import shutil
import struct
from typing import Any, Iterable, Mapping, Sequence

import ml_dtypes
import numpy as np
from flax import traverse_util

from diffusion_jax import io_util
from diffusion_jax.models import clip, inception, t5

PICKLE_SUFFIXES = ('.bin', '.pt', '.pth', '.ckpt', '.pkl', '.pickle')

_DTYPES = {
    'F64': np.dtype('<f8'), 'F32': np.dtype('<f4'), 'F16': np.dtype('<f2'),
    'BF16': np.dtype(ml_dtypes.bfloat16),
    'F8_E4M3': np.dtype(ml_dtypes.float8_e4m3fn), 'F8_E5M2': np.dtype(ml_dtypes.float8_e5m2),
    'I64': np.dtype('<i8'), 'I32': np.dtype('<i4'), 'I16': np.dtype('<i2'), 'I8': np.dtype('i1'),
    'U64': np.dtype('<u8'), 'U32': np.dtype('<u4'), 'U16': np.dtype('<u2'), 'U8': np.dtype('u1'),
    'BOOL': np.dtype(bool),
}


class WeightImportError(ValueError):
  """A checkpoint that cannot be imported: wrong format, truncated, missing or mis-shaped keys."""


def pickle_refusal(path: str) -> str:
  return (f'refusing to load {path}: pickle checkpoints (.bin/.pt/.pth/.ckpt/.pkl) can run '
          'arbitrary code; convert it once to safetensors where you trust the file, e.g. '
          "python -c \"import transformers as t; t.AutoModel.from_pretrained('DIR')"
          ".save_pretrained('OUT', safe_serialization=True)\", and point to OUT")


def _refuse_if_pickle(path: str) -> None:
  if path.lower().endswith(PICKLE_SUFFIXES):
    raise WeightImportError(pickle_refusal(path))


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Name -> memory-mapped numpy array for one .safetensors file, with integrity checks."""
  _refuse_if_pickle(path)
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    prefix = f.read(8)
    if len(prefix) < 8:
      raise WeightImportError(f'{path}: truncated safetensors file ({size} bytes, no header)')
    (header_len,) = struct.unpack('<Q', prefix)
    if 8 + header_len > size:
      raise WeightImportError(f'{path}: truncated safetensors file: its header claims '
                              f'{header_len} bytes but the file has {size}')
    try:
      header = json.loads(f.read(header_len))
    except ValueError as e:
      raise WeightImportError(f'{path}: unreadable safetensors header ({e})') from None
  base = 8 + header_len
  data = np.memmap(path, dtype=np.uint8, mode='r') if size > base else np.zeros(0, np.uint8)
  out, problems = {}, []
  for key, info in header.items():
    if key == '__metadata__':
      continue
    dtype = _DTYPES.get(info.get('dtype'))
    if dtype is None:
      problems.append(f'tensor {key!r}: unsupported dtype {info.get("dtype")!r}')
      continue
    shape = tuple(int(s) for s in info['shape'])
    begin, end = (int(o) for o in info['data_offsets'])
    need = math.prod(shape) * dtype.itemsize
    if end - begin != need:
      problems.append(f'tensor {key!r}: header gives {end - begin} bytes but shape {shape} '
                      f'{info["dtype"]} needs {need}')
      continue
    if base + end > size:
      problems.append(f'tensor {key!r} ends at byte {base + end} but the file has {size} '
                      f'bytes (truncated file)')
      continue
    out[key] = data[base + begin:base + end].view(dtype).reshape(shape)
  if problems:
    raise WeightImportError(f'{path}: ' + '; '.join(problems))
  return out


def read_weights(path: str) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint: a .safetensors file, or a directory with `model.safetensors`,
  sharded `*.safetensors` + `*.safetensors.index.json`, or several .safetensors files."""
  if os.path.isfile(path):
    return read_safetensors(path)
  if not os.path.isdir(path):
    raise WeightImportError(f'{path}: no such file or directory')
  indices = sorted(glob.glob(os.path.join(path, '*.safetensors.index.json')))
  if indices:
    return _read_sharded(indices[0])
  files = sorted(glob.glob(os.path.join(path, '*.safetensors')))
  if not files:
    pickles = sorted(p for p in os.listdir(path) if p.lower().endswith(PICKLE_SUFFIXES))
    if pickles:
      raise WeightImportError(pickle_refusal(os.path.join(path, pickles[0])))
    raise WeightImportError(f'{path}: no *.safetensors weights found')
  out: dict[str, np.ndarray] = {}
  for f in files:
    for key, value in read_safetensors(f).items():
      if key in out:
        raise WeightImportError(f'{path}: tensor {key!r} appears in more than one file')
      out[key] = value
  return out


def _read_sharded(index_path: str) -> dict[str, np.ndarray]:
  with open(index_path) as f:
    weight_map = json.load(f).get('weight_map')
  if not isinstance(weight_map, dict):
    raise WeightImportError(f'{index_path}: no "weight_map" in the index')
  root = os.path.dirname(index_path)
  by_file: dict[str, list[str]] = {}
  for key, shard in weight_map.items():
    by_file.setdefault(shard, []).append(key)
  out: dict[str, np.ndarray] = {}
  for shard, keys in sorted(by_file.items()):
    shard_path = os.path.join(root, shard)
    _refuse_if_pickle(shard_path)
    if not os.path.isfile(shard_path):
      raise WeightImportError(f'{index_path}: shard {shard} is missing (holds {keys[0]!r}'
                              f'{" and %d more" % (len(keys) - 1) if len(keys) > 1 else ""})')
    tensors = read_safetensors(shard_path)
    absent = [k for k in keys if k not in tensors]
    if absent:
      raise WeightImportError(f'{shard_path}: tensor {absent[0]!r} listed in the index is not '
                              f'in the shard ({len(absent)} missing)')
    out.update((k, tensors[k]) for k in keys)
  return out


def read_config(path: str) -> dict[str, Any]:
  cfg_path = path if path.endswith('.json') else os.path.join(path, 'config.json')
  if not os.path.isfile(cfg_path):
    raise WeightImportError(f'{path}: no config.json (expected the transformers layout)')
  with open(cfg_path) as f:
    return json.load(f)


# --- name mapping ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rule:
  """One flax parameter and the transformers tensor(s) that fill it.

  `sources` are alternative names (first present wins; the others count as used aliases);
  `{i}` is the layer index for parameters stacked over a scanned `layers` axis.
  kind: 'same' (identical shape), 'flat' (a flat vector reshaped, e.g. a [H*K] bias to
  [H, K]), 'linear' (torch Linear [out, in] -> kernel [in..., out...] where the first `n_in`
  dims of the flax kernel are inputs), 'conv' (torch [O, I, kh, kw] -> [kh, kw, I, O]).
  """
  target: tuple[str, ...]
  sources: tuple[str, ...]
  kind: str = 'same'
  n_in: int = 1
  stacked: bool = False


def _expected_source_shape(rule: Rule, shape: Sequence[int]) -> tuple[int, ...]:
  shape = tuple(shape)
  if rule.kind == 'same':
    return shape
  if rule.kind == 'flat':
    return (math.prod(shape),)
  if rule.kind == 'linear':
    return (math.prod(shape[rule.n_in:]), math.prod(shape[:rule.n_in]))
  if rule.kind == 'conv':
    return (shape[3], shape[2], shape[0], shape[1])
  raise ValueError(f'unknown rule kind {rule.kind!r}')


def _transform(rule: Rule, a: np.ndarray, shape: Sequence[int], dtype) -> np.ndarray:
  a = np.asarray(a)
  if rule.kind == 'linear':
    a = a.T
  elif rule.kind == 'conv':
    a = a.transpose(2, 3, 1, 0)
  return np.array(a.reshape(shape), dtype=dtype, order='C')


def assemble(tensors: Mapping[str, np.ndarray], rules: Iterable[Rule],
             template: Mapping[tuple[str, ...], Any], *, ignore: Sequence[str] = (),
             strict: bool = True, what: str = 'checkpoint') -> dict:
  """Builds the nested params dict; raises `WeightImportError` naming every problem key.

  `template` is the flattened abstract tree (path -> object with .shape and .dtype).
  `ignore` are regular expressions of tensors that are expected and not needed (e.g. a
  T5 decoder). With `strict`, any other unused tensor is an error.
  """
  rules = list(rules)
  covered = {r.target for r in rules}
  uncovered = sorted('/'.join(p) for p in template if p not in covered)
  if uncovered:  # A mapping bug, not a checkpoint problem.
    raise AssertionError(f'{what}: no mapping rule for parameters {uncovered}')
  used: set[str] = set()
  missing, mis_shaped, conflicts, flat = [], [], [], {}
  for rule in rules:
    if rule.target not in template:
      raise AssertionError(f'{what}: rule for unknown parameter {"/".join(rule.target)}')
    spec = template[rule.target]
    full = tuple(spec.shape)
    shape = full[1:] if rule.stacked else full
    want = _expected_source_shape(rule, shape)
    parts, ok = [], True
    for i in (range(full[0]) if rule.stacked else [None]):
      names = [s.format(i=i) for s in rule.sources]
      present = [n for n in names if n in tensors]
      used.update(present)
      if not present:
        missing.append(names[0])
        ok = False
        continue
      a = tensors[present[0]]
      for alias in present[1:]:  # Tied copies (e.g. shared / encoder.embed_tokens) must agree.
        if not np.array_equal(np.asarray(a), np.asarray(tensors[alias])):
          conflicts.append(f'{alias} differs from its tied copy {present[0]}')
          ok = False
      if tuple(a.shape) != want:
        mis_shaped.append(f'{present[0]}: file has shape {tuple(a.shape)}, model expects {want} '
                          f'(for {"/".join(rule.target)})')
        ok = False
        continue
      parts.append(_transform(rule, a, shape, spec.dtype))
    if ok:
      flat[rule.target] = np.stack(parts) if rule.stacked else parts[0]
  unexpected = sorted(k for k in tensors
                      if k not in used and not any(re.fullmatch(p, k) for p in ignore))
  problems = []
  if mis_shaped:
    problems.append('shape mismatch: ' + '; '.join(mis_shaped))
  if conflicts:
    problems.append('conflicting tied tensors: ' + '; '.join(conflicts))
  if missing:
    problems.append('missing keys: ' + ', '.join(missing))
  if unexpected and strict:
    problems.append('unexpected keys: ' + ', '.join(unexpected))
  if problems:
    raise WeightImportError(f'{what}: ' + ' | '.join(problems))
  return traverse_util.unflatten_dict(flat)


def _untransform(rule: Rule, a: np.ndarray) -> np.ndarray:
  """The inverse of `_transform`: one flax array back to its transformers layout."""
  a = np.asarray(a)
  if rule.kind == 'same':
    out = a
  elif rule.kind == 'flat':
    out = a.reshape(-1)
  elif rule.kind == 'linear':
    out = a.reshape(math.prod(a.shape[:rule.n_in]), math.prod(a.shape[rule.n_in:])).T
  elif rule.kind == 'conv':
    out = a.transpose(3, 2, 0, 1)
  else:
    raise ValueError(f'unknown rule kind {rule.kind!r}')
  return np.array(out, order='C')  # not ascontiguousarray: it turns a 0-d scalar into 1-d


def disassemble(params: Mapping, rules: Iterable[Rule], *,
                what: str = 'params') -> dict[str, np.ndarray]:
  """The inverse of `assemble`: transformers-named numpy tensors from a nested params dict.

  Each parameter goes under its rule's first source name (the canonical one; the others are
  aliases that `assemble` also accepts), a stacked one once per layer. Every parameter must
  have a rule and every rule its parameter, so nothing is dropped or invented silently.
  """
  from flax.core import unfreeze
  flat = traverse_util.flatten_dict(unfreeze(params))
  rules = list(rules)
  unmapped = sorted('/'.join(p) for p in set(flat) - {r.target for r in rules})
  absent = sorted('/'.join(r.target) for r in rules if r.target not in flat)
  if unmapped or absent:
    raise ValueError(f'{what}: parameters without a transformers name {unmapped}, rules '
                     f'without a parameter {absent} (not the tree this mapping is for?)')
  out: dict[str, np.ndarray] = {}
  for rule in rules:
    value = np.asarray(flat[rule.target])
    parts = list(enumerate(value)) if rule.stacked else [(None, value)]
    for i, part in parts:
      out[rule.sources[0].format(i=i)] = _untransform(rule, part)
  return out


def write_safetensors(tensors: Mapping[str, np.ndarray], path: str) -> str:
  """Writes `path` atomically; 'format: pt' metadata so that transformers reads it too."""
  from safetensors.numpy import save_file
  return io_util.replace_atomically(path, lambda tmp: save_file(
      {k: np.array(v, order='C') for k, v in tensors.items()}, tmp, metadata={'format': 'pt'}))


# --- T5 ------------------------------------------------------------------------------------------


def t5_rules(gated: bool) -> list[Rule]:
  blk = 'encoder.block.{i}.layer'
  rules = [
      Rule(('shared', 'embedding'), ('shared.weight', 'encoder.embed_tokens.weight')),
      Rule(('relative_attention_bias', 'embedding'),
           ('encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight',)),
      Rule(('layers', 'attn_norm', 'scale'), (f'{blk}.0.layer_norm.weight',), stacked=True),
      Rule(('layers', 'ffn_norm', 'scale'), (f'{blk}.1.layer_norm.weight',), stacked=True),
      Rule(('final_norm', 'scale'), ('encoder.final_layer_norm.weight',)),
      Rule(('layers', 'attn', 'o', 'kernel'), (f'{blk}.0.SelfAttention.o.weight',), 'linear',
           n_in=2, stacked=True),
      Rule(('layers', 'ffn', 'wo', 'kernel'), (f'{blk}.1.DenseReluDense.wo.weight',), 'linear',
           stacked=True),
  ]
  rules += [Rule(('layers', 'attn', n, 'kernel'), (f'{blk}.0.SelfAttention.{n}.weight',),
                 'linear', stacked=True) for n in 'qkv']
  rules += [Rule(('layers', 'ffn', n, 'kernel'), (f'{blk}.1.DenseReluDense.{n}.weight',),
                 'linear', stacked=True) for n in (('wi_0', 'wi_1') if gated else ('wi',))]
  return rules


# A full T5ForConditionalGeneration checkpoint also holds the decoder and LM head.
T5_IGNORE = (r'decoder\..*', r'lm_head\..*')


def load_t5(path: str, *, strict: bool = True, **overrides):
  """(T5Encoder, params) from a transformers T5 / T5EncoderModel directory."""
  fields = {**t5.config_from_hf(read_config(path)), **overrides}
  module = t5.T5Encoder(**fields)
  gated, _ = t5.parse_ffn(module.feed_forward_proj, module.dense_act_fn)
  template = traverse_util.flatten_dict(t5.abstract_params(module))
  params = assemble(read_weights(path), t5_rules(gated), template, ignore=T5_IGNORE,
                    strict=strict, what=f'T5 weights in {path}')
  return module, params


# --- CLIP ----------------------------------------------------------------------------------------


def _clip_layer_rules(ours: str, theirs: str) -> list[Rule]:
  lay = f'{theirs}.encoder.layers.{{i}}'
  pre = (ours, 'encoder', 'layers')
  rules = []
  for o, t in (('ln1', 'layer_norm1'), ('ln2', 'layer_norm2')):
    rules.append(Rule(pre + (o, 'scale'), (f'{lay}.{t}.weight',), stacked=True))
    rules.append(Rule(pre + (o, 'bias'), (f'{lay}.{t}.bias',), stacked=True))
  for o in 'qkv':
    rules.append(Rule(pre + (o, 'kernel'), (f'{lay}.self_attn.{o}_proj.weight',), 'linear',
                      stacked=True))
    rules.append(Rule(pre + (o, 'bias'), (f'{lay}.self_attn.{o}_proj.bias',), 'flat',
                      stacked=True))
  rules.append(Rule(pre + ('o', 'kernel'), (f'{lay}.self_attn.out_proj.weight',), 'linear',
                    n_in=2, stacked=True))
  rules.append(Rule(pre + ('o', 'bias'), (f'{lay}.self_attn.out_proj.bias',), stacked=True))
  for o in ('fc1', 'fc2'):
    rules.append(Rule(pre + (o, 'kernel'), (f'{lay}.mlp.{o}.weight',), 'linear', stacked=True))
    rules.append(Rule(pre + (o, 'bias'), (f'{lay}.mlp.{o}.bias',), stacked=True))
  return rules


def clip_rules() -> list[Rule]:
  tm, vm = 'text_model', 'vision_model'
  rules = [
      Rule((tm, 'token_embedding', 'embedding'), (f'{tm}.embeddings.token_embedding.weight',)),
      Rule((tm, 'position_embedding'), (f'{tm}.embeddings.position_embedding.weight',)),
      Rule((tm, 'final_ln', 'scale'), (f'{tm}.final_layer_norm.weight',)),
      Rule((tm, 'final_ln', 'bias'), (f'{tm}.final_layer_norm.bias',)),
      Rule((vm, 'patch_embedding', 'kernel'), (f'{vm}.embeddings.patch_embedding.weight',), 'conv'),
      Rule((vm, 'class_embedding'), (f'{vm}.embeddings.class_embedding',)),
      Rule((vm, 'position_embedding'), (f'{vm}.embeddings.position_embedding.weight',)),
      Rule((vm, 'pre_ln', 'scale'), (f'{vm}.pre_layrnorm.weight',)),
      Rule((vm, 'pre_ln', 'bias'), (f'{vm}.pre_layrnorm.bias',)),
      Rule((vm, 'post_ln', 'scale'), (f'{vm}.post_layernorm.weight',)),
      Rule((vm, 'post_ln', 'bias'), (f'{vm}.post_layernorm.bias',)),
      Rule(('text_projection', 'kernel'), ('text_projection.weight',), 'linear'),
      Rule(('visual_projection', 'kernel'), ('visual_projection.weight',), 'linear'),
      Rule(('logit_scale',), ('logit_scale',)),
  ]
  return rules + _clip_layer_rules(tm, tm) + _clip_layer_rules(vm, vm)


# Older exports carry the non-persistent position_ids buffers.
CLIP_IGNORE = (r'.*\.position_ids',)


def load_clip(path: str, *, strict: bool = True, **overrides):
  """(CLIP, params) from a transformers CLIPModel directory."""
  fields = {**clip.config_from_hf(read_config(path)), **overrides}
  module = clip.CLIP(**fields)
  template = traverse_util.flatten_dict(clip.abstract_params(module))
  params = assemble(read_weights(path), clip_rules(), template, ignore=CLIP_IGNORE,
                    strict=strict, what=f'CLIP weights in {path}')
  return module, params


def _clip_fields(module_config) -> dict[str, Any]:
  """`CLIP` constructor fields from a CLIP module or a model config / dict with them."""
  get = ((lambda k, d=None: getattr(module_config, k, d)) if hasattr(module_config, 'apply')
         else (lambda k, d=None: module_config.get(k, d)))
  if get('text') is None or get('vision') is None or get('embed_dim') is None:
    raise ValueError('export_clip: module_config needs text, vision and embed_dim (a CLIP '
                     'module or its model config)')
  return dict(text=dict(get('text')), vision=dict(get('vision')),
              embed_dim=int(get('embed_dim')),
              logit_scale_init=float(get('logit_scale_init', 2.6592)))


def _image_processor_config(size: int, mean, std) -> dict[str, Any]:
  """transformers' CLIPImageProcessor settings; `encoders` reads the mean and std."""
  return dict(image_processor_type='CLIPImageProcessor', do_resize=True,
              size={'shortest_edge': int(size)}, resample=3, do_center_crop=True,
              crop_size={'height': int(size), 'width': int(size)}, do_rescale=True,
              rescale_factor=1 / 255, do_normalize=True, image_mean=[float(v) for v in mean],
              image_std=[float(v) for v in std], do_convert_rgb=True)


def export_clip(params: Mapping, module_config, out_dir: str, *,
                tokenizer_dir: str | None = None, image_mean=None, image_std=None) -> str:
  """Writes CLIP params as a transformers CLIPModel directory that `load_clip` (and so
  `encoders.build_encoder`) and transformers' `CLIPModel.from_pretrained` read back exactly:
  the inverse of `load_clip`, through the same `clip_rules`.

  Args:
    params: a `CLIP` parameter tree (for a trained `ContrastiveCLIP`, its params['clip']).
    module_config: the `CLIP` module or its fields (text, vision, embed_dim).
    out_dir: created if needed; config.json, model.safetensors and the rest are replaced.
    tokenizer_dir: the tokenizer the model was trained with; its files are copied, and its
      end-of-text id becomes the config's `eos_token_id` when the tower pools at the last
      unpadded token (eos_token_id None): transformers can only pool at an id, and for the
      tokenizer's own prompts (ending with eos, right-padded) it is the same token.
    image_mean, image_std: the pixel statistics the image tower was trained with, written to
      preprocessor_config.json (omitted: readers assume OpenAI CLIP's).

  Returns out_dir.
  """
  fields = _clip_fields(module_config)
  if 'clip' in params and len(params) == 1:
    raise ValueError("export_clip: pass the CLIP tree itself (params['clip'] of a "
                     'ContrastiveCLIP / NoisedCLIP), not its wrapper')
  text = {**clip._TEXT_DEFAULTS, **fields['text']}
  bos = pad = None
  if tokenizer_dir:
    from diffusion_jax import tokenizer as tokenizer_lib
    tok = tokenizer_lib.load_tokenizer(tokenizer_dir, int(text['max_length']))
    bos, pad = tok.hf.bos_token_id, tok.pad_id
    if tok.vocab_size > int(text['vocab_size']):
      raise ValueError(f'export_clip: tokenizer at {tokenizer_dir} has {tok.vocab_size} tokens '
                       f'but the CLIP embeds only {text["vocab_size"]}')
    if text['eos_token_id'] is None:
      text['eos_token_id'] = tok.eos_id
  if text['eos_token_id'] is None:
    raise ValueError('export_clip: the text tower pools at the last unpadded token; give the '
                     'tokenizer_dir it was trained with (its eos id is what transformers pools at)')
  fields['text'] = text
  tensors = disassemble(params, clip_rules(), what='export_clip')
  os.makedirs(out_dir, exist_ok=True)
  if tokenizer_dir:
    for name in sorted(os.listdir(tokenizer_dir)):
      src = os.path.join(tokenizer_dir, name)
      if os.path.isfile(src):
        shutil.copyfile(src, os.path.join(out_dir, name))
  if image_mean is not None or image_std is not None:
    if image_mean is None or image_std is None:
      raise ValueError('export_clip: give both image_mean and image_std, or neither')
    io_util.write_json(os.path.join(out_dir, 'preprocessor_config.json'), _image_processor_config(
        fields['vision']['image_size'], image_mean, image_std))
  write_safetensors(tensors, os.path.join(out_dir, 'model.safetensors'))
  io_util.write_json(os.path.join(out_dir, 'config.json'),
              clip.config_to_hf(fields, bos_token_id=bos, pad_token_id=pad))
  return out_dir


def clip_to_noised_clip(clip_params: Mapping, noised_module, rng) -> dict:
  """Seeds a `NoisedCLIP`'s params from pretrained CLIP params (the time MLP from `rng`).

  Because the time MLP's output layer starts at zero, the result computes exactly the
  pretrained CLIP until training moves it.
  """
  import jax
  from flax import linen as nn
  text, vision = dict(noised_module.text), dict(noised_module.vision)
  ids = np.zeros((1, text['max_length']), np.int32)
  px = np.zeros((1, vision['image_size'], vision['image_size'], vision.get('channels', 3)),
                np.float32)
  init = lambda k: nn.meta.unbox(noised_module.init(
      k, px, np.zeros((1,), np.float32), {'text_ids': ids, 'text_mask': ids > -1}))['params']
  fresh = jax.jit(init)(rng)
  flat_fresh = traverse_util.flatten_dict(fresh)
  flat_clip = traverse_util.flatten_dict(dict(clip_params))
  out = {}
  for path, value in flat_fresh.items():
    src = path[1:]  # Drop the leading 'clip'.
    if src in flat_clip:
      if tuple(np.shape(flat_clip[src])) != tuple(value.shape):
        raise WeightImportError(f'CLIP param {"/".join(src)} has shape {np.shape(flat_clip[src])},'
                                f' noised CLIP expects {value.shape}')
      out[path] = flat_clip[src]
    else:
      out[path] = value
  return traverse_util.unflatten_dict(out)


# pytorch-fid's Inception: torch names <-> our tree --------------------------------------------


_INCEPTION_TORCH_LEAF = {'kernel': 'conv.weight', 'scale': 'bn.weight', 'bias': 'bn.bias',
               'mean': 'bn.running_mean', 'var': 'bn.running_var'}
# Tensors of pytorch-fid's state dict that the pool3 features do not use.
INCEPTION_TORCH_IGNORE = (r'.*\.num_batches_tracked', r'fc\.(weight|bias)', r'AuxLogits\..*')


def inception_torch_name(path: Sequence[str]) -> str:
  """('Mixed_5b', 'branch1x1', 'kernel') -> 'Mixed_5b.branch1x1.conv.weight'."""
  return '.'.join(path[:-1]) + '.' + _INCEPTION_TORCH_LEAF[path[-1]]


def inception_rules(module=None) -> list[Rule]:
  flat = traverse_util.flatten_dict(inception.abstract_params(module))
  return [Rule(path, (inception_torch_name(path),), 'conv' if path[-1] == 'kernel' else 'same')
          for path in flat]


def inception_to_torch(params) -> dict[str, np.ndarray]:
  """Our tree -> pytorch-fid state-dict names and layouts (conv kernels OIHW)."""
  out = {}
  for path, value in traverse_util.flatten_dict(params).items():
    a = np.asarray(value, np.float32)
    out[inception_torch_name(path)] = np.ascontiguousarray(a.transpose(3, 2, 0, 1) if path[-1] == 'kernel'
                                                 else a)
  return out


def save_inception(path: str, params, metadata: dict[str, str] | None = None) -> str:
  """Writes params as a pytorch-fid-named safetensors file; returns its sha256."""
  from safetensors.numpy import save_file
  save_file(inception_to_torch(params), path, metadata=metadata)
  return file_sha256(path)


def file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()


def load_inception(path: str, *, strict: bool = True, **overrides):
  """(InceptionV3, params) from a safetensors file holding pytorch-fid's state dict.

  Pickle files (.pth) are refused: convert pytorch-fid's
  `pt_inception-2015-12-05-6726825d.pth` once with
  `python -m diffusion_jax.tools.convert_inception --src=FILE.pth --out=FILE.safetensors`.
  """
  if path.lower().endswith(PICKLE_SUFFIXES):
    raise WeightImportError(
        f'refusing to load {path}: pickle checkpoints can run arbitrary code; convert it once '
        'with `python -m diffusion_jax.tools.convert_inception --src=FILE.pth '
        '--out=FILE.safetensors` and point to the .safetensors file')
  module = inception.InceptionV3(**overrides)
  template = traverse_util.flatten_dict(inception.abstract_params(module))
  params = assemble(read_safetensors(path), inception_rules(module), template,
                    ignore=INCEPTION_TORCH_IGNORE, strict=strict,
                    what=f'Inception weights in {path}')
  return module, params
