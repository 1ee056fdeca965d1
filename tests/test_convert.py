"""Safe weight import: integrity checks, errors that name the key, pickle refusal."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file, save_file

import hf_fixtures
from diffusion_jax import convert
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
