"""Safe weight import: integrity checks, errors that name the key, pickle refusal."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import zipfile

import jax
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file, save_file

import hf_fixtures
from diffusion_jax import convert, errors
from diffusion_jax.models import clip, t5

Q0 = 'encoder.block.0.layer.0.SelfAttention.q.weight'


def _copy(src, dst_name):
  dst = hf_fixtures.path(dst_name)
  shutil.rmtree(dst, ignore_errors=True)
  shutil.copytree(src, dst)
  return dst


def test_mismatched_shape_names_the_key():
  _, src = hf_fixtures.t5_model('gated-gelu')
  d = _copy(src, 'bad_shape')
  tensors = load_file(os.path.join(d, 'model.safetensors'))
  tensors[Q0] = np.zeros((32, 31), np.float32)
  save_file(tensors, os.path.join(d, 'model.safetensors'))
  with pytest.raises(convert.WeightImportError, match='shape mismatch') as e:
    convert.load_t5(d)
  assert Q0 in str(e.value) and '(32, 31)' in str(e.value), str(e.value)


def test_truncated_file_names_the_key():
  _, src = hf_fixtures.t5_model('gated-gelu')
  d = _copy(src, 'truncated')
  f = os.path.join(d, 'model.safetensors')
  with open(f, 'rb') as fh:
    n = int.from_bytes(fh.read(8), 'little')
    header = json.loads(fh.read(n))
  last = max((k for k in header if k != '__metadata__'), key=lambda k: header[k]['data_offsets'][1])
  os.truncate(f, os.path.getsize(f) - 10)
  with pytest.raises(convert.WeightImportError, match='truncated') as e:
    convert.load_t5(d)
  assert repr(last) in str(e.value), str(e.value)
  os.truncate(f, 5)
  with pytest.raises(convert.WeightImportError, match='truncated'):
    convert.load_t5(d)


def test_missing_and_unexpected_keys_are_named():
  _, src = hf_fixtures.t5_model('relu')
  d = _copy(src, 'missing')
  f = os.path.join(d, 'model.safetensors')
  tensors = load_file(f)
  del tensors['encoder.final_layer_norm.weight']
  tensors['encoder.extra.weight'] = np.zeros(3, np.float32)
  save_file(tensors, f)
  with pytest.raises(convert.WeightImportError) as e:
    convert.load_t5(d)
  msg = str(e.value)
  assert 'missing keys: encoder.final_layer_norm.weight' in msg, msg
  assert 'unexpected keys: encoder.extra.weight' in msg, msg
  # The unexpected key alone is tolerated when not strict; the missing one never is.
  tensors['encoder.final_layer_norm.weight'] = np.ones(32, np.float32)
  save_file(tensors, f)
  with pytest.raises(convert.WeightImportError, match='encoder.extra.weight'):
    convert.load_t5(d)
  _, params = convert.load_t5(d, strict=False)
  np.testing.assert_array_equal(params['final_norm']['scale'], np.ones(32, np.float32))


def test_pickle_checkpoints_are_refused():
  d = hf_fixtures.path('pickled')
  os.makedirs(d, exist_ok=True)
  _, src = hf_fixtures.t5_model('relu')
  shutil.copy(os.path.join(src, 'config.json'), d)
  with open(os.path.join(d, 'pytorch_model.bin'), 'wb') as fh:
    fh.write(b'\x80\x04not really a pickle')
  for target in (d, os.path.join(d, 'pytorch_model.bin')):
    with pytest.raises(convert.WeightImportError) as e:
      convert.read_weights(target)
    msg = str(e.value)
    assert 'pytorch_model.bin' in msg and 'safe_serialization=True' in msg and '\n' not in msg, msg
  with pytest.raises(convert.WeightImportError, match='refusing'):
    convert.load_t5(d)


def test_fp16_shards_beside_the_full_precision_file_are_not_read_twice(tmp_path):
  """transformers' variant='fp16' shards beside model.safetensors: the full precision wins;
  two full-precision files holding one tensor are still refused."""
  full = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
  save_file({'w': full}, str(tmp_path / 'model.safetensors'))
  fp16_shard = str(tmp_path / 'model.fp16-00001-of-00001.safetensors')
  save_file({'w': full.astype(np.float16)}, fp16_shard)
  got = convert.read_weights(str(tmp_path))
  assert got['w'].dtype == np.float32 and np.array_equal(got['w'], full)
  os.remove(tmp_path / 'model.safetensors')
  only_fp16 = convert.read_weights(str(tmp_path))['w']
  assert only_fp16.dtype == np.float16 and np.allclose(only_fp16, full, atol=1e-3)
  save_file({'w': full}, str(tmp_path / 'other.safetensors'))
  save_file({'w': full}, str(tmp_path / 'model.safetensors'))
  with pytest.raises(convert.WeightImportError, match='is in both'):
    convert.read_weights(str(tmp_path))


def test_sharded_index_with_missing_shard_names_it():
  d = _copy(hf_fixtures.t5_sharded_dir('gated-gelu'), 'sharded_broken')
  with open(os.path.join(d, 'model.safetensors.index.json')) as fh:
    weight_map = json.load(fh)['weight_map']
  shard = weight_map[Q0]
  os.remove(os.path.join(d, shard))
  with pytest.raises(convert.WeightImportError, match=shard):
    convert.load_t5(d)


def test_bfloat16_checkpoint_and_full_t5_with_decoder():
  torch = pytest.importorskip('torch')
  from transformers import T5Config, T5ForConditionalGeneration
  torch.manual_seed(3)
  full = T5ForConditionalGeneration(T5Config(feed_forward_proj='gated-gelu', **hf_fixtures.T5_TINY))
  d = hf_fixtures.path('t5_full_bf16')
  full.to(torch.bfloat16).save_pretrained(d, safe_serialization=True)
  with open(os.path.join(d, 'model.safetensors'), 'rb') as fh:
    header = json.loads(fh.read(int.from_bytes(fh.read(8), 'little')))
  assert header[Q0]['dtype'] == 'BF16', 'fixture is not a bfloat16 checkpoint'
  module, params = convert.load_t5(d)  # decoder.* and lm_head are ignored, bf16 is widened
  flat = traverse_util.flatten_dict(params)
  assert all(v.dtype == np.float32 for v in flat.values())
  want = full.encoder.block[1].layer[0].SelfAttention.k.weight.detach().float().numpy()
  np.testing.assert_array_equal(flat[('layers', 'attn', 'k', 'kernel')][1], want.T.reshape(32, 4, 6))


def test_clip_position_ids_buffers_are_ignored():
  _, src = hf_fixtures.clip_model(63, 'quick_gelu')
  d = _copy(src, 'clip_position_ids')
  f = os.path.join(d, 'model.safetensors')
  tensors = load_file(f)
  tensors['text_model.embeddings.position_ids'] = np.arange(16)[None].astype(np.int64)
  save_file(tensors, f)
  module, params = convert.load_clip(d)
  assert params['text_model']['position_embedding'].shape == (16, 32)


def test_tied_embedding_copies_must_agree():
  _, src = hf_fixtures.t5_model('relu')
  d = _copy(src, 'tied_copies')
  f = os.path.join(d, 'model.safetensors')
  tensors = load_file(f)
  tensors['encoder.embed_tokens.weight'] = tensors['shared.weight'].copy()
  save_file(tensors, f)
  _, params = convert.load_t5(d)  # an identical second copy is fine
  np.testing.assert_array_equal(params['shared']['embedding'], tensors['shared.weight'])
  tensors['encoder.embed_tokens.weight'][0, 0] += 1.0
  save_file(tensors, f)
  with pytest.raises(convert.WeightImportError, match='encoder.embed_tokens.weight differs'):
    convert.load_t5(d)


# --- hostile input: every failure is one WeightImportError line naming the file ----------------


def _one_line_naming(e, *parts):
  """The error message, after checking it is one line that names every part."""
  msg = str(e.value)
  assert '\n' not in msg, msg
  for part in parts:
    assert part in msg, f'{part!r} not in: {msg}'
  return msg


def _raw_safetensors(path, header, data=b'', header_len=None):
  """Writes a safetensors file by hand: `header` is a dict (JSON-encoded) or raw bytes."""
  raw = header if isinstance(header, bytes) else json.dumps(header).encode()
  with open(path, 'wb') as fh:
    fh.write((len(raw) if header_len is None else header_len).to_bytes(8, 'little') + raw + data)
  return str(path)


class _MakesDirWhenUnpickled:
  """Unpickling this runs os.mkdir(marker): the proof that a refused file was never unpickled."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.mkdir, (self.marker,))


