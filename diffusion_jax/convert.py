"""Weight import from safetensors into flax parameter trees, and CLIP export back to them.

Reads a local directory in the transformers layout (config.json plus `model.safetensors`, or
shards listed in `model.safetensors.index.json`), maps the transformers names to our tree,
transposes kernels, and checks every tensor against the shapes of a freshly initialised
module (`jax.eval_shape`, nothing allocated). Missing, unexpected and mis-shaped tensors are
reported by name. The safetensors header is parsed here (it is a length-prefixed JSON
header followed by raw little-endian data), so that a truncated file is reported with the
name of the tensor that runs past its end, and tensors are memory-mapped rather than read.
A tensor holding NaN or infinity is refused by name. Every failure to read weights or their
config.json is a `WeightImportError` (an `errors.InputError`): one line naming the file, the
tensor or field at fault, and what to do.

Pickle-based formats (.bin, .pt, .pth, .ckpt, .pkl, or such a file under another name, known
by its first bytes) are refused: unpickling runs arbitrary code. Convert such a checkpoint
once, in an environment you trust, with transformers:
`Model.from_pretrained(dir).save_pretrained(out, safe_serialization=True)`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import stat
import struct
from typing import Any, Iterable, Mapping, Sequence

import ml_dtypes
import numpy as np
from flax import traverse_util

from diffusion_jax import errors, io_util
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


class WeightImportError(errors.InputError):
  """A checkpoint that cannot be imported: wrong format, truncated, missing or mis-shaped keys.

  The message is one line that names the file (and the tensor or field, when one is at fault).
  """


def pickle_refusal(path: str) -> str:
  return (f'refusing to load {path}: pickle checkpoints (.bin/.pt/.pth/.ckpt/.pkl) can run '
          'arbitrary code; convert it once to safetensors where you trust the file, e.g. '
          "python -c \"import transformers as t; t.AutoModel.from_pretrained('DIR')"
          ".save_pretrained('OUT', safe_serialization=True)\", and point to OUT")


# The safetensors format caps its JSON header at 100 MB: a larger length is not a header.
MAX_HEADER_BYTES = 100_000_000
# How many names an error lists before it says "and N more".
_NAMES_SHOWN = 8
_CORRUPT_HINT = 'the file is corrupt or incomplete: download or export it again'


def _some(names: Sequence[str], sep: str = ', ') -> str:
  """'a, b, c' or 'a, ..., h and 12 more': error messages stay one readable line."""
  names = list(names)
  shown = sep.join(names[:_NAMES_SHOWN])
  return shown + (f' and {len(names) - _NAMES_SHOWN} more' if len(names) > _NAMES_SHOWN else '')


def _unreadable(path: str, e: OSError) -> WeightImportError:
  return WeightImportError(f'{path}: cannot be read ({e.strerror or e}); check that it exists '
                           'and that its permissions let you read it')


def _stat(path: str) -> os.stat_result | None:
  """os.stat of `path`, None when nothing is there; a path it may not look at is refused."""
  try:
    return os.stat(path)
  except (FileNotFoundError, NotADirectoryError):
    return None
  except OSError as e:
    raise _unreadable(path, e) from None


def _require_file(path: str, expected: str) -> None:
  """Refuses a missing path or a directory where `expected` (a file) should be."""
  info = _stat(path)
  if info is None:
    raise WeightImportError(f'{path}: no such file; expected {expected}')
  if stat.S_ISDIR(info.st_mode):
    raise WeightImportError(f'{path}: is a directory; expected {expected}')


def _has_pickle_magic(head: bytes) -> bool:
  """torch.save's zip ('PK\\x03\\x04') or a protocol 2-5 pickle ('\\x80\\x02'..'\\x80\\x05').

  A safetensors header always starts with '{' at byte 8, which no such file has there, so a
  safetensors file whose header length happens to begin with these bytes is not mistaken.
  """
  if head[8:9] == b'{':
    return False
  return head.startswith(b'PK\x03\x04') or (len(head) >= 2 and head[0] == 0x80
                                             and 2 <= head[1] <= 5)


def is_pickle_file(path: str) -> bool:
  """A pickle checkpoint, by its name or by its first bytes (read, never unpickled)."""
  if path.lower().endswith(PICKLE_SUFFIXES):
    return True
  if not os.path.isfile(path):
    return False
  try:
    with open(path, 'rb') as f:
      return _has_pickle_magic(f.read(9))
  except OSError as e:
    raise _unreadable(path, e) from None


def _refuse_if_pickle(path: str) -> None:
  if is_pickle_file(path):
    raise WeightImportError(pickle_refusal(path))


def _is_count(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _tensor_layout(info, base: int, size: int) -> tuple[np.dtype, tuple[int, ...], int, int]:
  """(dtype, shape, begin, end) of one header entry; a ValueError says what is wrong with it."""
  if not isinstance(info, dict):
    raise ValueError(f'header entry is {type(info).__name__}, not an object')
  name = info.get('dtype')
  dtype = _DTYPES.get(name) if isinstance(name, str) else None
  if dtype is None:
    raise ValueError(f'unsupported dtype {name!r}')
  shape, offsets = info.get('shape'), info.get('data_offsets')
  if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
    raise ValueError(f'shape {shape!r} is not a list of non-negative integers')
  if (not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_count, offsets))
      or offsets[0] > offsets[1]):
    raise ValueError(f'data_offsets {offsets!r} is not [begin, end] with 0 <= begin <= end')
  begin, end = offsets
  need = math.prod(shape) * dtype.itemsize
  if end - begin != need:
    raise ValueError(f'header gives {end - begin} bytes but shape {tuple(shape)} {name} '
                     f'needs {need}')
  if base + end > size:
    raise ValueError(f'ends at byte {base + end} but the file has {size} bytes (truncated file)')
  return dtype, tuple(shape), begin, end


def _overlaps(layouts: Mapping[str, tuple]) -> list[str]:
  """Pairs of tensors whose byte ranges overlap (a forged or corrupt header)."""
  spans = sorted((begin, end, key) for key, (_, _, begin, end) in layouts.items() if end > begin)
  return [f'tensors {a!r} and {b!r} share bytes {b_begin}..{min(a_end, b_end)}'
          for (_, a_end, a), (b_begin, b_end, b) in zip(spans, spans[1:]) if b_begin < a_end]


def _read_header(path: str, size: int) -> tuple[dict, int]:
  """(the parsed JSON header, the byte where the data starts) of a safetensors file."""
  if size == 0:
    raise WeightImportError(f'{path}: empty file (0 bytes), not safetensors; {_CORRUPT_HINT}')
  try:
    with open(path, 'rb') as f:
      prefix = f.read(8)
      if len(prefix) < 8:
        raise WeightImportError(f'{path}: truncated safetensors file ({size} bytes, no header); '
                                f'{_CORRUPT_HINT}')
      (header_len,) = struct.unpack('<Q', prefix)
      if header_len > MAX_HEADER_BYTES:
        raise WeightImportError(f'{path}: not a safetensors file (its first 8 bytes give a '
                                f'header of {header_len} bytes, over the format\'s 100 MB)')
      if 8 + header_len > size:
        raise WeightImportError(f'{path}: truncated safetensors file: its header claims '
                                f'{header_len} bytes but the file has {size}; {_CORRUPT_HINT}')
      raw = f.read(header_len)
  except OSError as e:
    raise _unreadable(path, e) from None
  try:
    header = json.loads(raw.decode('utf-8'))
  except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError
    raise WeightImportError(f'{path}: the safetensors header is not JSON ({e}); '
                            f'{_CORRUPT_HINT}') from None
  if not isinstance(header, dict):
    raise WeightImportError(f'{path}: the safetensors header is a {type(header).__name__}, '
                            f'not an object; {_CORRUPT_HINT}')
  return header, 8 + header_len


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Name -> memory-mapped numpy array for one .safetensors file, with integrity checks."""
  _require_file(path, 'a .safetensors file')
  _refuse_if_pickle(path)
  size = os.path.getsize(path)
  header, base = _read_header(path, size)
  layouts, problems = {}, []
  for key, info in header.items():
    if key == '__metadata__':
      continue
    try:
      layouts[key] = _tensor_layout(info, base, size)
    except ValueError as e:
      problems.append(f'tensor {key!r}: {e}')
  problems += _overlaps(layouts)
  if problems:
    raise WeightImportError(f'{path}: {_some(problems, "; ")}; {_CORRUPT_HINT}')
  try:
    data = np.memmap(path, dtype=np.uint8, mode='r') if size > base else np.zeros(0, np.uint8)
  except OSError as e:
    raise _unreadable(path, e) from None
  # Each tensor is a view of the memmap: its `filename` names the file in later errors.
  return {key: data[base + begin:base + end].view(dtype).reshape(shape)
          for key, (dtype, shape, begin, end) in layouts.items()}