def _f32(n, **changes):
  """The header entry of an F32 [n] tensor at the start of the data, with `changes`."""
  return {'dtype': 'F32', 'shape': [n], 'data_offsets': [0, 4 * n], **changes}


# name -> (header: bytes or a dict to encode, data after it, the length prefix (None: the
# header's), words the message has)
BAD_HEADERS = {
    'header_past_the_end': (b'{}', b'', 999, 'truncated'),
    'absurd_header_length': (b'{}', b'', 2 ** 62, 'not a safetensors file'),
    'header_not_json': (b'{"a": nope}', b'', None, 'not JSON'),
    'header_not_utf8': (b'{\xff\xfe}', b'', None, 'not JSON'),
    'header_a_list': (b'[1, 2]', b'', None, 'not an object'),
    'entry_not_an_object': ({'w': 3}, b'', None, "'w': header entry is int"),
    'unknown_dtype': ({'w': _f32(1, dtype='F7')}, bytes(4), None, "'w': unsupported dtype 'F7'"),
    'dtype_a_list': ({'w': _f32(1, dtype=[])}, bytes(4), None, "'w': unsupported dtype"),
    'negative_shape': ({'w': _f32(1, shape=[-1])}, bytes(4), None, "'w': shape [-1]"),
    'offsets_reversed': ({'w': _f32(1, data_offsets=[4, 0])}, bytes(4), None,
                         "'w': data_offsets [4, 0]"),
    'offsets_wrong_size': ({'w': _f32(2, data_offsets=[0, 4])}, bytes(8), None,
                           "'w': header gives 4 bytes"),
    'offsets_past_the_end': ({'w': _f32(4)}, bytes(8), None, "'w': ends at byte"),
    'offsets_overlap': ({'a': _f32(2), 'b': _f32(2, data_offsets=[4, 12])}, bytes(12), None,
                        "tensors 'a' and 'b' share bytes"),
}