def read_weights(path: str) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint: a .safetensors file, or a directory with `model.safetensors`,
  sharded `*.safetensors` + `*.safetensors.index.json`, or several .safetensors files."""
  if os.path.isfile(path):
    return read_safetensors(path)
  if not os.path.isdir(path):
    raise WeightImportError(f'{path}: no such file or directory; expected a .safetensors file '
                            'or a transformers model directory')
  names = _list_dir(path)
  indices = sorted(n for n in names if n.endswith('.safetensors.index.json'))
  if indices:
    return _read_sharded(os.path.join(path, indices[0]))
  files = sorted(os.path.join(path, n) for n in names if n.endswith('.safetensors'))
  full = [f for f in files if '.fp16' not in os.path.basename(f)]
  if full and len(full) < len(files):  # the fp16 variant beside the full-precision weights
    files = full
  if not files:
    pickles = sorted(n for n in names if n.lower().endswith(PICKLE_SUFFIXES))
    if pickles:
      raise WeightImportError(pickle_refusal(os.path.join(path, pickles[0])))
    raise WeightImportError(f'{path}: no *.safetensors weights found (expected model.safetensors'
                            ' or shards listed in model.safetensors.index.json)')
  out: dict[str, np.ndarray] = {}
  origin: dict[str, str] = {}
  for f in files:
    for key, value in read_safetensors(f).items():
      if key in out:
        raise WeightImportError(f'{path}: tensor {key!r} is in both {origin[key]} and {f}; '
                                'keep one checkpoint per directory')
      out[key], origin[key] = value, f
  return out


def _list_dir(path: str) -> list[str]:
  """The entries of `path` that a shell glob would see (no hidden files)."""
  try:
    return [n for n in os.listdir(path) if not n.startswith('.')]
  except OSError as e:
    raise _unreadable(path, e) from None


def _refuse_duplicate_keys(path: str):
  """A json object_pairs_hook that refuses a key given twice (the last would win silently)."""
  def build(pairs):
    seen = set()
    for key, _ in pairs:
      if key in seen:
        raise WeightImportError(f'{path}: {key!r} is given twice; keep one entry')
      seen.add(key)
    return dict(pairs)
  return build


def read_json_object(path: str, *, unique_keys: bool = False) -> dict[str, Any]:
  """A JSON file that must hold an object; every failure is a one-line WeightImportError."""
  _require_file(path, 'a JSON file')
  hook = _refuse_duplicate_keys(path) if unique_keys else None
  try:
    with open(path, 'rb') as f:
      value = json.loads(f.read().decode('utf-8'), object_pairs_hook=hook)
  except OSError as e:
    raise _unreadable(path, e) from None
  except WeightImportError:
    raise
  except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError
    raise WeightImportError(f'{path}: not valid JSON ({e}); restore the file saved with the '
                            'weights') from None
  if not isinstance(value, dict):
    raise WeightImportError(f'{path}: holds a JSON {type(value).__name__}, expected an object '
                            '({"field": value, ...}); restore the file saved with the weights')
  return value


def _shard_is_inside(shard: str) -> bool:
  """A shard name from an index: a path below the index's directory, never above or absolute."""
  parts = shard.replace('\\', '/').split('/')
  return bool(shard) and not os.path.isabs(shard) and '..' not in parts


def _read_sharded(index_path: str) -> dict[str, np.ndarray]:
  weight_map = read_json_object(index_path, unique_keys=True).get('weight_map')
  if not isinstance(weight_map, dict) or not all(isinstance(s, str) for s in weight_map.values()):
    raise WeightImportError(f'{index_path}: no "weight_map" of tensor name -> shard file in the '
                            'index; restore the index saved with the shards')
  outside = sorted({s for s in weight_map.values() if not _shard_is_inside(s)})
  if outside:
    raise WeightImportError(f'{index_path}: shard names {_some(map(repr, outside))} point '
                            'outside its directory; shards must sit beside the index')
  root = os.path.dirname(index_path)
  by_file: dict[str, list[str]] = {}
  for key, shard in weight_map.items():
    by_file.setdefault(shard, []).append(key)
  out: dict[str, np.ndarray] = {}
  for shard, keys in sorted(by_file.items()):
    shard_path = os.path.join(root, shard)
    if not os.path.exists(shard_path):
      raise WeightImportError(f'{index_path}: shard {shard} is missing (holds {keys[0]!r}'
                              f'{" and %d more" % (len(keys) - 1) if len(keys) > 1 else ""}); '
                              'copy every shard the index lists')
    tensors = read_safetensors(shard_path)
    absent = [k for k in keys if k not in tensors]
    if absent:
      raise WeightImportError(f'{shard_path}: tensor {absent[0]!r} listed in the index is not '
                              f'in the shard ({len(absent)} missing); {_CORRUPT_HINT}')
    elsewhere = sorted(k for k in tensors if weight_map.get(k, shard) != shard)
    if elsewhere:
      raise WeightImportError(f'{shard_path}: tensor {elsewhere[0]!r} is also in shard '
                              f'{weight_map[elsewhere[0]]} (the index puts it there; '
                              f'{len(elsewhere)} such duplicates); {_CORRUPT_HINT}')
    out.update((k, tensors[k]) for k in keys)
  return out