@pytest.mark.parametrize('case', sorted(BAD_HEADERS))
def test_bad_safetensors_header_is_one_line_naming_the_file(case, tmp_path):
  header, data, header_len, words = BAD_HEADERS[case]
  path = _raw_safetensors(tmp_path / 'w.safetensors', header, data, header_len)
  with pytest.raises(convert.WeightImportError) as e:
    convert.read_safetensors(path)
  _one_line_naming(e, path, words)
  assert isinstance(e.value, errors.InputError)


@pytest.mark.parametrize('case,words', [('missing', 'no such file'),
                                        ('directory', 'is a directory'),
                                        ('empty', 'empty file'), ('5_bytes', 'truncated')])
def test_wrong_file_where_safetensors_is_expected(case, words, tmp_path):
  path = tmp_path / 'w.safetensors'
  if case == 'directory':
    path.mkdir()
  elif case != 'missing':
    path.write_bytes(b'\x05\x00\x00\x00\x00' if case == '5_bytes' else b'')
  with pytest.raises(convert.WeightImportError) as e:
    convert.read_safetensors(str(path))
  _one_line_naming(e, str(path), words)


@pytest.mark.parametrize('name,protocol', [('model.safetensors', 'zip'), ('model.safetensors', 2),
                                           ('model.safetensors', 5), ('pytorch_model.bin', 2)])