def config_path(path: str) -> str:
  """The config.json of a model directory (or `path` itself when it names a .json file)."""
  is_json_file = path.endswith('.json') and not os.path.isdir(path)
  return path if is_json_file else os.path.join(path, 'config.json')


def read_config(path: str) -> dict[str, Any]:
  """config.json of a transformers model directory, as a dict."""
  layout = 'a transformers model directory (config.json and *.safetensors)'
  cfg_path = config_path(path)
  if cfg_path != path:
    if os.path.isfile(path):
      raise WeightImportError(f'{path}: is a file; expected {layout}')
    if not os.path.isdir(path):
      raise WeightImportError(f'{path}: no such directory; expected {layout}')
  if _stat(cfg_path) is None:
    raise WeightImportError(f'{path}: no config.json (expected the transformers layout); copy '
                            'the config.json saved with the weights')
  return read_json_object(cfg_path)


# Kinds of config.json fields: what each accepts, and how a message names it.
_FIELD_KINDS = {
    'count': (lambda v: _is_count(v) and v > 0, 'a positive integer'),
    'index': (lambda v: v is None or _is_count(v), 'a non-negative integer or null'),
    'number': (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
               and math.isfinite(v), 'a finite number'),
    'name': (lambda v: isinstance(v, str), 'a string'),
    'name?': (lambda v: v is None or isinstance(v, str), 'a string or null'),
    'object': (lambda v: isinstance(v, dict), 'an object'),
}
# config.json fields that load_t5 reads, and those that every T5 config.json has.
T5_CONFIG_FIELDS = {
    'model_type': 'name', 'vocab_size': 'count', 'd_model': 'count', 'num_layers': 'count',
    'num_heads': 'count', 'd_kv': 'count', 'd_ff': 'count', 'feed_forward_proj': 'name',
    'dense_act_fn': 'name?', 'relative_attention_num_buckets': 'count',
    'relative_attention_max_distance': 'count', 'layer_norm_epsilon': 'number'}
T5_REQUIRED = ('vocab_size', 'd_model', 'num_layers', 'num_heads', 'd_kv', 'd_ff')
# The same for load_clip: the top level, and each tower's sub-config.
CLIP_CONFIG_FIELDS = {'model_type': 'name', 'projection_dim': 'count',
                      'logit_scale_init_value': 'number', 'text_config': 'object',
                      'vision_config': 'object'}
CLIP_REQUIRED = ('text_config', 'vision_config')
_CLIP_TOWER_FIELDS = {'hidden_size': 'count', 'num_hidden_layers': 'count',
                      'num_attention_heads': 'count', 'intermediate_size': 'count',
                      'hidden_act': 'name', 'layer_norm_eps': 'number'}
CLIP_TEXT_FIELDS = {**_CLIP_TOWER_FIELDS, 'vocab_size': 'count',
                    'max_position_embeddings': 'count', 'eos_token_id': 'index'}
CLIP_VISION_FIELDS = {**_CLIP_TOWER_FIELDS, 'image_size': 'count', 'patch_size': 'count',
                      'num_channels': 'count'}


def check_config_fields(cfg: Mapping[str, Any], where: str, kinds: Mapping[str, str],
                        required: Sequence[str] = (), prefix: str = '') -> None:
  """Refuses a missing required field or a field of the wrong type, naming file and field."""
  for name in required:
    if name not in cfg:
      raise WeightImportError(f'{where}: required field "{prefix}{name}" is missing; restore '
                              'the config.json saved with the weights')
  for name, kind in kinds.items():
    accepts, expected = _FIELD_KINDS[kind]
    if name in cfg and not accepts(cfg[name]):
      raise WeightImportError(f'{where}: field "{prefix}{name}" is {cfg[name]!r}; expected '
                              f'{expected}')


def _model_fields(path: str, from_hf, check) -> dict[str, Any]:
  """Constructor fields from a directory's config.json, checked first, errors naming the file."""
  cfg = read_config(path)
  where = config_path(path)
  check(cfg, where)
  try:
    return from_hf(cfg)
  except ValueError as e:  # an unsupported model_type or activation
    raise WeightImportError(f'{where}: {e}') from None


def _check_t5_config(cfg: Mapping[str, Any], where: str) -> None:
  check_config_fields(cfg, where, T5_CONFIG_FIELDS, T5_REQUIRED)


def _check_clip_config(cfg: Mapping[str, Any], where: str) -> None:
  check_config_fields(cfg, where, CLIP_CONFIG_FIELDS, CLIP_REQUIRED)
  check_config_fields(cfg['text_config'], where, CLIP_TEXT_FIELDS, prefix='text_config.')
  check_config_fields(cfg['vision_config'], where, CLIP_VISION_FIELDS, prefix='vision_config.')


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
  missing, mis_shaped, conflicts, non_finite, flat = [], [], [], [], {}
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
      part = _transform(rule, a, shape, spec.dtype)
      if not _all_finite(part):
        non_finite.append(_tensor_source(present[0], a))
        ok = False
        continue
      parts.append(part)
    if ok:
      flat[rule.target] = np.stack(parts) if rule.stacked else parts[0]
  unexpected = sorted(k for k in tensors
                      if k not in used and not any(re.fullmatch(p, k) for p in ignore))
  problems = []
  if non_finite:
    problems.append('NaN or infinite values in ' + _some(non_finite, '; ') + ' (a diverged or '
                    'corrupt checkpoint: use one saved before it went non-finite)')
  if mis_shaped:
    problems.append('shape mismatch: ' + _some(mis_shaped, '; '))
  if conflicts:
    problems.append('conflicting tied tensors: ' + _some(conflicts, '; '))
  if missing:
    problems.append('missing keys: ' + _some(missing))
  if unexpected and strict:
    problems.append('unexpected keys: ' + _some(unexpected))
  if problems:
    hint = (' (is it the checkpoint of this model and size?)'
            if missing or mis_shaped or (unexpected and strict) else '')
    raise WeightImportError(f'{what}: ' + ' | '.join(problems) + hint)
  return traverse_util.unflatten_dict(flat)