def test_pickle_under_any_name_is_refused_never_unpickled(name, protocol, tmp_path):
  marker = str(tmp_path / 'unpickled')
  payload = pickle.dumps(_MakesDirWhenUnpickled(marker),
                        protocol=2 if protocol == 'zip' else protocol)
  path = str(tmp_path / name)
  if protocol == 'zip':  # torch.save's container: a zip holding data.pkl
    with zipfile.ZipFile(path, 'w') as z:
      z.writestr('archive/data.pkl', payload)
  else:
    with open(path, 'wb') as fh:
      fh.write(payload)
  for target in (path, str(tmp_path)):
    with pytest.raises(convert.WeightImportError) as e:
      convert.read_weights(target)
    _one_line_naming(e, path, 'refusing', 'safe_serialization=True')
  assert not os.path.exists(marker), 'the pickle was unpickled'


def test_torch_save_renamed_safetensors_is_refused(tmp_path):
  torch = pytest.importorskip('torch')
  path = str(tmp_path / 'model.safetensors')
  torch.save({'w': torch.zeros(3)}, path)
  with pytest.raises(convert.WeightImportError) as e:
    convert.read_safetensors(path)
  _one_line_naming(e, path, 'refusing', 'safe_serialization=True')


def test_safetensors_whose_header_length_starts_like_pickle_magic_loads(tmp_path):
  # A 640-byte header gives first bytes 80 02: a real safetensors file, not a pickle.
  header = json.dumps({'w': _f32(2)}).encode()
  header += b' ' * (0x0280 - len(header))
  path = _raw_safetensors(tmp_path / 'w.safetensors', header, np.float32([1, 2]).tobytes())
  with open(path, 'rb') as fh:
    assert fh.read(2) == b'\x80\x02'
  np.testing.assert_array_equal(convert.read_safetensors(path)['w'], [1, 2])


@pytest.mark.parametrize('bad,dtype', [(np.nan, np.float32), (np.inf, np.float16),
                                       (-np.inf, np.float32)])
def test_non_finite_tensor_is_refused_naming_file_and_key(bad, dtype, tmp_path):
  _, src = hf_fixtures.t5_model('relu')
  d = _copy(src, f'non_finite_{bad}_{np.dtype(dtype).name}')
  f = os.path.join(d, 'model.safetensors')
  tensors = load_file(f)
  tensors[Q0] = tensors[Q0].astype(dtype)
  tensors[Q0][3, 1] = bad
  save_file(tensors, f)
  with pytest.raises(convert.WeightImportError) as e:
    convert.load_t5(d)
  _one_line_naming(e, Q0, os.path.abspath(f), 'NaN or infinite')


def test_non_finite_is_checked_in_every_layer_of_a_stacked_parameter(tmp_path):
  path = str(tmp_path / 'w.safetensors')
  save_file({'l.0': np.ones(2, np.float32), 'l.1': np.float32([1, np.nan]),
             'n': np.arange(2, dtype=np.int32)}, path)
  template = {('l',): jax.ShapeDtypeStruct((2, 2), np.float32),
              ('n',): jax.ShapeDtypeStruct((2,), np.int32)}
  rules = [convert.Rule(('l',), ('l.{i}',), stacked=True), convert.Rule(('n',), ('n',))]
  with pytest.raises(convert.WeightImportError) as e:
    convert.assemble(convert.read_safetensors(path), rules, template, what=f'weights in {path}')
  msg = _one_line_naming(e, f'l.1 in {path}')
  assert 'l.0' not in msg and "'n'" not in msg, msg


def test_key_errors_name_the_checkpoint_and_stay_one_line():
  # A CLIP checkpoint under a T5 config: hundreds of missing and unexpected keys.
  _, t5_dir = hf_fixtures.t5_model('relu')
  _, clip_dir = hf_fixtures.clip_model(63, 'quick_gelu')
  d = _copy(t5_dir, 't5_config_clip_weights')
  shutil.copy(os.path.join(clip_dir, 'model.safetensors'), d)
  with pytest.raises(convert.WeightImportError) as e:
    convert.load_t5(d)
  msg = _one_line_naming(e, d, 'missing keys:', 'unexpected keys:', 'more',
                         'is it the checkpoint of this model')
  assert len(msg) < 3000, len(msg)


# name -> (edit of a T5 config.json: new file bytes, words the message has)
BAD_T5_CONFIGS = {
    'malformed_json': (lambda raw: raw[:-5], 'not valid JSON'),
    'not_utf8': (lambda raw: b'\xff' + raw, 'not valid JSON'),
    'not_an_object': (lambda raw: b'[1, 2, 3]', 'holds a JSON list'),
    'missing_required_field': (
        lambda raw: json.dumps({k: v for k, v in json.loads(raw).items()
                                if k != 'd_model'}).encode(),
        'required field "d_model" is missing'),
    'field_a_string': (lambda raw: json.dumps({**json.loads(raw), 'num_heads': '4'}).encode(),
                       'field "num_heads" is \'4\''),
    'field_a_bool': (lambda raw: json.dumps({**json.loads(raw), 'num_layers': True}).encode(),
                     'field "num_layers" is True'),
    'field_negative': (lambda raw: json.dumps({**json.loads(raw), 'd_ff': -64}).encode(),
                       'field "d_ff" is -64; expected a positive integer'),
    'epsilon_not_a_number': (
        lambda raw: json.dumps({**json.loads(raw), 'layer_norm_epsilon': [1e-6]}).encode(),
        'field "layer_norm_epsilon"'),
    'other_model_type': (lambda raw: json.dumps({**json.loads(raw), 'model_type': 'bert'}).encode(),
                         "model_type='bert'"),
    'unknown_feed_forward': (
        lambda raw: json.dumps({**json.loads(raw), 'feed_forward_proj': 'gated-x-y'}).encode(),
        'feed_forward_proj'),
}


@pytest.mark.parametrize('case', sorted(BAD_T5_CONFIGS))
def test_bad_config_json_names_the_file_and_field(case):
  _, src = hf_fixtures.t5_model('relu')
  d = _copy(src, f'bad_config_{case}')
  cfg = os.path.join(d, 'config.json')
  edit, words = BAD_T5_CONFIGS[case]
  with open(cfg, 'rb') as fh:
    raw = fh.read()
  with open(cfg, 'wb') as fh:
    fh.write(edit(raw))
  with pytest.raises(convert.WeightImportError) as e:
    convert.load_t5(d)
  _one_line_naming(e, cfg, words)


@pytest.mark.parametrize('edit,words', [
    (lambda c: {k: v for k, v in c.items() if k != 'vision_config'},
     'required field "vision_config" is missing'),
    (lambda c: {**c, 'text_config': {**c['text_config'], 'hidden_size': '32'}},
     'field "text_config.hidden_size" is \'32\''),
    (lambda c: {**c, 'vision_config': {**c['vision_config'], 'hidden_act': 'swish9'}},
     "unsupported activation 'swish9'"),
])
def test_bad_clip_config_names_the_file_and_field(edit, words, tmp_path):
  _, src = hf_fixtures.clip_model(63, 'quick_gelu')
  d = str(tmp_path / 'clip')
  shutil.copytree(src, d)
  cfg = os.path.join(d, 'config.json')
  with open(cfg) as fh:
    config = json.load(fh)
  with open(cfg, 'w') as fh:
    json.dump(edit(config), fh)
  with pytest.raises(convert.WeightImportError) as e:
    convert.load_clip(d)
  _one_line_naming(e, cfg, words)


def test_wrong_kind_of_path_is_named(tmp_path):
  _, src = hf_fixtures.t5_model('relu')
  weights = os.path.join(src, 'model.safetensors')
  cases = [(lambda: convert.load_t5(weights), (weights, 'is a file; expected')),
           (lambda: convert.load_t5(str(tmp_path / 'nope')), ('nope', 'no such directory')),
           (lambda: convert.read_weights(str(tmp_path / 'nope')), ('nope', 'no such file or')),
           (lambda: convert.load_t5(str(tmp_path)), (str(tmp_path), 'no config.json'))]
  os.mkdir(tmp_path / 'config_is_a_dir')
  os.mkdir(tmp_path / 'config_is_a_dir' / 'config.json')
  cases.append((lambda: convert.load_t5(str(tmp_path / 'config_is_a_dir')),
                (str(tmp_path / 'config_is_a_dir' / 'config.json'), 'is a directory')))
  only_config = tmp_path / 'only_config'
  os.mkdir(only_config)
  shutil.copy(os.path.join(src, 'config.json'), only_config)
  cases.append((lambda: convert.load_t5(str(only_config)),
                (str(only_config), 'no *.safetensors weights found')))
  for load, parts in cases:
    with pytest.raises(convert.WeightImportError) as e:
      load()
    _one_line_naming(e, *parts)