def _all_finite(a: np.ndarray) -> bool:
  """False when a float tensor holds a NaN or an infinity; integer and bool tensors pass."""
  return a.dtype.kind in 'biu' or bool(np.isfinite(a).all())


def _tensor_source(key: str, a: np.ndarray) -> str:
  """'KEY in FILE' for a tensor memory-mapped by `read_safetensors`, else 'KEY'."""
  filename = getattr(a, 'filename', None)
  return f'{key} in {filename}' if filename else key


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


def _t5_fields(cfg: Mapping[str, Any]) -> dict[str, Any]:
  """`T5Encoder` fields of a config.json; a ValueError names an unsupported feed-forward."""
  fields = t5.config_from_hf(cfg)
  t5.parse_ffn(fields['feed_forward_proj'], fields['dense_act_fn'])
  return fields


# A full T5ForConditionalGeneration checkpoint also holds the decoder and LM head.
T5_IGNORE = (r'decoder\..*', r'lm_head\..*')


def load_t5(path: str, *, strict: bool = True, **overrides):
  """(T5Encoder, params) from a transformers T5 / T5EncoderModel directory."""
  fields = {**_model_fields(path, _t5_fields, _check_t5_config), **overrides}
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
  fields = {**_model_fields(path, clip.config_from_hf, _check_clip_config), **overrides}
  module = clip.CLIP(**fields)
  template = traverse_util.flatten_dict(clip.abstract_params(module))
  params = assemble(read_weights(path), clip_rules(), template, ignore=CLIP_IGNORE,
                    strict=strict, what=f'CLIP weights in {path}')
  return module, params


def read_image_stats(model_dir: str, mean: Sequence[float],
                     std: Sequence[float]) -> tuple[list[float], list[float]]:
  """(image_mean, image_std) from a CLIP directory's preprocessor_config.json, each falling
  back to the given one; a malformed file or statistic is refused naming the file."""
  path = os.path.join(model_dir, 'preprocessor_config.json')
  if not os.path.exists(path):
    return list(mean), list(std)
  cfg = read_json_object(path)
  out = []
  for name, default, least in (('image_mean', mean, -math.inf), ('image_std', std, 0.0)):
    value = cfg.get(name, list(default))
    if (not isinstance(value, list) or len(value) != len(default)
        or not all(_FIELD_KINDS['number'][0](v) and v > least for v in value)):
      raise WeightImportError(f'{path}: "{name}" is {value!r}; expected {len(default)} finite '
                              f'numbers{" above 0" if least == 0 else ""} (one per channel)')
    out.append([float(v) for v in value])
  return out[0], out[1]


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
  convert_command = ('python -m diffusion_jax.tools.convert_inception '
                     '--src=pt_inception-2015-12-05-6726825d.pth --out={}')
  if not os.path.exists(path) and not path.lower().endswith(PICKLE_SUFFIXES):
    raise WeightImportError(f'{path}: no such Inception weights file; fetch pytorch-fid\'s '
                            f'weights and convert them once with `{convert_command.format(path)}`')
  if is_pickle_file(path):
    raise WeightImportError(
        f'refusing to load {path}: pickle checkpoints can run arbitrary code; convert it once '
        f'with `{convert_command.format("FILE.safetensors")}` and point to that file')
  _require_file(path, 'the Inception weights .safetensors file (from convert_inception)')
  module = inception.InceptionV3(**overrides)
  template = traverse_util.flatten_dict(inception.abstract_params(module))
  params = assemble(read_safetensors(path), inception_rules(module), template,
                    ignore=INCEPTION_TORCH_IGNORE, strict=strict,
                    what=f'Inception weights in {path}')
  return module, params