def test_duplicate_tensor_in_two_files_names_both(tmp_path):
  save_file({'a': np.ones(2, np.float32)}, str(tmp_path / 'one.safetensors'))
  save_file({'a': np.ones(2, np.float32)}, str(tmp_path / 'two.safetensors'))
  with pytest.raises(convert.WeightImportError) as e:
    convert.read_weights(str(tmp_path))
  _one_line_naming(e, "'a'", str(tmp_path / 'one.safetensors'), str(tmp_path / 'two.safetensors'))


def _index_edit_duplicate_key(raw):
  """The index text with its first weight_map entry given twice, pointing at another shard."""
  index = json.loads(raw)
  key, shard = next(iter(index['weight_map'].items()))
  other = next(s for s in index['weight_map'].values() if s != shard)
  entry = f'{json.dumps(key)}: {json.dumps(shard)}'
  return raw.decode().replace(entry, f'{entry}, {json.dumps(key)}: {json.dumps(other)}', 1).encode()


BAD_INDEXES = {
    'malformed_json': (lambda raw: raw[:len(raw) // 2], 'index.json', 'not valid JSON'),
    'no_weight_map': (lambda raw: b'{"metadata": {}}', 'index.json', 'no "weight_map"'),
    'shard_not_a_string': (
        lambda raw: json.dumps({'weight_map': {Q0: 3}}).encode(), 'index.json', 'no "weight_map"'),
    'shard_outside': (lambda raw: json.dumps({'weight_map': {Q0: '../x.safetensors'}}).encode(),
                      'index.json', "'../x.safetensors' point outside"),
    'key_given_twice': (_index_edit_duplicate_key, 'index.json', 'is given twice'),
}


@pytest.mark.parametrize('case', sorted(BAD_INDEXES))
def test_bad_shard_index_names_it(case):
  d = _copy(hf_fixtures.t5_sharded_dir('gated-gelu'), f'bad_index_{case}')
  index = os.path.join(d, 'model.safetensors.index.json')
  edit, name, words = BAD_INDEXES[case]
  with open(index, 'rb') as fh:
    raw = fh.read()
  with open(index, 'wb') as fh:
    fh.write(edit(raw))
  with pytest.raises(convert.WeightImportError) as e:
    convert.load_t5(d)
  _one_line_naming(e, index, words)


def test_tensor_in_two_shards_is_refused():
  d = _copy(hf_fixtures.t5_sharded_dir('gated-gelu'), 'sharded_duplicate')
  with open(os.path.join(d, 'model.safetensors.index.json')) as fh:
    weight_map = json.load(fh)['weight_map']
  other = next(s for s in sorted(set(weight_map.values())) if s != weight_map[Q0])
  tensors = load_file(os.path.join(d, other))
  tensors[Q0] = load_file(os.path.join(d, weight_map[Q0]))[Q0]
  save_file(tensors, os.path.join(d, other))
  with pytest.raises(convert.WeightImportError) as e:
    convert.load_t5(d)
  _one_line_naming(e, os.path.join(d, other), Q0, weight_map[Q0])


def test_shard_that_is_a_pickle_is_refused():
  d = _copy(hf_fixtures.t5_sharded_dir('gated-gelu'), 'sharded_pickle')
  with open(os.path.join(d, 'model.safetensors.index.json')) as fh:
    shard = json.load(fh)['weight_map'][Q0]
  with open(os.path.join(d, shard), 'wb') as fh:
    fh.write(pickle.dumps({'w': 1}, protocol=4))
  with pytest.raises(convert.WeightImportError) as e:
    convert.load_t5(d)
  _one_line_naming(e, os.path.join(d, shard), 'refusing')


@pytest.mark.skipif(not hasattr(os, 'geteuid') or os.geteuid() == 0,
                    reason='root reads files whatever their permissions')
@pytest.mark.parametrize('target', ['model.safetensors', 'config.json', '.'])
def test_unreadable_file_is_named(target, tmp_path):
  _, src = hf_fixtures.t5_model('relu')
  d = str(tmp_path / 'model')
  shutil.copytree(src, d)
  path = os.path.normpath(os.path.join(d, target))
  os.chmod(path, 0)
  try:
    with pytest.raises(convert.WeightImportError) as e:
      convert.load_t5(d)
    _one_line_naming(e, path, 'cannot be read', 'permissions')
  finally:
    os.chmod(path, 0o755)


def test_inception_weights_missing_directory_or_pickle(tmp_path):
  missing = str(tmp_path / 'pt_inception-2015-12-05.safetensors')
  with pytest.raises(convert.WeightImportError) as e:
    convert.load_inception(missing)
  _one_line_naming(e, missing, 'no such Inception weights file', 'convert_inception')
  with pytest.raises(convert.WeightImportError) as e:
    convert.load_inception(str(tmp_path))
  _one_line_naming(e, str(tmp_path), 'is a directory')
  with open(missing, 'wb') as fh:
    fh.write(pickle.dumps({'w': 1}, protocol=2))
  with pytest.raises(convert.WeightImportError) as e:
    convert.load_inception(missing)
  _one_line_naming(e, missing, 'refusing', 'convert_inception')


def test_fid_protocol_reports_missing_inception_weights_first(tmp_path):
  from diffusion_jax.eval import protocol
  missing = str(tmp_path / 'inception.safetensors')
  with pytest.raises(convert.WeightImportError) as e:
    protocol.run(lambda *a: None, workdir=str(tmp_path / 'eval'), inception_path=missing,
                 sampling={'guidance': 1.0, 'sampler': 'ddim', 'steps': 1})
  _one_line_naming(e, missing, 'no such Inception weights file', 'convert_inception')
  assert not os.path.exists(tmp_path / 'eval'), 'nothing is written before the weights load'


def test_convert_inception_cli_refuses_a_non_torch_file_with_status_2(tmp_path, capsys):
  pytest.importorskip('torch')
  from diffusion_jax import cli
  from diffusion_jax.tools import convert_inception
  src = tmp_path / 'weights.pth'
  src.write_bytes(b'this is not a torch checkpoint')
  with pytest.raises(SystemExit) as e:
    cli.call(convert_inception, [f'--src={src}', f'--out={tmp_path / "out.safetensors"}'])
  assert e.value.code == errors.INPUT_EXIT_STATUS
  err = [line for line in capsys.readouterr().err.splitlines() if line.startswith('error:')]
  assert len(err) == 1 and str(src) in err[0] and 'not a torch checkpoint' in err[0], err


@pytest.mark.parametrize('content,words', [
    (b'{"image_mean": [0.5, 0.5', 'not valid JSON'),
    (b'{"image_mean": [0.5, 0.5]}', '"image_mean" is [0.5, 0.5]'),
    (b'{"image_std": [0.5, 0.0, 0.5]}', 'above 0'),
])
def test_bad_preprocessor_config_names_the_file(content, words, tmp_path):
  path = tmp_path / 'preprocessor_config.json'
  path.write_bytes(content)
  with pytest.raises(convert.WeightImportError) as e:
    convert.read_image_stats(str(tmp_path), (0.4, 0.4, 0.4), (0.2, 0.2, 0.2))
  _one_line_naming(e, str(path), words)
  os.remove(path)
  assert convert.read_image_stats(str(tmp_path), (0.4,) * 3, (0.2,) * 3) == ([0.4] * 3,
                                                                              [0.2] * 3)
